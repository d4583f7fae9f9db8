// The instruction-set table of the CPU backend. CMake compiles attention_cpu_isa.cpp once per
// entry of MHA_CPU_ISAS (each in namespace mha::cpu_<name>, with MHA_CPU_HAVE_<name> = 1 on
// the core library); this table says which paths exist, which this CPU can run, and picks one:
// the first supported row, or the one MHA_EXT_SIMD=<name> names.
//
// Adding an instruction set: one entry in MHA_CPU_ISAS (flags, vector width) and one row here
// (name, CPU check), plus its own micro-kernel header under kernel/ if it has one.
#include "cpu/attention_cpu.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace mha {

#define MHA_CPU_DECLARE_ISA(ns)                                \
    namespace ns {                                             \
    void attention_forward(const AttentionParams& params);     \
    void attention_forward_naive(const AttentionParams& params); \
    void attention_forward_varlen(const VarlenParams& params);   \
    void attention_forward_kvcache(const KvcacheParams& params); \
    void attention_backward(const BackwardParams& params);      \
    void merge(const MergeParams& params);                       \
    void vector_tanh(const float* x, float* y, int64_t n);      \
    }
MHA_CPU_DECLARE_ISA(cpu_generic)
#if defined(MHA_CPU_HAVE_avx2)
MHA_CPU_DECLARE_ISA(cpu_avx2)
#endif
#if defined(MHA_CPU_HAVE_avx512)
MHA_CPU_DECLARE_ISA(cpu_avx512)
#endif
#if defined(MHA_CPU_HAVE_amx)
MHA_CPU_DECLARE_ISA(cpu_amx)
#endif
#undef MHA_CPU_DECLARE_ISA

namespace {

#if defined(__x86_64__) || defined(__i386__)
// CPUID leaf 7 and the OS's XCR0: what the CPU has and what the OS saves on a context switch.
struct X86Features {
    bool avx2 = false, avx512 = false, avx512bf16 = false, amx_bf16 = false;
    std::string amx_note;  // why AMX is not used although the CPU has it
};

X86Features probe_x86() {
    X86Features f;
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
    const bool osxsave = (c >> 27) & 1;
    if (!osxsave || __get_cpuid_max(0, nullptr) < 7) return f;
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    const uint64_t xcr0 = (static_cast<uint64_t>(hi) << 32) | lo;
    unsigned b7, c7, d7, a71 = 0, b71, c71, d71;
    __cpuid_count(7, 0, a, b7, c7, d7);
    const unsigned max7 = a;
    if (max7 >= 1) __cpuid_count(7, 1, a71, b71, c71, d71);
    const bool ymm_os = (xcr0 & 0x6) == 0x6;
    const bool zmm_os = (xcr0 & 0xe6) == 0xe6;  // opmask, ZMM_Hi256, Hi16_ZMM
    f.avx2 = ymm_os && ((b7 >> 5) & 1);
    const bool avx512 = ((b7 >> 16) & 1) && ((b7 >> 17) & 1) && ((b7 >> 30) & 1) && ((b7 >> 31) & 1);
    f.avx512 = f.avx2 && zmm_os && avx512;
    f.avx512bf16 = f.avx512 && ((a71 >> 5) & 1);
    const bool amx = ((d7 >> 24) & 1) && ((d7 >> 22) & 1);  // AMX-TILE, AMX-BF16
    if (!amx || !f.avx512bf16) return f;
#if defined(__linux__) && defined(__x86_64__)
    // Linux keeps the 8 KB tile state off until the process asks for it (once, process-wide).
    constexpr long kArchReqXcompPerm = 0x1023;
    constexpr long kXfeatureXtiledata = 18;
    if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) {
        f.amx_note = "amx: the CPU has AMX-BF16 but Linux refused the tile state "
                     "(arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)); using avx512";
        return f;
    }
    f.amx_bf16 = true;
#else
    f.amx_note = "amx: the CPU has AMX-BF16, but this build asks only Linux for tile state";
#endif
    return f;
}

const X86Features& x86() {
    static const X86Features f = probe_x86();
    return f;
}
#endif

struct CpuIsa {
    const char* name;
    bool (*supported)();  // this CPU (and OS) can run the path
    void (*forward)(const AttentionParams&);
    void (*naive)(const AttentionParams&);
    void (*varlen)(const VarlenParams&);
    void (*kvcache)(const KvcacheParams&);
    void (*backward)(const BackwardParams&);
    void (*merge)(const MergeParams&);
    void (*tanh)(const float*, float*, int64_t);  // vtanh (vec.h), for the tests
};

// Best first; generic, the portable build, is always last and always supported.
const CpuIsa kIsas[] = {
#if defined(MHA_CPU_HAVE_amx)
    {"amx", [] { return x86().amx_bf16; }, &cpu_amx::attention_forward,
     &cpu_amx::attention_forward_naive, &cpu_amx::attention_forward_varlen,
     &cpu_amx::attention_forward_kvcache, &cpu_amx::attention_backward,
     &cpu_amx::merge, &cpu_amx::vector_tanh},
#endif
#if defined(MHA_CPU_HAVE_avx512)
    {"avx512", [] { return x86().avx512; }, &cpu_avx512::attention_forward,
     &cpu_avx512::attention_forward_naive, &cpu_avx512::attention_forward_varlen,
     &cpu_avx512::attention_forward_kvcache, &cpu_avx512::attention_backward,
     &cpu_avx512::merge, &cpu_avx512::vector_tanh},
#endif
#if defined(MHA_CPU_HAVE_avx2)
    {"avx2",
     [] {
         __builtin_cpu_init();
         return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                __builtin_cpu_supports("f16c");
     },
     &cpu_avx2::attention_forward, &cpu_avx2::attention_forward_naive,
     &cpu_avx2::attention_forward_varlen, &cpu_avx2::attention_forward_kvcache,
     &cpu_avx2::attention_backward, &cpu_avx2::merge, &cpu_avx2::vector_tanh},
#endif
    {"generic", [] { return true; }, &cpu_generic::attention_forward,
     &cpu_generic::attention_forward_naive, &cpu_generic::attention_forward_varlen,
     &cpu_generic::attention_forward_kvcache, &cpu_generic::attention_backward,
     &cpu_generic::merge, &cpu_generic::vector_tanh},
};
constexpr int kNumIsas = static_cast<int>(sizeof(kIsas) / sizeof(kIsas[0]));

std::string join(const std::vector<std::string>& names) {
    std::string s;
    for (const std::string& n : names) s += (s.empty() ? "" : ", ") + n;
    return s;
}

struct Choice {
    CpuSimd info;
    std::atomic<const CpuIsa*> isa{nullptr};
};

void choose(Choice& c) {
#if defined(MHA_CPU_HAVE_amx)
    if (!x86().amx_note.empty()) c.info.note = x86().amx_note;
#endif
    for (const CpuIsa& row : kIsas) {
        if (row.supported()) c.info.supported.emplace_back(row.name);
    }
    const char* forced = std::getenv("MHA_EXT_SIMD");
    if (forced == nullptr || forced[0] == '\0') {
        for (const CpuIsa& row : kIsas) {
            if (row.supported()) {
                c.isa = &row;
                break;
            }
        }
    } else {
        const std::string want = forced;
        std::vector<std::string> built;
        for (const CpuIsa& row : kIsas) {
            built.emplace_back(row.name);
            if (want == row.name && row.supported()) c.isa = &row;
        }
        if (c.isa.load() == nullptr) {
            bool known = false;
            for (const std::string& n : built) known |= n == want;
            c.info.error = "MHA_EXT_SIMD=" + want +
                           (known ? ": this CPU cannot run that path"
                                  : ": not an instruction-set path of this build (it has " +
                                        join(built) + ")") +
                           "; the paths this CPU supports are: " + join(c.info.supported) +
                           " (unset MHA_EXT_SIMD to pick the best one)";
        }
    }
    if (c.isa.load() != nullptr) c.info.selected = c.isa.load()->name;
}

Choice& choice() {
    static Choice c;
    static const bool chosen = (choose(c), true);
    (void)chosen;
    return c;
}

}  // namespace

const CpuSimd& attention_cpu_simd() { return choice().info; }

void attention_forward_cpu(const AttentionParams& params) {
    const CpuIsa* isa = choice().isa.load(std::memory_order_acquire);
    if (isa == nullptr) throw std::runtime_error(choice().info.error);
    isa->forward(params);
}

std::string attention_cpu_set_simd(const std::string& name) {
    Choice& c = choice();
    for (const CpuIsa& row : kIsas) {
        if (name == row.name && row.supported()) {
            const std::string before = c.info.selected;
            c.isa.store(&row, std::memory_order_release);
            c.info.selected = row.name;
            c.info.error.clear();
            return before;
        }
    }
    throw std::invalid_argument("simd: '" + name + "' is not a path this CPU supports (" +
                                join(c.info.supported) + ")");
}

void attention_forward_varlen_cpu(const VarlenParams& params) {
    const CpuIsa* isa = choice().isa.load(std::memory_order_acquire);
    if (isa == nullptr) throw std::runtime_error(choice().info.error);
    isa->varlen(params);
}

void attention_forward_kvcache_cpu(const KvcacheParams& params) {
    const CpuIsa* isa = choice().isa.load(std::memory_order_acquire);
    if (isa == nullptr) throw std::runtime_error(choice().info.error);
    isa->kvcache(params);
}

void attention_backward_cpu(const BackwardParams& params) {
    const CpuIsa* isa = choice().isa.load(std::memory_order_acquire);
    if (isa == nullptr) throw std::runtime_error(choice().info.error);
    isa->backward(params);
}

void attention_cpu_merge(const MergeParams& params) {
    const CpuIsa* isa = choice().isa.load(std::memory_order_acquire);
    if (isa == nullptr) throw std::runtime_error(choice().info.error);
    isa->merge(params);
}

void attention_cpu_tanh(const float* x, float* y, int64_t n) {
    const CpuIsa* isa = choice().isa.load(std::memory_order_acquire);
    if (isa == nullptr) throw std::runtime_error(choice().info.error);
    isa->tanh(x, y, n);
}

void attention_forward_cpu_naive(const AttentionParams& params) {
    kIsas[kNumIsas - 1].naive(params);
}

}  // namespace mha
