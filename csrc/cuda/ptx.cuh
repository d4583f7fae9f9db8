// CUDA primitives behind small named functions: the inline PTX (mma.sync, ldmatrix, cp.async)
// and the warp shuffles / votes the kernels use. Kernels call these, never asm or __shfl_*
// directly, so the host emulation build (MHA_EXT_CUDA_EMULATOR, cuda/emu/) stands in for the
// primitives with cuda/emu/ptx_emu.h, written from the PTX ISA's documented semantics; the
// helpers built on them (warp_max, quad_sum, ...) are the same code in both builds.
//
// Also here: MHA_DYNAMIC_SMEM(name), the block's dynamic shared memory, and
// MHA_LAUNCH(grid, block, smem, stream, kernel)(args...), a kernel launch; both are spelled
// differently in the emulation.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#if defined(MHA_CUDA_EMULATOR)
#include "cuda/emu/ptx_emu.h"
#else

#define MHA_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#define MHA_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>

namespace mha {
namespace cuda {

constexpr unsigned kFullWarp = 0xffffffffu;

// ------------------------------------------------------------------------------------------
// Warp shuffles and votes (all 32 lanes take part).

template <typename A>
__device__ __forceinline__ A warp_shfl_xor(A x, int lane_mask) {
    return __shfl_xor_sync(kFullWarp, x, lane_mask);
}
template <typename A>
__device__ __forceinline__ A warp_shfl(A x, int src_lane) {
    return __shfl_sync(kFullWarp, x, src_lane);
}
__device__ __forceinline__ unsigned warp_ballot(bool pred) { return __ballot_sync(kFullWarp, pred); }
__device__ __forceinline__ bool warp_any(bool pred) { return __any_sync(kFullWarp, pred) != 0; }

// ------------------------------------------------------------------------------------------
// Tensor cores: D = A B + D for one m16n8k16 tile, f32 accumulators (sm_80+).

__device__ __forceinline__ void mma_m16n8k16_f16(float (&c)[4], const uint32_t (&a)[4],
                                                 uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_m16n8k16_bf16(float (&c)[4], const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ------------------------------------------------------------------------------------------
// Shared memory: addresses, asynchronous copies, matrix loads.

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronously; src_bytes = 0 writes 16 zero bytes.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)),
                 "l"(src), "r"(src_bytes)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Four transposed 8x8 b16 matrices from shared memory (one row address per lane).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p))
                 : "memory");
}

// ldmatrix: 1, 2 or 4 8x8 b16 matrices from shared memory; lanes 8i..8i+7 give the row
// addresses of matrix i (16 bytes each, 16-byte aligned). Lane l receives, in r[i], the
// elements (l / 4, 2 (l % 4)) and (l / 4, 2 (l % 4) + 1) of matrix i; .trans gives the
// transposed matrix: elements (2 (l % 4), l / 4) and (2 (l % 4) + 1, l / 4).
__device__ __forceinline__ void ldmatrix_x1(uint32_t (&r)[1], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n"
                 : "=r"(r[0])
                 : "r"(smem_addr(p))
                 : "memory");
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(smem_addr(p))
                 : "memory");
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p))
                 : "memory");
}
__device__ __forceinline__ void ldmatrix_x1_trans(uint32_t (&r)[1], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
                 : "=r"(r[0])
                 : "r"(smem_addr(p))
                 : "memory");
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(smem_addr(p))
                 : "memory");
}

}  // namespace cuda
}  // namespace mha

#endif  // MHA_CUDA_EMULATOR

namespace mha {
namespace cuda {

// ------------------------------------------------------------------------------------------
// Warp reductions on top of the shuffles.

template <typename A>
__device__ __forceinline__ A warp_max(A x) {
    // fmax ignores NaN: a NaN score does not become the max, it poisons the sum instead.
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmax(x, warp_shfl_xor(x, o));
    return x;
}
template <typename A>
__device__ __forceinline__ A warp_sum(A x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += warp_shfl_xor(x, o);
    return x;
}

// Over the 4 lanes of a quad (the threads that share a row of an mma fragment).
__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, warp_shfl_xor(x, 1));
    return fmaxf(x, warp_shfl_xor(x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
    x += warp_shfl_xor(x, 1);
    return x + warp_shfl_xor(x, 2);
}

}  // namespace cuda
}  // namespace mha
