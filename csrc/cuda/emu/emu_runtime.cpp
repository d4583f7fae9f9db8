// The CUDA host emulator's run time: fibers and their scheduler, barriers, warp exchanges,
// cp.async groups, the shared-memory race detector, the runtime API subset, and the hooks that
// -fsanitize=thread's instrumentation calls from the kernel translation units. See emu.h.
// This file itself is compiled without the instrumentation.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <memory>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#pragma GCC visibility push(hidden)

namespace mha_emu {

__thread ThreadView* tl_thread __attribute__((tls_model("initial-exec"))) = nullptr;
__thread BlockView* tl_block __attribute__((tls_model("initial-exec"))) = nullptr;

namespace {
struct HalfTable {
    float v[65536];
    HalfTable() {
        for (uint32_t b = 0; b < 65536; ++b) {
            const uint16_t h = static_cast<uint16_t>(b);
            _Float16 x;
            std::memcpy(&x, &h, 2);
            v[b] = static_cast<float>(x);
        }
    }
};
const HalfTable g_half_table;
}  // namespace
const float* const half_to_float_table = g_half_table.v;

namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 256;  // around shared memory: accesses there are faults
constexpr size_t kDefaultSmem = 48 * 1024;
constexpr int kOptinSmem = 166912;  // sm_80 (A100): 163 KB per block with opt-in
constexpr int kMaxThreads = 1024;
constexpr int kMaxReports = 8;

// ------------------------------------------------------------------------------------------
// Environment.

const char* env(const char* name) {
    const char* v = std::getenv(name);
    return (v != nullptr && v[0] != '\0') ? v : nullptr;
}
bool env_is(const char* name, const char* value) {
    const char* v = env(name);
    return v != nullptr && std::strcmp(v, value) == 0;
}
long env_long(const char* name, long fallback) {
    const char* v = env(name);
    if (v == nullptr) return fallback;
    char* end = nullptr;
    const long x = std::strtol(v, &end, 10);
    return (end != nullptr && *end == '\0' && x > 0) ? x : fallback;
}

// ------------------------------------------------------------------------------------------
// Context switch.

}  // namespace
}  // namespace mha_emu

extern "C" void mha_emu_switch(void** save_sp, void* new_sp);
extern "C" void mha_emu_trampoline();
extern "C" void mha_emu_fiber_entry(void* fiber);

#if defined(__x86_64__)
// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack,
// stores the stack pointer in *save_sp and resumes the context whose stack pointer is new_sp.
asm(R"(
    .text
    .p2align 4
    .globl mha_emu_switch
    .hidden mha_emu_switch
    .type mha_emu_switch,@function
mha_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size mha_emu_switch,.-mha_emu_switch

    .p2align 4
    .globl mha_emu_trampoline
    .hidden mha_emu_trampoline
    .type mha_emu_trampoline,@function
mha_emu_trampoline:
    movq %rbx, %rdi
    call mha_emu_fiber_entry
    ud2
    .size mha_emu_trampoline,.-mha_emu_trampoline
)");
#else
#error "the CUDA emulator's context switch is written for x86-64 only"
#endif

namespace mha_emu {
namespace {

// A new stack whose first switch enters mha_emu_trampoline with rbx = arg.
void* init_stack(char* base, size_t bytes, void* arg) {
    uintptr_t top = (reinterpret_cast<uintptr_t>(base) + bytes) & ~uintptr_t{15};
    uint64_t* sp = reinterpret_cast<uint64_t*>(top) - 8;
    const uint32_t mxcsr = 0x1f80;
    const uint16_t fpucw = 0x037f;
    std::memcpy(reinterpret_cast<char*>(sp), &mxcsr, 4);
    std::memcpy(reinterpret_cast<char*>(sp) + 4, &fpucw, 2);
    sp[1] = sp[2] = sp[3] = sp[4] = 0;                  // r15 r14 r13 r12
    sp[5] = reinterpret_cast<uint64_t>(arg);            // rbx
    sp[6] = 0;                                          // rbp
    sp[7] = reinterpret_cast<uint64_t>(&mha_emu_trampoline);
    return sp;
}

// ------------------------------------------------------------------------------------------
// Launch-wide state: the faults of the launch (races, deadlocks, misuse).

struct LaunchState {
    const LaunchSpec* spec = nullptr;
    bool racecheck = true;
    std::mutex mu;
    std::vector<std::string> reports;
    long count = 0;
    std::atomic<long> checked{0};  // shared-memory bytes the detector checked
};

struct Worker;

enum class State { kRun, kWarpWait, kBlockWait, kDone };

struct Copy {
    unsigned char* dst;
    unsigned char data[16];
    int64_t group;  // -1: not committed yet
};

struct Fiber {
    ThreadView view;
    void* sp = nullptr;
    State state = State::kRun;
    uint32_t exchanges = 0;  // warp exchanges done (their parity picks the slot buffer)
    std::vector<Copy> copies;
    int64_t next_group = 0;
    Worker* worker = nullptr;
};

// Per shared-memory byte: its last writer and readers (0 = none, else linear thread + 1).
struct Cell {
    int32_t w;
    uint32_t w_be, w_we;  // block and warp epochs of the write
    int32_t r;            // reader: > 0 one thread; -1 several of warp r_warp; -2 several warps
    int32_t r_warp;
    int32_t r_last;  // the latest reader (for reports)
    uint32_t r_be, r_we;
    int32_t pend;  // cp.async in flight into this byte (issuer + 1)
};

struct Warp {
    int live = 0, arrived = 0;
    bool exchange = false;  // the lanes waiting are in a warp exchange (not __syncwarp)
    uint32_t epoch = 0;  // barrier generations that order this warp's accesses
    unsigned char slots[2][kWarpSize * kSlotBytes];
    int ops[2][kWarpSize];
};

struct Worker {
    LaunchState* launch = nullptr;
    BlockView view{};
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    char* stacks = nullptr;
    size_t stack_count = 0;
    std::vector<unsigned char> smem_buf;  // guard + smem + guard
    std::vector<Cell> shadow;
    uintptr_t lo = 0;  // start of the guarded range
    size_t span = 0;
    int live = 0, arrived = 0;
    int bar_or = 0, bar_or_result = 0;  // __syncthreads_or
    uint32_t block_epoch = 0;
    void* sched_sp = nullptr;
    Fiber* current = nullptr;
    bool racecheck = false;
    long checked = 0;
    unsigned rng = 12345;

    ~Worker() {
        if (stacks != nullptr) munmap(stacks, stack_count * kStackBytes);
    }
};

__thread Worker* tl_worker __attribute__((tls_model("initial-exec"))) = nullptr;

// ------------------------------------------------------------------------------------------
// Faults.

std::string where(const Worker* w, const Fiber* f) {
    char buf[256];
    if (f == nullptr) {
        std::snprintf(buf, sizeof buf, "block (%u,%u,%u)", w->view.bid.x, w->view.bid.y,
                      w->view.bid.z);
    } else {
        std::snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u) [warp %d lane %d]",
                      w->view.bid.x, w->view.bid.y, w->view.bid.z, f->view.tid.x, f->view.tid.y,
                      f->view.tid.z, f->view.warp, f->view.lane);
    }
    return buf;
}

std::string thread_name(const Worker* w, int linear) {
    const Fiber& f = w->fibers[static_cast<size_t>(linear)];
    char buf[128];
    std::snprintf(buf, sizeof buf, "thread (%u,%u,%u) [warp %d lane %d]", f.view.tid.x,
                  f.view.tid.y, f.view.tid.z, f.view.warp, f.view.lane);
    return buf;
}

void report(Worker* w, const std::string& what) {
    LaunchState* L = w->launch;
    std::lock_guard<std::mutex> lock(L->mu);
    ++L->count;
    if (L->reports.size() < kMaxReports) {
        L->reports.push_back(std::string("kernel ") + L->spec->name + ": " + what);
    }
}

// ------------------------------------------------------------------------------------------
// Scheduling.

void yield_to_scheduler(Fiber* f) {
    Worker* w = f->worker;
    mha_emu_switch(&f->sp, w->sched_sp);
}

void report(Worker* w, const std::string& what);
std::string where(const Worker* w, const Fiber* f);

void release_warp(Worker* w, int warp, bool orders_memory) {
    Warp& wp = w->warps[static_cast<size_t>(warp)];
    if (wp.exchange && wp.live != kWarpSize) {
        report(w, "in " + where(w, nullptr) + ": a warp-synchronous operation (shuffle, vote, "
                      "mma, ldmatrix) of warp " + std::to_string(warp) + " with " +
                      std::to_string(wp.live) + " of 32 lanes live");
    }
    wp.exchange = false;
    wp.arrived = 0;
    if (orders_memory) ++wp.epoch;
    const size_t n = w->fibers.size();
    for (size_t t = static_cast<size_t>(warp) * kWarpSize; t < n && t < (warp + 1u) * kWarpSize;
         ++t) {
        if (w->fibers[t].state == State::kWarpWait) w->fibers[t].state = State::kRun;
    }
}

void release_block(Worker* w) {
    w->arrived = 0;
    w->bar_or_result = w->bar_or;
    w->bar_or = 0;
    ++w->block_epoch;
    for (auto& wp : w->warps) ++wp.epoch;
    for (auto& f : w->fibers) {
        if (f.state == State::kBlockWait) f.state = State::kRun;
    }
}

// The warp barrier: returns once every live lane of the warp has arrived. orders_memory:
// __syncwarp (true) or an exchange (false) -- only the former orders shared-memory accesses.
// Exchanges and __syncwarp must not meet: the pending kind is kept per warp.
void warp_barrier(Fiber* f, bool orders_memory) {
    Worker* w = f->worker;
    Warp& wp = w->warps[static_cast<size_t>(f->view.warp)];
    if (wp.arrived > 0 && wp.exchange == orders_memory) {
        report(w, "in " + where(w, f) + ": lanes of warp " + std::to_string(f->view.warp) +
                      " meet at __syncwarp and at a warp-synchronous operation (divergent code)");
    }
    wp.exchange = !orders_memory;
    if (++wp.arrived == wp.live) {
        release_warp(w, f->view.warp, orders_memory);
        return;
    }
    f->state = State::kWarpWait;
    yield_to_scheduler(f);
}

void complete_copies(Fiber* f, int64_t below_group);

}  // namespace

// ------------------------------------------------------------------------------------------
// Shared-memory access checks.

namespace {

bool ordered(const Worker* w, const Fiber* f, int32_t other, uint32_t be, uint32_t we) {
    const int o = other - 1;
    if (o == f->view.linear) return true;
    if (be < w->block_epoch) return true;
    return o / kWarpSize == f->view.warp &&
           we < w->warps[static_cast<size_t>(f->view.warp)].epoch;
}

void race(Worker* w, Fiber* f, size_t off, const char* what, const std::string& other) {
    char buf[160];
    std::snprintf(buf, sizeof buf, " shared-memory byte offset %zu (address %p) ", off,
                  static_cast<void*>(w->view.smem + off));
    report(w, std::string("shared-memory race in ") + where(w, f) + ": " + what + buf +
                  other + " with no barrier in between");
}

void check_byte(Worker* w, Fiber* f, size_t off, bool write) {
    Cell& c = w->shadow[off];
    const uint32_t E = w->block_epoch;
    const uint32_t W = w->warps[static_cast<size_t>(f->view.warp)].epoch;
    const int32_t me = f->view.linear + 1;
    if (c.pend != 0) {
        report(w, std::string("in ") + where(w, f) + ": " + (write ? "writes" : "reads") +
                      " shared-memory byte offset " + std::to_string(off) +
                      ", the destination of a cp.async by " + thread_name(w, c.pend - 1) +
                      " that has not completed (no cp.async.wait_group by its thread before)");
        return;
    }
    if (c.w != 0 && !ordered(w, f, c.w, c.w_be, c.w_we)) {
        race(w, f, off, write ? "writes" : "reads", "written by " + thread_name(w, c.w - 1));
        c.w = 0;  // one report per conflict
        return;
    }
    if (write) {
        bool ok = true;
        if (c.r > 0) {
            ok = ordered(w, f, c.r, c.r_be, c.r_we);
        } else if (c.r == -1) {
            ok = c.r_be < E || (c.r_warp == f->view.warp && c.r_we < W);
        } else if (c.r == -2) {
            ok = c.r_be < E;
        }
        if (!ok) {
            const std::string other =
                c.r > 0 ? thread_name(w, c.r - 1)
                        : thread_name(w, c.r_last - 1) +
                              (c.r == -1 ? " and other threads of warp " + std::to_string(c.r_warp)
                                         : std::string(" and threads of other warps"));
            race(w, f, off, "writes", "read by " + other);
        }
        c.w = me;
        c.w_be = E;
        c.w_we = W;
        c.r = 0;
        return;
    }
    // A read: keep the readers a later write must be ordered after.
    bool replace = c.r == 0 || c.r == me;
    if (!replace) {
        if (c.r > 0) {
            replace = ordered(w, f, c.r, c.r_be, c.r_we);
        } else if (c.r == -1) {
            replace = c.r_be < E || (c.r_warp == f->view.warp && c.r_we < W);
        } else {
            replace = c.r_be < E;
        }
    }
    if (replace) {
        c.r = me;
        c.r_warp = f->view.warp;
    } else if (c.r > 0) {
        c.r = ((c.r - 1) / kWarpSize == f->view.warp) ? -1 : -2;
        c.r_warp = f->view.warp;
    } else if (c.r == -1 && c.r_warp != f->view.warp) {
        c.r = -2;
    }
    c.r_last = me;
    c.r_be = E;
    c.r_we = W;
}

void access_slow(Worker* w, uintptr_t a, size_t n, bool write) {
    Fiber* f = w->current;
    if (f == nullptr) return;
    const uintptr_t base = reinterpret_cast<uintptr_t>(w->view.smem);
    if (a < base || a + n > base + w->view.smem_bytes) {
        const long long off = static_cast<long long>(a) - static_cast<long long>(base);
        report(w, "out-of-bounds shared-memory " + std::string(write ? "write" : "read") +
                      " in " + where(w, f) + ": " + std::to_string(n) + " bytes at offset " +
                      std::to_string(off) + " of a " + std::to_string(w->view.smem_bytes) +
                      "-byte allocation");
        return;
    }
    if (!w->racecheck) return;
    w->checked += static_cast<long>(n);
    const size_t off = a - base;
    for (size_t i = 0; i < n; ++i) check_byte(w, f, off + i, write);
}

inline void access(const void* p, size_t n, bool write) {
    Worker* w = tl_worker;
    if (w == nullptr) return;
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    if (a - w->lo >= w->span) return;
    access_slow(w, a, n, write);
}

}  // namespace

void note_read(const void* p, size_t n) { access(p, n, false); }
void note_write(const void* p, size_t n) { access(p, n, true); }

bool check_shared(const void* p, size_t n, size_t align, const char* what) {
    Worker* w = tl_worker;
    if (w == nullptr) return false;
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    const uintptr_t base = reinterpret_cast<uintptr_t>(w->view.smem);
    if (a < base || a + n > base + w->view.smem_bytes) {
        fault("%s %p is not in the block's shared memory (%zu bytes at %p)", what, p,
              w->view.smem_bytes, static_cast<void*>(w->view.smem));
        return false;
    }
    if (a % align != 0) {
        fault("%s %p (shared-memory offset %zu) is not %zu-byte aligned", what, p,
              static_cast<size_t>(a - base), align);
        return false;
    }
    return true;
}

void fault(const char* fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    Worker* w = tl_worker;
    if (w == nullptr) return;
    report(w, "in " + where(w, w->current) + ": " + buf);
}

// ------------------------------------------------------------------------------------------
// Barriers and exchanges.

void syncthreads() {
    Worker* w = tl_worker;
    Fiber* f = w->current;
    if (++w->arrived == w->live) {
        release_block(w);
        return;
    }
    f->state = State::kBlockWait;
    yield_to_scheduler(f);
}

int syncthreads_or(int pred) {
    Worker* w = tl_worker;
    if (pred != 0) w->bar_or = 1;
    syncthreads();
    return w->bar_or_result;
}

void syncwarp() { warp_barrier(tl_worker->current, true); }

const unsigned char* warp_exchange(int op, const void* in, size_t n) {
    Worker* w = tl_worker;
    Fiber* f = w->current;
    Warp& wp = w->warps[static_cast<size_t>(f->view.warp)];
    const int par = static_cast<int>(f->exchanges++ & 1u);
    std::memcpy(wp.slots[par] + f->view.lane * kSlotBytes, in, n);
    wp.ops[par][f->view.lane] = op;
    warp_barrier(f, false);
    if (f->view.lane == 0) {
        for (int l = 1; l < kWarpSize; ++l) {
            if (wp.ops[par][l] != op) {
                fault("lanes 0 and %d of warp %d meet at different warp-synchronous operations "
                      "(divergent code)",
                      l, f->view.warp);
                break;
            }
        }
    }
    return wp.slots[par];
}

// ------------------------------------------------------------------------------------------
// cp.async.

void cp_async(void* dst, const void* src, int cp_size, int src_bytes) {
    Worker* w = tl_worker;
    Fiber* f = w->current;
    if (src_bytes < 0 || src_bytes > cp_size) {
        fault("cp.async src-size %d outside [0, %d]", src_bytes, cp_size);
        return;
    }
    if (!check_shared(dst, static_cast<size_t>(cp_size), static_cast<size_t>(cp_size),
                      "cp.async destination")) {
        return;
    }
    if (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % static_cast<uintptr_t>(cp_size)) {
        fault("cp.async source %p is not %d-byte aligned", src, cp_size);
        return;
    }
    Copy c;
    c.dst = static_cast<unsigned char*>(dst);
    std::memset(c.data, 0, sizeof c.data);
    if (src_bytes > 0) std::memcpy(c.data, src, static_cast<size_t>(src_bytes));
    c.group = -1;
    // The write may land any time until the wait: it must not conflict with earlier accesses.
    access(dst, static_cast<size_t>(cp_size), true);
    if (w->racecheck) {
        const size_t off = static_cast<size_t>(c.dst - w->view.smem);
        for (int i = 0; i < cp_size; ++i) w->shadow[off + i].pend = f->view.linear + 1;
    }
    f->copies.push_back(c);
}

void cp_async_commit() {
    Fiber* f = tl_worker->current;
    for (auto& c : f->copies) {
        if (c.group < 0) c.group = f->next_group;
    }
    ++f->next_group;
}

namespace {
void complete_copies(Fiber* f, int64_t below_group) {
    Worker* w = f->worker;
    size_t keep = 0;
    for (size_t i = 0; i < f->copies.size(); ++i) {
        Copy& c = f->copies[i];
        if (c.group >= 0 && c.group < below_group) {
            std::memcpy(c.dst, c.data, 16);
            if (w->racecheck) {
                const size_t off = static_cast<size_t>(c.dst - w->view.smem);
                for (int b = 0; b < 16; ++b) w->shadow[off + b].pend = 0;
            }
            access(c.dst, 16, true);
        } else {
            f->copies[keep++] = c;
        }
    }
    f->copies.resize(keep);
}
}  // namespace

void cp_async_wait(int pending) {
    Fiber* f = tl_worker->current;
    complete_copies(f, f->next_group - pending);
}

// ------------------------------------------------------------------------------------------
// Blocks and launches.

namespace {

void run_block(Worker* w, const LaunchSpec& spec, uint3 bid) {
    w->view.bid = bid;
    std::memset(w->smem_buf.data() + kGuardBytes, 0xff, spec.smem);
    if (w->racecheck) std::memset(w->shadow.data(), 0, spec.smem * sizeof(Cell));
    const int n = static_cast<int>(w->fibers.size());
    w->live = n;
    w->arrived = 0;
    w->bar_or = 0;
    w->block_epoch = 0;
    for (size_t i = 0; i < w->warps.size(); ++i) {
        Warp& wp = w->warps[i];
        const int first = static_cast<int>(i) * kWarpSize;
        wp.live = std::min(kWarpSize, n - first);
        wp.arrived = 0;
        wp.epoch = 0;
        wp.exchange = false;
    }
    for (int t = 0; t < n; ++t) {
        Fiber& f = w->fibers[static_cast<size_t>(t)];
        f.state = State::kRun;
        f.exchanges = 0;
        f.copies.clear();
        f.next_group = 0;
        f.sp = init_stack(w->stacks + static_cast<size_t>(t) * kStackBytes, kStackBytes, &f);
    }
    const bool reverse = env_is("MHA_EXT_CUDA_EMU_SCHEDULE", "reverse");
    const bool shuffle = env_is("MHA_EXT_CUDA_EMU_SCHEDULE", "shuffle");
    std::vector<int> order(static_cast<size_t>(n));
    for (int t = 0; t < n; ++t) order[static_cast<size_t>(t)] = reverse ? n - 1 - t : t;
    tl_block = &w->view;
    for (;;) {
        if (shuffle) {
            for (int t = n - 1; t > 0; --t) {
                w->rng = w->rng * 1103515245u + 12345u;
                std::swap(order[static_cast<size_t>(t)],
                          order[static_cast<size_t>((w->rng >> 8) % static_cast<unsigned>(t + 1))]);
            }
        }
        bool ran = false;
        for (int t : order) {
            Fiber& f = w->fibers[static_cast<size_t>(t)];
            if (f.state != State::kRun) continue;
            w->current = &f;
            tl_thread = &f.view;
            mha_emu_switch(&w->sched_sp, f.sp);
            ran = true;
        }
        w->current = nullptr;
        tl_thread = nullptr;
        if (w->live == 0) break;
        if (!ran) {
            int at_block = 0, at_warp = 0;
            for (auto& f : w->fibers) {
                at_block += f.state == State::kBlockWait;
                at_warp += f.state == State::kWarpWait;
            }
            report(w, "deadlock in " + where(w, nullptr) + ": " + std::to_string(at_block) +
                          " threads wait at __syncthreads, " + std::to_string(at_warp) +
                          " at a warp-synchronous operation, " +
                          std::to_string(n - w->live) + " have exited");
            break;
        }
    }
    tl_block = nullptr;
}

}  // namespace
}  // namespace mha_emu

extern "C" void mha_emu_fiber_entry(void* arg) {
    using namespace mha_emu;
    Fiber* f = static_cast<Fiber*>(arg);
    Worker* w = f->worker;
    const LaunchSpec& spec = *w->launch->spec;
    spec.body(spec.ctx);
    complete_copies(f, INT64_MAX);  // copies still in flight land when the thread exits
    f->state = State::kDone;
    --w->live;
    Warp& wp = w->warps[static_cast<size_t>(f->view.warp)];
    --wp.live;
    if (wp.arrived > 0 && wp.arrived == wp.live) release_warp(w, f->view.warp, true);
    if (w->arrived > 0 && w->arrived == w->live) release_block(w);
    mha_emu_switch(&f->sp, w->sched_sp);
    __builtin_trap();  // a finished fiber is never resumed
}

namespace mha_emu {
namespace {

void setup_worker(Worker* w, LaunchState* L, const LaunchSpec& spec) {
    w->launch = L;
    w->racecheck = L->racecheck;
    w->view.bdim = spec.block;
    w->view.gdim = spec.grid;
    const size_t n = static_cast<size_t>(spec.block.x) * spec.block.y * spec.block.z;
    if (w->stack_count < n) {
        if (w->stacks != nullptr) munmap(w->stacks, w->stack_count * kStackBytes);
        void* m = mmap(nullptr, n * kStackBytes, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) {
            w->stacks = nullptr;
            w->stack_count = 0;
            return;
        }
        w->stacks = static_cast<char*>(m);
        w->stack_count = n;
        const long page = sysconf(_SC_PAGESIZE);
        for (size_t t = 0; t < n; ++t) {  // a guard page at the bottom of every stack
            mprotect(w->stacks + t * kStackBytes, static_cast<size_t>(page), PROT_NONE);
        }
    }
    w->fibers.assign(n, Fiber{});
    for (size_t t = 0; t < n; ++t) {
        Fiber& f = w->fibers[t];
        f.worker = w;
        f.view.tid = uint3{static_cast<unsigned>(t % spec.block.x),
                           static_cast<unsigned>((t / spec.block.x) % spec.block.y),
                           static_cast<unsigned>(t / (static_cast<size_t>(spec.block.x) *
                                                      spec.block.y))};
        f.view.linear = static_cast<int>(t);
        f.view.warp = static_cast<int>(t / kWarpSize);
        f.view.lane = static_cast<int>(t % kWarpSize);
    }
    w->warps.resize((n + kWarpSize - 1) / kWarpSize);
    w->smem_buf.assign(spec.smem + 2 * kGuardBytes, 0xff);
    w->view.smem = w->smem_buf.data() + kGuardBytes;
    w->view.smem_bytes = spec.smem;
    w->lo = reinterpret_cast<uintptr_t>(w->smem_buf.data());
    w->span = w->smem_buf.size();
    if (w->racecheck) w->shadow.assign(spec.smem, Cell{});
}

void run_blocks(Worker* w, const LaunchSpec& spec, std::atomic<int64_t>* next, int64_t total) {
    tl_worker = w;
    for (;;) {
        const int64_t b = next->fetch_add(1);
        if (b >= total) break;
        const uint3 bid{static_cast<unsigned>(b % spec.grid.x),
                        static_cast<unsigned>((b / spec.grid.x) % spec.grid.y),
                        static_cast<unsigned>(b / (static_cast<int64_t>(spec.grid.x) *
                                                   spec.grid.y))};
        run_block(w, spec, bid);
    }
    w->launch->checked += w->checked;
    w->checked = 0;
    tl_worker = nullptr;
}

// Per calling thread: the runtime's error state.
thread_local cudaError_t tl_last_error = cudaSuccess;
thread_local bool tl_fault_pending = false;
thread_local std::string tl_fault_text;

cudaError_t set_error(cudaError_t e) {
    if (e != cudaSuccess) tl_last_error = e;
    return e;
}

std::mutex g_attr_mu;
std::unordered_map<const void*, int>& attrs() {
    static std::unordered_map<const void*, int> m;
    return m;
}

void log_launch(const LaunchSpec& spec, long faults, long checked) {
    const char* path = env("MHA_EXT_CUDA_EMU_LOG");
    if (path == nullptr) return;
    static std::mutex mu;
    std::lock_guard<std::mutex> lock(mu);
    FILE* fp = std::fopen(path, "a");
    if (fp == nullptr) return;
    std::fprintf(fp, "grid=%u,%u,%u block=%u,%u,%u smem=%zu faults=%ld checked=%ld kernel=%s\n",
                 spec.grid.x, spec.grid.y, spec.grid.z, spec.block.x, spec.block.y,
                 spec.block.z, spec.smem, faults, checked, spec.name);
    std::fclose(fp);
}

}  // namespace

void launch(const LaunchSpec& spec) {
    const int64_t threads = static_cast<int64_t>(spec.block.x) * spec.block.y * spec.block.z;
    const int64_t blocks = static_cast<int64_t>(spec.grid.x) * spec.grid.y * spec.grid.z;
    if (threads <= 0 || threads > kMaxThreads || blocks <= 0 || spec.grid.y > 65535 ||
        spec.grid.z > 65535 || spec.grid.x > 0x7fffffffu) {
        set_error(cudaErrorInvalidConfiguration);
        return;
    }
    size_t limit = kDefaultSmem;
    {
        std::lock_guard<std::mutex> lock(g_attr_mu);
        auto it = attrs().find(spec.fn);
        if (it != attrs().end() && static_cast<size_t>(it->second) > limit) limit = it->second;
    }
    if (spec.smem > limit) {
        set_error(cudaErrorInvalidValue);
        return;
    }
    LaunchState L;
    L.spec = &spec;
    L.racecheck = !env_is("MHA_EXT_CUDA_EMU_RACECHECK", "0");
    long hw = static_cast<long>(std::thread::hardware_concurrency());
    const long n_workers =
        std::min<long>(env_long("MHA_EXT_CUDA_EMU_THREADS", hw > 0 ? hw : 1), blocks);
    std::atomic<int64_t> next{0};
    std::vector<std::unique_ptr<Worker>> workers;
    for (long i = 0; i < n_workers; ++i) {
        workers.push_back(std::make_unique<Worker>());
        setup_worker(workers.back().get(), &L, spec);
        if (workers.back()->stacks == nullptr) {
            set_error(cudaErrorMemoryAllocation);
            return;
        }
    }
    std::vector<std::thread> pool;
    for (long i = 1; i < n_workers; ++i) {
        pool.emplace_back(run_blocks, workers[static_cast<size_t>(i)].get(), std::cref(spec),
                          &next, blocks);
    }
    run_blocks(workers[0].get(), spec, &next, blocks);
    for (auto& t : pool) t.join();
    log_launch(spec, L.count, L.checked.load());
    if (L.count > 0) {
        std::string text = L.reports.front();
        if (L.count > 1) text += " (and " + std::to_string(L.count - 1) + " more reports)";
        tl_fault_text = "unspecified launch failure: " + text;
        tl_fault_pending = true;
        set_error(cudaErrorLaunchFailure);
    }
}

cudaError_t func_set_attribute(const void* fn, cudaFuncAttribute attr, int value) {
    if (env_is("MHA_EXT_CUDA_EMU_FAIL", "func_set_attribute")) {
        return set_error(cudaErrorInvalidValue);
    }
    if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
        value > kOptinSmem) {
        return set_error(cudaErrorInvalidValue);
    }
    std::lock_guard<std::mutex> lock(g_attr_mu);
    attrs()[fn] = value;
    return cudaSuccess;
}

namespace {
cudaError_t sync_point() {
    if (tl_fault_pending) {
        tl_fault_pending = false;
        return cudaErrorLaunchFailure;
    }
    return cudaSuccess;
}
}  // namespace

}  // namespace mha_emu

// --- Runtime API ------------------------------------------------------------------------------

using mha_emu::set_error;

cudaError_t cudaGetLastError() {
    const cudaError_t e = mha_emu::tl_last_error;
    mha_emu::tl_last_error = cudaSuccess;
    mha_emu::tl_fault_pending = false;
    return e;
}
cudaError_t cudaPeekAtLastError() { return mha_emu::tl_last_error; }

const char* cudaGetErrorName(cudaError_t err) {
    switch (err) {
        case cudaSuccess: return "cudaSuccess";
        case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
        case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
        case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
        case cudaErrorInvalidDevicePointer: return "cudaErrorInvalidDevicePointer";
        case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    }
    return "cudaErrorUnknown";
}
const char* cudaGetErrorString(cudaError_t err) {
    switch (err) {
        case cudaSuccess: return "no error";
        case cudaErrorInvalidValue: return "invalid argument";
        case cudaErrorMemoryAllocation: return "out of memory";
        case cudaErrorInvalidConfiguration: return "invalid configuration argument";
        case cudaErrorInvalidDevicePointer: return "invalid device pointer";
        case cudaErrorLaunchFailure:
            return mha_emu::tl_fault_text.empty() ? "unspecified launch failure"
                                                  : mha_emu::tl_fault_text.c_str();
    }
    return "unknown error";
}

cudaError_t cudaGetDeviceCount(int* count) {
    *count = 1;
    return cudaSuccess;
}
cudaError_t cudaGetDevice(int* dev) {
    *dev = 0;
    return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
    switch (attr) {
        case cudaDevAttrMultiProcessorCount:
            *value = static_cast<int>(mha_emu::env_long("MHA_EXT_CUDA_EMU_SMS", 108));
            return cudaSuccess;
        case cudaDevAttrMaxSharedMemoryPerBlockOptin:
            *value = mha_emu::kOptinSmem;
            return cudaSuccess;
    }
    return set_error(cudaErrorInvalidValue);
}

cudaError_t cudaMalloc(void** p, size_t bytes) {
    *p = nullptr;
    if (bytes == 0) return cudaSuccess;
    void* m = nullptr;
    if (posix_memalign(&m, 256, bytes) != 0) return set_error(cudaErrorMemoryAllocation);
    std::memset(m, 0xff, bytes);  // fresh device memory reads as NaN, never as zeros
    *p = m;
    return cudaSuccess;
}
cudaError_t cudaFree(void* p) {
    std::free(p);
    return cudaSuccess;
}
cudaError_t cudaMallocHost(void** p, size_t bytes) {
    *p = nullptr;
    if (bytes == 0) return cudaSuccess;
    void* m = nullptr;
    if (posix_memalign(&m, 4096, bytes) != 0) return set_error(cudaErrorMemoryAllocation);
    *p = m;
    return cudaSuccess;
}
cudaError_t cudaFreeHost(void* p) {
    std::free(p);
    return cudaSuccess;
}
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind) {
    if (bytes > 0) std::memmove(dst, src, bytes);
    return set_error(mha_emu::sync_point());
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind,
                            cudaStream_t) {
    if (bytes > 0) std::memmove(dst, src, bytes);
    return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t) {
    if (bytes > 0) std::memset(dst, value, bytes);
    return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t) { return set_error(mha_emu::sync_point()); }
cudaError_t cudaDeviceSynchronize() { return set_error(mha_emu::sync_point()); }

struct CUevent_st {
    std::chrono::steady_clock::time_point t;
};
cudaError_t cudaEventCreate(cudaEvent_t* e) {
    *e = new CUevent_st{std::chrono::steady_clock::now()};
    return cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t e) {
    delete e;
    return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t) {
    e->t = std::chrono::steady_clock::now();
    return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t) { return set_error(mha_emu::sync_point()); }
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
    *ms = std::chrono::duration<float, std::milli>(end->t - start->t).count();
    return cudaSuccess;
}

// --- Hooks of -fsanitize=thread's instrumentation (kernel translation units) -----------------

#define MHA_EMU_RW(n)                                                                     \
    extern "C" void __tsan_read##n(void* p) { mha_emu::access(p, n, false); }             \
    extern "C" void __tsan_write##n(void* p) { mha_emu::access(p, n, true); }             \
    extern "C" void __tsan_unaligned_read##n(void* p) { mha_emu::access(p, n, false); }   \
    extern "C" void __tsan_unaligned_write##n(void* p) { mha_emu::access(p, n, true); }
MHA_EMU_RW(1)
MHA_EMU_RW(2)
MHA_EMU_RW(4)
MHA_EMU_RW(8)
MHA_EMU_RW(16)
#undef MHA_EMU_RW
extern "C" void __tsan_read_range(void* p, unsigned long n) { mha_emu::access(p, n, false); }
extern "C" void __tsan_write_range(void* p, unsigned long n) { mha_emu::access(p, n, true); }
extern "C" void __tsan_func_entry(void*) {}
extern "C" void __tsan_func_exit() {}
extern "C" void __tsan_init() {}
extern "C" void __tsan_vptr_update(void**, void*) {}
extern "C" void __tsan_vptr_read(void**) {}

// Atomics in instrumented code become calls; these do the operation itself (seq_cst).
#define MHA_EMU_ATOMIC(bits, T)                                                                \
    extern "C" T __tsan_atomic##bits##_load(const volatile T* a, int) {                        \
        return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                           \
    }                                                                                          \
    extern "C" void __tsan_atomic##bits##_store(volatile T* a, T v, int) {                     \
        __atomic_store_n(a, v, __ATOMIC_SEQ_CST);                                              \
    }                                                                                          \
    extern "C" T __tsan_atomic##bits##_exchange(volatile T* a, T v, int) {                     \
        return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                    \
    }                                                                                          \
    extern "C" T __tsan_atomic##bits##_fetch_add(volatile T* a, T v, int) {                    \
        return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);                                     \
    }                                                                                          \
    extern "C" T __tsan_atomic##bits##_fetch_sub(volatile T* a, T v, int) {                    \
        return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST);                                     \
    }                                                                                          \
    extern "C" T __tsan_atomic##bits##_fetch_and(volatile T* a, T v, int) {                    \
        return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST);                                     \
    }                                                                                          \
    extern "C" T __tsan_atomic##bits##_fetch_or(volatile T* a, T v, int) {                     \
        return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST);                                      \
    }                                                                                          \
    extern "C" T __tsan_atomic##bits##_fetch_xor(volatile T* a, T v, int) {                    \
        return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST);                                     \
    }                                                                                          \
    extern "C" int __tsan_atomic##bits##_compare_exchange_strong(volatile T* a, T* c, T v,     \
                                                                 int, int) {                   \
        return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); \
    }                                                                                          \
    extern "C" int __tsan_atomic##bits##_compare_exchange_weak(volatile T* a, T* c, T v, int,  \
                                                               int) {                          \
        return __atomic_compare_exchange_n(a, c, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);  \
    }                                                                                          \
    extern "C" T __tsan_atomic##bits##_compare_exchange_val(volatile T* a, T c, T v, int,      \
                                                            int) {                             \
        __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);       \
        return c;                                                                              \
    }
MHA_EMU_ATOMIC(8, uint8_t)
MHA_EMU_ATOMIC(16, uint16_t)
MHA_EMU_ATOMIC(32, uint32_t)
MHA_EMU_ATOMIC(64, uint64_t)
#undef MHA_EMU_ATOMIC
extern "C" void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
extern "C" void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }

#pragma GCC visibility pop
