// The instruction-set table of the CPU backend. CMake compiles attention_cpu_isa.cpp once per
// entry of MHA_CPU_ISAS (each in namespace mha::cpu_<name>, with MHA_CPU_HAVE_<name> = 1 on
// the core library); this table says which paths exist, which this CPU can run, and picks one:
// the first supported row, or the one MHA_EXT_SIMD=<name> names.
//
// Adding an instruction set: one entry in MHA_CPU_ISAS (flags, vector width) and one row here
// (name, CPU check), plus its own micro-kernel header under kernel/ if it has one.
#include "cpu/attention_cpu.h"

#include <cstdlib>
#include <stdexcept>

namespace mha {

#define MHA_CPU_DECLARE_ISA(ns)                                \
    namespace ns {                                             \
    void attention_forward(const AttentionParams& params);     \
    void attention_forward_naive(const AttentionParams& params); \
    void attention_forward_varlen(const VarlenParams& params);   \
    void attention_forward_kvcache(const KvcacheParams& params); \
    void attention_backward(const BackwardParams& params);      \
    }
MHA_CPU_DECLARE_ISA(cpu_generic)
#if defined(MHA_CPU_HAVE_avx2)
MHA_CPU_DECLARE_ISA(cpu_avx2)
#endif
#undef MHA_CPU_DECLARE_ISA

namespace {

struct CpuIsa {
    const char* name;
    bool (*supported)();  // this CPU (and OS) can run the path
    void (*forward)(const AttentionParams&);
    void (*naive)(const AttentionParams&);
    void (*varlen)(const VarlenParams&);
    void (*kvcache)(const KvcacheParams&);
    void (*backward)(const BackwardParams&);
};

// Best first; generic, the portable build, is always last and always supported.
const CpuIsa kIsas[] = {
#if defined(MHA_CPU_HAVE_avx2)
    {"avx2",
     [] {
         __builtin_cpu_init();
         return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                __builtin_cpu_supports("f16c");
     },
     &cpu_avx2::attention_forward, &cpu_avx2::attention_forward_naive,
     &cpu_avx2::attention_forward_varlen, &cpu_avx2::attention_forward_kvcache,
     &cpu_avx2::attention_backward},
#endif
    {"generic", [] { return true; }, &cpu_generic::attention_forward,
     &cpu_generic::attention_forward_naive, &cpu_generic::attention_forward_varlen,
     &cpu_generic::attention_forward_kvcache, &cpu_generic::attention_backward},
};
constexpr int kNumIsas = static_cast<int>(sizeof(kIsas) / sizeof(kIsas[0]));

std::string join(const std::vector<std::string>& names) {
    std::string s;
    for (const std::string& n : names) s += (s.empty() ? "" : ", ") + n;
    return s;
}

struct Choice {
    CpuSimd info;
    const CpuIsa* isa = nullptr;
};

Choice choose() {
    Choice c;
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
        if (c.isa == nullptr) {
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
    if (c.isa != nullptr) c.info.selected = c.isa->name;
    return c;
}

const Choice& choice() {
    static const Choice c = choose();
    return c;
}

}  // namespace

const CpuSimd& attention_cpu_simd() { return choice().info; }

void attention_forward_cpu(const AttentionParams& params) {
    const Choice& c = choice();
    if (c.isa == nullptr) throw std::runtime_error(c.info.error);
    c.isa->forward(params);
}

void attention_forward_varlen_cpu(const VarlenParams& params) {
    const Choice& c = choice();
    if (c.isa == nullptr) throw std::runtime_error(c.info.error);
    c.isa->varlen(params);
}

void attention_forward_kvcache_cpu(const KvcacheParams& params) {
    const Choice& c = choice();
    if (c.isa == nullptr) throw std::runtime_error(c.info.error);
    c.isa->kvcache(params);
}

void attention_backward_cpu(const BackwardParams& params) {
    const Choice& c = choice();
    if (c.isa == nullptr) throw std::runtime_error(c.info.error);
    c.isa->backward(params);
}

void attention_forward_cpu_naive(const AttentionParams& params) {
    kIsas[kNumIsas - 1].naive(params);
}

}  // namespace mha
