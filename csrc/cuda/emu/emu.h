// The CUDA host emulator (MHA_EXT_CUDA_EMULATOR=ON): the kernels' own sources compiled as C++
// for the CPU. A launch runs every block; the threads of a block run concurrently as fibers
// (user-level threads with their own stacks, one OS thread per block in flight), so that
// __syncthreads and the warp-synchronous operations are real barriers: a thread waits there
// until every live thread of its block (or warp) arrives. Shared memory is per block, filled
// with 0xff bytes (a NaN pattern) at block start; a guard zone around it catches overruns.
//
// Race detection: the kernel translation units are compiled with -fsanitize=thread's
// instrumentation only (not its run time): every load and store calls a hook (emu_runtime.cpp)
// that, for an address in the current block's shared memory, checks the access against the
// byte's last writer and readers. Two accesses by different threads conflict (one of them a
// write) unless a barrier orders them: a __syncthreads between them, or a __syncwarp when
// both threads are in the same warp (warp shuffles/votes/mma/ldmatrix do not order memory,
// as in CUDA). A conflict is reported with the kernel, the block, the shared-memory offset
// and both threads, and fails the launch (cudaErrorLaunchFailure with that text).
//
// Environment knobs (read at each launch):
//   MHA_EXT_CUDA_EMU_RACECHECK=0     no race detection (on by default)
//   MHA_EXT_CUDA_EMU_SCHEDULE=forward|reverse|shuffle   order in which runnable threads resume
//   MHA_EXT_CUDA_EMU_THREADS=n       OS threads running blocks (default: hardware threads)
//   MHA_EXT_CUDA_EMU_SMS=n           multiprocessor count the device reports (default 108)
//   MHA_EXT_CUDA_EMU_LOG=path        append one line per launch:
//                                    grid=x,y,z block=x,y,z smem=bytes faults=n checked=bytes
//                                    kernel=name (checked: shared-memory bytes race-checked)
//   MHA_EXT_CUDA_EMU_FAIL=func_set_attribute   the next cudaFuncSetAttribute fails (tests)
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <tuple>
#include <utility>

#pragma GCC visibility push(hidden)

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

namespace mha_emu {

constexpr int kWarpSize = 32;
constexpr size_t kSlotBytes = 64;  // per-lane payload of one warp exchange

// What kernel code sees of its thread and block (set by the scheduler on every switch).
struct ThreadView {
    uint3 tid;
    int linear;  // threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)
    int warp, lane;
};
struct BlockView {
    uint3 bid;
    dim3 bdim, gdim;
    unsigned char* smem;  // dynamic shared memory of this block
    size_t smem_bytes;
};

extern __thread ThreadView* tl_thread __attribute__((tls_model("initial-exec")));
extern __thread BlockView* tl_block __attribute__((tls_model("initial-exec")));

// Barriers.
void syncthreads();
int syncthreads_or(int pred);  // __syncthreads_or: the barrier, and the OR of every pred
void syncwarp();

// A warp exchange: every lane of the calling warp deposits n <= kSlotBytes bytes and waits
// for the others; returns the 32 slots (lane i at + i * kSlotBytes), valid until the warp's
// next exchange. op names the operation: lanes that meet at different operations are an
// error (divergent warp-synchronous code).
const unsigned char* warp_exchange(int op, const void* in, size_t n);
enum ExchangeOp { kOpShfl = 1, kOpBallot, kOpMma, kOpLdmatrix };

// Shared-memory access records for accesses the instrumentation does not see (the
// emulated instructions below read/write shared memory on behalf of a thread).
void note_read(const void* p, size_t n);
void note_write(const void* p, size_t n);
// Checks that [p, p + n) lies in the block's shared memory with the given alignment;
// reports a fault (and returns false) otherwise.
bool check_shared(const void* p, size_t n, size_t align, const char* what);

// cp.async: the copy is taken from global memory now and written to shared memory when
// the thread's group completes (wait_group); until then its bytes are "in flight" and any
// read of them is reported.
void cp_async(void* dst, const void* src, int cp_size, int src_bytes);
void cp_async_commit();
void cp_async_wait(int pending);

// Reports a fault of the running kernel (fails the launch with this text).
void fault(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// Launch.
struct LaunchSpec {
    const char* name;
    const void* fn;  // the kernel function (its attributes: cudaFuncSetAttribute)
    dim3 grid, block;
    size_t smem;
    void (*body)(void* ctx);  // runs the kernel for the current thread
    void* ctx;
};
void launch(const LaunchSpec& spec);

// "T f<...>" of a function template argument, as the compiler spells it.
template <auto F>
const char* kernel_name() {
    // "... [with auto F = mha::cuda::attention_tc_kernel<__half, 64, 4, 64>]"
    static const std::string name = [](const std::string& s) {
        const size_t p = s.rfind("F = ");
        if (p == std::string::npos) return s;
        const size_t e = s.rfind(']');
        return s.substr(p + 4, e != std::string::npos && e > p ? e - p - 4 : std::string::npos);
    }(__PRETTY_FUNCTION__);
    return name.c_str();
}

template <auto F>
struct Launcher {
    dim3 grid, block;
    size_t smem;
    template <typename... Args>
    void operator()(Args&&... args) const {
        auto packed = std::make_tuple(std::forward<Args>(args)...);
        using Packed = decltype(packed);
        LaunchSpec spec{kernel_name<F>(),
                        reinterpret_cast<const void*>(F),
                        grid,
                        block,
                        smem,
                        [](void* ctx) { std::apply(F, *static_cast<const Packed*>(ctx)); },
                        &packed};
        launch(spec);
    }
};

}  // namespace mha_emu

#pragma GCC visibility pop
