// CUDA attention kernels (templated; included by the .cu files under csrc/cuda/ only).
//
// Versions:
//   attention_tc_kernel      fp16/bf16, dot score, head dims padded up to kHeadDim (64, 96,
//                            128, 256; kBlockN = 32 keys per tile at 256, else 64):
//                            tiled flash forward on tensor cores (mma.sync m16n8k16, f32
//                            accumulators). A block of kWarps warps owns kWarps*16 query rows
//                            of one (batch, head); K/V tiles of kBlockN keys are double
//                            buffered in shared memory (cp.async when rows are 16-byte
//                            aligned, plain loads otherwise); Q passes through the second
//                            K/V buffer into registers before the key loop, so shared memory
//                            is 4 * kBlockN rows (36 KB at D = 64, 52 KB at 96, 68 KB at 128
//                            and 66 KB at 256); P is
//                            re-packed from the S accumulators into A fragments; V fragments
//                            come from ldmatrix.trans. Online softmax in base 2 with the scale
//                            folded in. Masks, bias, causal, window, key_lengths per element
//                            on tiles that need them; on such a tile, a NaN/Inf in V at a key
//                            some row cannot see is kept out of that row (P = 0 times NaN
//                            would poison it): the tile's P V then runs lane by lane.
//   attention_simt_kernel    every dtype (float64 in double, the rest in float), every score:
//                            one warp per query row, one key per lane for the scores, one
//                            output dimension per lane for P.V. Any D, Dk, Dv. Optional split
//                            of the keys into gridDim.y chunks (flash-decoding); the chunks
//                            write partial (out, lse) that attention_combine_kernel merges.
//   attention_decode_kernel  flash-decoding for few query rows (Lq * Hq / Hk <= 16), dot score,
//                            every dtype: one block per (key split, KV head, batch) with all
//                            the query heads of the GQA group, K/V tiles staged by cp.async.
//   attention_combine_kernel merges split-KV partials by their lse.
//   attention_weights_kernel weights = exp(s - lse) for visible keys, 0 elsewhere, computed
//                            again from q and k (no Lq x Lk buffer exists otherwise).
//   project_rows_kernel      x W for General (q W, scale folded) and Additive (q W_q, k W_k).
//
// Which keys a row sees (causal, window, key_lengths) is visible_keys() of csrc/visibility.h,
// the rule the CPU kernels use too. Inline PTX and warp shuffles are the named functions of
// cuda/ptx.cuh; no kernel here writes asm or __shfl itself.
//
// Conventions (those of the CPU kernel, csrc/cpu/attention_cpu_isa.cpp): a row with no
// visible key has max = -inf; its output is defined as 0 and its lse as -inf. A NaN score in
// a visible position poisons its row (output and lse NaN): the running max ignores NaN
// (fmax) but exp(NaN - m) = NaN reaches the row sum. All offsets are 64-bit.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cuda/ptx.cuh"
#include "params.h"
#include "visibility.h"

namespace mha {
namespace cuda {

constexpr int kSimtWarps = 4;  // warps per block of the SIMT, weights and combine kernels

// Extra device pointers and geometry for the SIMT and weights kernels.
template <typename A>
struct SimtArgs {
    // Query vectors that meet the keys, (batch*num_heads_q*seqlen_q, dqk) C-contiguous:
    // General: scale * q W; Additive: q W_q. nullptr for the dot score (q is read directly).
    const A* q_proj = nullptr;
    // Additive only: k W_k, (batch*num_heads_k*seqlen_k, dqk) C-contiguous; and w (dqk,).
    const A* k_proj = nullptr;
    const A* w_vec = nullptr;
    int64_t dqk = 0;  // length of the query vector: head_dim (dot), head_dim_k, score_dim
    // Per-warp scratch (dqk + head_dim_v elements) in global memory when it does not fit in
    // shared memory; nullptr = dynamic shared memory.
    A* scratch = nullptr;
    // Keys are read as 16-byte vectors (aligned base, strides and head_dim_k).
    bool k_vec = false;
    // Split-KV: gridDim.y chunks of split_size keys; > 1 chunk writes partials instead of out.
    int64_t split_size = 0;
    A* part_out = nullptr;  // (splits, rows, head_dim_v)
    A* part_lse = nullptr;  // (splits, rows)
    A* lse = nullptr;       // (rows,) or nullptr
};

// ------------------------------------------------------------------------------------------
// Scalars.

template <typename A>
__device__ __forceinline__ A neg_inf();
template <>
__device__ __forceinline__ float neg_inf<float>() {
    return -__int_as_float(0x7f800000);
}
template <>
__device__ __forceinline__ double neg_inf<double>() {
    return -__longlong_as_double(0x7ff0000000000000LL);
}
template <typename A>
__device__ __forceinline__ A quiet_nan();
template <>
__device__ __forceinline__ float quiet_nan<float>() {
    return __int_as_float(0x7fc00000);
}
template <>
__device__ __forceinline__ double quiet_nan<double>() {
    return __longlong_as_double(0x7ff8000000000000LL);
}

__device__ __forceinline__ float to_accum(float x) { return x; }
__device__ __forceinline__ double to_accum(double x) { return x; }
__device__ __forceinline__ float to_accum(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_accum(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ void store_out(float* p, float x) { *p = x; }
__device__ __forceinline__ void store_out(double* p, double x) { *p = x; }
__device__ __forceinline__ void store_out(__half* p, float x) { *p = __float2half_rn(x); }
__device__ __forceinline__ void store_out(__nv_bfloat16* p, float x) {
    *p = __float2bfloat16_rn(x);
}

__device__ __forceinline__ float exp_a(float x) { return expf(x); }
__device__ __forceinline__ double exp_a(double x) { return exp(x); }
__device__ __forceinline__ float log_a(float x) { return logf(x); }
__device__ __forceinline__ double log_a(double x) { return log(x); }
__device__ __forceinline__ float tanh_a(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_a(double x) { return tanh(x); }

// ------------------------------------------------------------------------------------------
// SIMT helpers shared by the forward and the weights kernels.

// Fills qs (dqk) with the row's query vector as it meets the keys: scale * q (dot), or the
// projection computed beforehand. Called by all lanes of a warp.
template <typename T, typename A>
__device__ __forceinline__ void load_query_row(const AttentionParams& p, const SimtArgs<A>& a,
                                               A* qs, int64_t row, int64_t b, int64_t h,
                                               int64_t i, int lane) {
    if (a.q_proj != nullptr) {
        const A* src = a.q_proj + row * a.dqk;
        for (int64_t d = lane; d < a.dqk; d += 32) qs[d] = src[d];
    } else {
        const T* src = static_cast<const T*>(p.q) + b * p.q_stride_batch + h * p.q_stride_head +
                       i * p.q_stride_seq;
        const A scale = static_cast<A>(p.scale);
        for (int64_t d = lane; d < a.dqk; d += 32) {
            qs[d] = static_cast<A>(to_accum(src[d])) * scale;
        }
    }
    __syncwarp();
}

// The score of key j (already known to be visible) for the query vector qs.
// k points at key 0 of the row's (batch, kv head); kp at its k W_k rows (additive).
template <typename T, typename A, bool kAdditive>
__device__ __forceinline__ A score_of(const AttentionParams& p, const SimtArgs<A>& a,
                                      const A* qs, const T* k, const A* kp, int64_t j) {
    if (kAdditive) {
        const A* kj = kp + j * a.dqk;
        const A* w = a.w_vec;
        A s = 0;
        for (int64_t x = 0; x < a.dqk; ++x) s += w[x] * tanh_a(qs[x] + kj[x]);
        return s * static_cast<A>(p.scale);
    } else {
        const T* kj = k + j * p.k_stride_seq;
        const int64_t n = p.head_dim_k;
        A s = 0;
        if (a.k_vec) {
            constexpr int kE = 16 / static_cast<int>(sizeof(T));
            for (int64_t d0 = 0; d0 < n; d0 += kE) {
                const uint4 u = *reinterpret_cast<const uint4*>(kj + d0);
                T t[kE];
                memcpy(t, &u, 16);
#pragma unroll
                for (int e = 0; e < kE; ++e) s += qs[d0 + e] * static_cast<A>(to_accum(t[e]));
            }
        } else {
            for (int64_t d = 0; d < n; ++d) s += qs[d] * static_cast<A>(to_accum(kj[d]));
        }
        return s;
    }
}

// ------------------------------------------------------------------------------------------
// attention_simt_kernel: one warp per query row (grid-stride), keys split over gridDim.y.
// Dynamic shared memory: kSimtWarps * (dqk + head_dim_v) accum_t, unless a.scratch is set.

template <typename T, typename A, bool kAdditive>
__global__ void __launch_bounds__(kSimtWarps * 32)
    attention_simt_kernel(const AttentionParams p, const SimtArgs<A> a) {
    MHA_DYNAMIC_SMEM(smem_raw);
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int64_t width = a.dqk + p.head_dim_v;
    A* ws = a.scratch != nullptr
                ? a.scratch + ((static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x) *
                                   kSimtWarps +
                               warp) * width
                : reinterpret_cast<A*>(smem_raw) + warp * width;
    A* qs = ws;              // (dqk)  query vector
    A* acc = ws + a.dqk;     // (head_dim_v) unnormalised output of this row
    const int64_t rows = p.batch * p.num_heads_q * p.seqlen_q;
    const int split = blockIdx.y;
    const int num_splits = gridDim.y;
    const A ninf = neg_inf<A>();

    for (int64_t row = static_cast<int64_t>(blockIdx.x) * kSimtWarps + warp; row < rows;
         row += static_cast<int64_t>(gridDim.x) * kSimtWarps) {
        const RowCoords rc = row_coords(p, row);
        const int64_t b = rc.b, h = rc.h, i = rc.i, hk = rc.hk;
        const int64_t lk = valid_keys(p, b);
        const KeyRange rr = visible_keys(p, i, lk);
        // This chunk's keys: [j_lo, j_hi] within the row's visible interval.
        const int64_t j_lo = max(rr.lo, split * a.split_size);
        const int64_t j_hi = min(rr.hi, (split + 1) * a.split_size - 1);

        for (int64_t d = lane; d < p.head_dim_v; d += 32) acc[d] = 0;
        A m = ninf;  // running max (may stay -inf)
        A l = 0;     // running sum of exp(s - m)
        if (j_lo <= j_hi) {
            load_query_row<T, A>(p, a, qs, row, b, h, i, lane);
            const T* k = p.k == nullptr ? nullptr
                                        : static_cast<const T*>(p.k) + b * p.k_stride_batch +
                                              hk * p.k_stride_head;
            const T* v = p.v == nullptr ? nullptr
                                        : static_cast<const T*>(p.v) + b * p.v_stride_batch +
                                              hk * p.v_stride_head;
            const A* kp = kAdditive ? a.k_proj + (b * p.num_heads_k + hk) * p.seqlen_k * a.dqk
                                    : nullptr;
            const uint8_t* mask = mask_row(p, b, h, i);
            const A* bias = bias_row<A>(p, b, h, i);
            for (int64_t j0 = j_lo; j0 <= j_hi; j0 += 32) {
                const int64_t j = j0 + lane;
                bool vis = j <= j_hi;
                if (vis && mask != nullptr) vis = mask[j * p.mask_stride_k] != 0;
                A s = ninf;
                if (vis) {
                    s = score_of<T, A, kAdditive>(p, a, qs, k, kp, j);
                    if (bias != nullptr) s += bias[j * p.bias_stride_k];
                }
                const A m_new = fmax(m, warp_max(s));
                // A row with nothing visible yet keeps m = -inf; subtract 0 then, so that
                // exp gives 0 for -inf scores and NaN for a NaN score (poisoning the row).
                const A m_use = m_new == ninf ? A(0) : m_new;
                const A pj = vis ? exp_a(s - m_use) : A(0);
                const A alpha = exp_a(m - m_use);  // 0 when m = -inf
                l = l * alpha + warp_sum(pj);
                m = m_new;
                for (int64_t d = lane; d < p.head_dim_v; d += 32) acc[d] *= alpha;
                // Only visible keys are read: padding and hidden values never reach the row.
                unsigned live = warp_ballot(vis);
                while (live != 0) {
                    const int src = __ffs(live) - 1;
                    live &= live - 1;
                    const A pb = warp_shfl(pj, src);
                    const T* vj = v + (j0 + src) * p.v_stride_seq;
                    for (int64_t d = lane; d < p.head_dim_v; d += 32) {
                        acc[d] += pb * static_cast<A>(to_accum(vj[d]));
                    }
                }
            }
        }

        // Finalise: empty row (l == 0) -> 0 and lse -inf; NaN l -> NaN output and lse.
        const bool empty = l == A(0);
        const A inv = empty ? A(0) : A(1) / l;
        const A lse = empty ? ninf : m + log_a(l);
        if (num_splits == 1) {
            T* out = static_cast<T*>(p.out) + b * p.out_stride_batch + h * p.out_stride_head +
                     i * p.out_stride_seq;
            for (int64_t d = lane; d < p.head_dim_v; d += 32) {
                store_out(out + d, empty ? A(0) : acc[d] * inv);
            }
            if (a.lse != nullptr && lane == 0) a.lse[row] = lse;
        } else {
            A* po = a.part_out + (static_cast<int64_t>(split) * rows + row) * p.head_dim_v;
            for (int64_t d = lane; d < p.head_dim_v; d += 32) po[d] = empty ? A(0) : acc[d] * inv;
            if (lane == 0) a.part_lse[static_cast<int64_t>(split) * rows + row] = lse;
        }
        __syncwarp();  // qs/acc are rewritten by the next row
    }
}

// ------------------------------------------------------------------------------------------
// attention_combine_kernel: merge split-KV partials by lse. One warp per row.

template <typename T, typename A>
__global__ void __launch_bounds__(kSimtWarps * 32)
    attention_combine_kernel(const AttentionParams p, const A* part_out, const A* part_lse,
                             int num_splits, A* lse_out) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int64_t rows = p.batch * p.num_heads_q * p.seqlen_q;
    const A ninf = neg_inf<A>();
    for (int64_t row = static_cast<int64_t>(blockIdx.x) * kSimtWarps + warp; row < rows;
         row += static_cast<int64_t>(gridDim.x) * kSimtWarps) {
        const RowCoords rc = row_coords(p, row);
        const int64_t b = rc.b, h = rc.h, i = rc.i;
        A mx = ninf;
        bool poison = false;
        for (int s = lane; s < num_splits; s += 32) {
            const A x = part_lse[static_cast<int64_t>(s) * rows + row];
            poison |= x != x;
            mx = fmax(mx, x);
        }
        mx = warp_max(mx);
        poison = warp_any(poison);
        A total = 0;
        if (!poison && mx != ninf) {
            for (int s = lane; s < num_splits; s += 32) {
                total += exp_a(part_lse[static_cast<int64_t>(s) * rows + row] - mx);
            }
            total = warp_sum(total);
        }
        const bool empty = !poison && mx == ninf;
        const A nan = quiet_nan<A>();
        T* out = static_cast<T*>(p.out) + b * p.out_stride_batch + h * p.out_stride_head +
                 i * p.out_stride_seq;
        for (int64_t d = lane; d < p.head_dim_v; d += 32) {
            A o = 0;
            if (poison) {
                o = nan;
            } else if (!empty) {
                for (int s = 0; s < num_splits; ++s) {
                    const A x = part_lse[static_cast<int64_t>(s) * rows + row];
                    if (x == ninf) continue;  // empty chunk: its partial is 0
                    o += exp_a(x - mx) * part_out[(static_cast<int64_t>(s) * rows + row) *
                                                      p.head_dim_v + d];
                }
                o /= total;
            }
            store_out(out + d, o);
        }
        if (lse_out != nullptr && lane == 0) {
            lse_out[row] = poison ? nan : (empty ? ninf : mx + log_a(total));
        }
    }
}

// ------------------------------------------------------------------------------------------
// attention_decode_kernel (flash-decoding): few query rows, long keys, dot score. One block
// per (key split, KV head, batch) holds every query row that reads that KV head -- the
// group's Hq / Hk heads times Lq rows, at most kDecodeMaxRows -- so K/V are read once per
// group, not once per query head. The split's keys go through shared memory in tiles of
// a.tile_n keys, double buffered (cp.async when rows are 16-byte aligned). Per tile: scores
// (thread per (row, key) pair), online softmax (warp per row), P V (thread per value dim).
// Each split writes its partial (out, lse) for attention_combine_kernel to merge by lse.
// Hidden keys (causal, window, key_lengths, mask) are never read into a row: their V may be
// NaN. Dynamic shared memory: decode_smem_bytes(); tile pitch in elements: a.pitch.

constexpr int kDecodeMaxRows = 16;
constexpr int kDecodeThreads = 128;

template <typename A>
struct DecodeArgs {
    int tile_n = 0;           // keys per tile
    int pitch = 0;            // K/V row pitch in shared memory (elements, multiple of 8)
    int rows = 0;             // query rows per block: (Hq / Hk) * Lq
    int64_t split_size = 0;   // keys per split (a multiple of tile_n)
    bool vec = false;         // K/V rows 16-byte aligned: cp.async
    A* part_out = nullptr;    // (splits, batch * Hq * Lq, Dv)
    A* part_lse = nullptr;    // (splits, batch * Hq * Lq)
};

// Bytes of dynamic shared memory the decode kernel needs (A = accumulation, T = storage).
inline size_t decode_smem_bytes(int rows, int64_t d, int64_t dv, int tile_n, int pitch,
                                size_t t_bytes, size_t a_bytes) {
    const size_t kv = 2 * 2 * static_cast<size_t>(tile_n) * pitch * t_bytes;  // 2 bufs x (K, V)
    const size_t per_row = (static_cast<size_t>(d) + dv + tile_n + 3) * a_bytes + tile_n;
    return (kv + rows * per_row + 15) / 16 * 16;
}

template <typename T>
__device__ __forceinline__ void load_rows(T* dst, const T* src, int64_t stride, int n_rows,
                                          int64_t n_valid, int dim, int pitch, bool vec) {
    if (vec) {  // dim % (16 / sizeof(T)) == 0, 16-byte aligned rows
        constexpr int kE = 16 / static_cast<int>(sizeof(T));
        const int chunks = dim / kE;
        for (int idx = threadIdx.x; idx < n_rows * chunks; idx += blockDim.x) {
            const int r = idx / chunks;
            const int c = idx - r * chunks;
            const bool ok = r < n_valid;
            cp_async_16(dst + r * pitch + c * kE, ok ? src + r * stride + c * kE : src,
                        ok ? 16 : 0);
        }
    } else {
        for (int idx = threadIdx.x; idx < n_rows * dim; idx += blockDim.x) {
            const int r = idx / dim;
            const int c = idx - r * dim;
            dst[r * pitch + c] = r < n_valid ? src[r * stride + c] : T(0.0f);
        }
    }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kDecodeThreads)
    attention_decode_kernel(const AttentionParams p, const DecodeArgs<A> a) {
    MHA_DYNAMIC_SMEM(smem_raw);
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int n_warps = blockDim.x >> 5;
    const int split = blockIdx.x;
    const int64_t hk = blockIdx.y;
    const int64_t b = blockIdx.z;
    const int R = a.rows;
    const int TN = a.tile_n;
    const int P = a.pitch;
    const int64_t D = p.head_dim, Dv = p.head_dim_v, Lq = p.seqlen_q;
    const int64_t group = p.num_heads_q / p.num_heads_k;

    T* kv = reinterpret_cast<T*>(smem_raw);  // buffer x: K at kv + x * 2 TN P, V after it
    A* qs = reinterpret_cast<A*>(kv + 4 * TN * P);  // (R, D) scaled queries
    A* acc = qs + R * D;                             // (R, Dv) unnormalised outputs
    A* sp = acc + R * Dv;                            // (R, TN) scores, then P
    A* m_run = sp + R * TN;                          // (R)
    A* l_run = m_run + R;                            // (R)
    A* alpha = l_run + R;                            // (R)
    uint8_t* vis = reinterpret_cast<uint8_t*>(alpha + R);  // (R, TN)

    const A ninf = neg_inf<A>();
    const int64_t lk = valid_keys(p, b);
    const int64_t j_lo = split * a.split_size;
    const int64_t j_hi = min(lk, j_lo + a.split_size);  // exclusive
    const T* k = static_cast<const T*>(p.k) + b * p.k_stride_batch + hk * p.k_stride_head;
    const T* v = static_cast<const T*>(p.v) + b * p.v_stride_batch + hk * p.v_stride_head;

    // Rows: r -> head h = hk * group + r / Lq, query i = r % Lq.
    for (int idx = tid; idx < R * D; idx += blockDim.x) {
        const int r = static_cast<int>(idx / D);
        const int64_t d = idx - r * D;
        const int64_t h = hk * group + r / Lq, i = r % Lq;
        const T* q = static_cast<const T*>(p.q) + b * p.q_stride_batch + h * p.q_stride_head +
                     i * p.q_stride_seq;
        qs[idx] = static_cast<A>(to_accum(q[d])) * static_cast<A>(p.scale);
    }
    for (int idx = tid; idx < R * Dv; idx += blockDim.x) acc[idx] = 0;
    for (int r = tid; r < R; r += blockDim.x) {
        m_run[r] = ninf;
        l_run[r] = 0;
    }
    const int64_t n_tiles = j_hi > j_lo ? (j_hi - j_lo + TN - 1) / TN : 0;
    if (n_tiles > 0) {
        load_rows<T>(kv, k + j_lo * p.k_stride_seq, p.k_stride_seq, TN, j_hi - j_lo,
                     static_cast<int>(D), P, a.vec);
        load_rows<T>(kv + TN * P, v + j_lo * p.v_stride_seq, p.v_stride_seq, TN, j_hi - j_lo,
                     static_cast<int>(Dv), P, a.vec);
        cp_async_commit();
    }
    __syncthreads();

    for (int64_t t = 0; t < n_tiles; ++t) {
        const int64_t n0 = j_lo + t * TN;
        const int buf = static_cast<int>(t & 1);
        if (t + 1 < n_tiles) {  // prefetch into the other buffer (free since the last barrier)
            const int64_t n1 = n0 + TN;
            T* kd = kv + (buf ^ 1) * 2 * TN * P;
            load_rows<T>(kd, k + n1 * p.k_stride_seq, p.k_stride_seq, TN, j_hi - n1,
                         static_cast<int>(D), P, a.vec);
            load_rows<T>(kd + TN * P, v + n1 * p.v_stride_seq, p.v_stride_seq, TN, j_hi - n1,
                         static_cast<int>(Dv), P, a.vec);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const T* kt = kv + buf * 2 * TN * P;
        const T* vt = kt + TN * P;

        // Scores of (row, key) pairs; hidden pairs are -inf and marked.
        for (int idx = tid; idx < R * TN; idx += blockDim.x) {
            const int r = idx / TN;
            const int jj = idx - r * TN;
            const int64_t j = n0 + jj;
            const int64_t h = hk * group + r / Lq, i = r % Lq;
            const KeyRange rr = visible_keys(p, i, lk);
            bool see = j < j_hi && j >= rr.lo && j <= rr.hi;
            if (see && p.mask != nullptr) {
                see = p.mask[b * p.mask_stride_batch + h * p.mask_stride_head +
                             i * p.mask_stride_q + j * p.mask_stride_k] != 0;
            }
            A x = ninf;
            if (see) {
                const A* qr = qs + r * D;
                const T* kr = kt + jj * P;
                A dot = 0;
                for (int64_t d = 0; d < D; ++d) dot += qr[d] * static_cast<A>(to_accum(kr[d]));
                if (p.bias != nullptr) {
                    dot += static_cast<const A*>(p.bias)[b * p.bias_stride_batch +
                                                         h * p.bias_stride_head +
                                                         i * p.bias_stride_q + j * p.bias_stride_k];
                }
                x = dot;
            }
            sp[idx] = x;
            vis[idx] = see ? 1 : 0;
        }
        __syncthreads();

        // Online softmax, one warp per row.
        for (int r = warp; r < R; r += n_warps) {
            A mx = ninf;
            for (int jj = lane; jj < TN; jj += 32) mx = fmax(mx, sp[r * TN + jj]);
            mx = warp_max(mx);
            const A m_new = fmax(m_run[r], mx);
            const A m_use = m_new == ninf ? A(0) : m_new;  // NaN scores stay NaN
            A sum = 0;
            for (int jj = lane; jj < TN; jj += 32) {
                const A e = vis[r * TN + jj] ? exp_a(sp[r * TN + jj] - m_use) : A(0);
                sp[r * TN + jj] = e;
                sum += e;
            }
            sum = warp_sum(sum);
            __syncwarp();  // every lane has read m_run[r] before lane 0 rewrites it
            if (lane == 0) {
                const A al = exp_a(m_run[r] - m_use);
                alpha[r] = al;
                l_run[r] = l_run[r] * al + sum;
                m_run[r] = m_new;
            }
        }
        __syncthreads();

        // O = alpha O + P V over the visible keys, one thread per (row, value dim).
        for (int idx = tid; idx < R * Dv; idx += blockDim.x) {
            const int r = static_cast<int>(idx / Dv);
            const int64_t d = idx - r * Dv;
            A o = acc[idx] * alpha[r];
            for (int jj = 0; jj < TN; ++jj) {
                if (vis[r * TN + jj]) o += sp[r * TN + jj] * static_cast<A>(to_accum(vt[jj * P + d]));
            }
            acc[idx] = o;
        }
        __syncthreads();  // the buffers and sp/vis are rewritten by the next tile
    }

    // Partials: out = acc / l (0 for an empty split, lse -inf).
    const int64_t rows_total = p.batch * p.num_heads_q * Lq;
    for (int idx = tid; idx < R * Dv; idx += blockDim.x) {
        const int r = static_cast<int>(idx / Dv);
        const int64_t d = idx - r * Dv;
        const int64_t h = hk * group + r / Lq, i = r % Lq;
        const int64_t row = (b * p.num_heads_q + h) * Lq + i;
        const A l = l_run[r];
        a.part_out[(static_cast<int64_t>(split) * rows_total + row) * Dv + d] =
            l == A(0) ? A(0) : acc[idx] / l;
    }
    for (int r = tid; r < R; r += blockDim.x) {
        const int64_t h = hk * group + r / Lq, i = r % Lq;
        const int64_t row = (b * p.num_heads_q + h) * Lq + i;
        const A l = l_run[r];
        a.part_lse[static_cast<int64_t>(split) * rows_total + row] =
            l == A(0) ? ninf : m_run[r] + log_a(l);
    }
}

// ------------------------------------------------------------------------------------------
// attention_weights_kernel: weights[row, j] = exp(s - lse) where visible, else 0; a row with
// lse NaN is NaN throughout (the naive CPU kernel's convention). One warp per row, lanes
// along keys (coalesced stores). Dynamic shared memory: kSimtWarps * dqk accum_t unless
// a.scratch is set.

template <typename T, typename A, bool kAdditive>
__global__ void __launch_bounds__(kSimtWarps * 32)
    attention_weights_kernel(const AttentionParams p, const SimtArgs<A> a, const A* lse_in,
                             A* weights) {
    MHA_DYNAMIC_SMEM(smem_raw);
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    A* qs = a.scratch != nullptr
                ? a.scratch + (static_cast<int64_t>(blockIdx.x) * kSimtWarps + warp) * a.dqk
                : reinterpret_cast<A*>(smem_raw) + warp * a.dqk;
    const int64_t rows = p.batch * p.num_heads_q * p.seqlen_q;
    const int64_t lk_all = p.seqlen_k;
    const A ninf = neg_inf<A>();
    for (int64_t row = static_cast<int64_t>(blockIdx.x) * kSimtWarps + warp; row < rows;
         row += static_cast<int64_t>(gridDim.x) * kSimtWarps) {
        const RowCoords rc = row_coords(p, row);
        const int64_t b = rc.b, h = rc.h, i = rc.i, hk = rc.hk;
        const int64_t lk = valid_keys(p, b);
        const KeyRange rr = visible_keys(p, i, lk);
        const A lse = lse_in[row];
        A* w = weights + row * lk_all;
        if (lse != lse) {
            for (int64_t j = lane; j < lk_all; j += 32) w[j] = quiet_nan<A>();
            continue;
        }
        const bool any = lse != ninf && rr.lo <= rr.hi;
        if (any) load_query_row<T, A>(p, a, qs, row, b, h, i, lane);
        const T* k = p.k == nullptr ? nullptr
                                    : static_cast<const T*>(p.k) + b * p.k_stride_batch +
                                          hk * p.k_stride_head;
        const A* kp = kAdditive && any
                          ? a.k_proj + (b * p.num_heads_k + hk) * p.seqlen_k * a.dqk
                          : nullptr;
        const uint8_t* mask = mask_row(p, b, h, i);
        const A* bias = bias_row<A>(p, b, h, i);
        for (int64_t j = lane; j < lk_all; j += 32) {
            bool vis = any && j >= rr.lo && j <= rr.hi;
            if (vis && mask != nullptr) vis = mask[j * p.mask_stride_k] != 0;
            A x = 0;
            if (vis) {
                A s = score_of<T, A, kAdditive>(p, a, qs, k, kp, j);
                if (bias != nullptr) s += bias[j * p.bias_stride_k];
                x = exp_a(s - lse);
            }
            w[j] = x;
        }
        __syncwarp();
    }
}

// ------------------------------------------------------------------------------------------
// project_rows_kernel: y[r, a] = mul * sum_d x[r, d] * W[d, a], for the rows r of a
// (batch, heads, seq, dim) tensor read through strides; y is (batch*heads*seq, n_out)
// C-contiguous. With key_lengths, rows of padding keys (seq >= key_lengths[b]) are 0, unread.

template <typename T, typename A>
__global__ void project_rows_kernel(const T* x, int64_t batch, int64_t heads, int64_t seq,
                                    int64_t dim, int64_t stride_batch, int64_t stride_head,
                                    int64_t stride_seq, const A* w, int64_t n_out, A mul,
                                    const int64_t* key_lengths, A* y) {
    const int64_t total = batch * heads * seq * n_out;
    for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
         idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const int64_t c = idx % n_out;
        const int64_t r = idx / n_out;
        const int64_t j = r % seq;
        const int64_t hh = (r / seq) % heads;
        const int64_t b = r / (seq * heads);
        A acc = 0;
        if (key_lengths == nullptr || j < key_lengths[b]) {
            const T* xr = x + b * stride_batch + hh * stride_head + j * stride_seq;
            for (int64_t d = 0; d < dim; ++d) {
                acc += static_cast<A>(to_accum(xr[d])) * (w[d * n_out + c] * mul);
            }
        }
        y[idx] = acc;
    }
}

// ------------------------------------------------------------------------------------------
// Tensor-core kernel (fp16 / bf16).

struct TcArgs {
    float* lse = nullptr;  // (rows,) or nullptr
    bool vec = false;      // q/k/v rows are 16-byte aligned: cp.async; else plain loads
    // Split over keys (gridDim.y = num_splits chunks of split_size keys, a multiple of
    // kBlockN): with more than one chunk the kernel writes partial (out, lse) rows, the
    // SIMT path's layout, for attention_combine_kernel to merge by lse.
    int num_splits = 1;
    int64_t split_size = 0;
    float* part_out = nullptr;  // (splits, rows, head_dim_v)
    float* part_lse = nullptr;  // (splits, rows)
};

// The mma.sync of one storage type (ptx.cuh) and the packing of two floats into its A operand.
template <typename T>
struct MmaOp;
template <>
struct MmaOp<__half> {
    static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4],
                                               uint32_t b0, uint32_t b1) {
        mma_m16n8k16_f16(c, a, b0, b1);
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        const __half2 h = __floats2half2_rn(lo, hi);  // .x (low 16 bits) = lo
        return *reinterpret_cast<const uint32_t*>(&h);
    }
};
template <>
struct MmaOp<__nv_bfloat16> {
    static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4],
                                               uint32_t b0, uint32_t b1) {
        mma_m16n8k16_bf16(c, a, b0, b1);
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<const uint32_t*>(&h);
    }
};

// Copy rows [0, n_rows) of a (rows x dim) tile into shared memory (row pitch kPitch
// elements); source row r at src + r * stride; rows >= n_valid are written as zeros.
// Columns >= dim are left alone (zeroed once at kernel start). vec: 16-byte cp.async
// (dim % 8 == 0, aligned rows); else plain element loads.
template <typename T, int kPitch>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t stride, int n_rows,
                                          int64_t n_valid, int dim, bool vec) {
    if (vec) {
        const int chunks = dim / 8;  // 16-byte chunks per row
        for (int idx = threadIdx.x; idx < n_rows * chunks; idx += blockDim.x) {
            const int r = idx / chunks;
            const int c = idx - r * chunks;
            const bool ok = r < n_valid;
            const T* g = ok ? src + r * stride + c * 8 : src;
            cp_async_16(dst + r * kPitch + c * 8, g, ok ? 16 : 0);
        }
    } else {
        const T zero = T(0.0f);
        for (int idx = threadIdx.x; idx < n_rows * dim; idx += blockDim.x) {
            const int r = idx / dim;
            const int c = idx - r * dim;
            dst[r * kPitch + c] = r < n_valid ? src[r * stride + c] : zero;
        }
    }
}

// True when an element this thread copied with load_tile (same n_rows, dim, vec) is NaN or
// +-Inf. Called after the thread's own copies are complete (cp_async_wait), before the
// barrier: no other thread's data is read.
template <typename T, int kPitch>
__device__ __forceinline__ bool own_rows_nonfinite(const T* tile, int n_rows, int dim, bool vec) {
    // binary16: exponent 0x7c00; bfloat16: exponent 0x7f80 (all ones: Inf or NaN)
    const uint16_t exp_mask = std::is_same<T, __half>::value ? 0x7c00 : 0x7f80;
    bool bad = false;
    const int per = vec ? 8 : 1;
    const int cols = dim / per;
    for (int idx = threadIdx.x; idx < n_rows * cols; idx += blockDim.x) {
        const int r = idx / cols;
        const int c = (idx - r * cols) * per;
        for (int e = 0; e < per; ++e) {
            uint16_t bits;
            memcpy(&bits, tile + r * kPitch + c + e, 2);
            bad |= (bits & exp_mask) == exp_mask;
        }
    }
    return bad;
}

// Grid: x one block per (query tile, batch*head), heaviest (last) query tiles first; y the
// key chunk when the keys are split (TcArgs::num_splits).
// Dynamic shared memory: tc_smem_bytes<T, kHeadDim, kBlockN>() = 4 * kBlockN * (kHeadDim + 8)
// elements of T.
template <typename T, int kHeadDim, int kWarps, int kBlockN>
__global__ void __launch_bounds__(kWarps * 32)
    attention_tc_kernel(const AttentionParams p, const TcArgs args) {
    constexpr int kBlockM = 16 * kWarps;
    constexpr int kPitch = kHeadDim + 8;  // +16 bytes per row: conflict-free fragment loads
    constexpr int kSteps = kHeadDim / 16;  // k-steps of S = Q K^T
    constexpr int kTilesN = kBlockN / 8;   // n-tiles of S (8 keys each)
    constexpr int kTilesD = kHeadDim / 8;  // n-tiles of O (8 value dims each)
    static_assert(kHeadDim % 16 == 0 && kBlockN % 16 == 0, "tile shapes");
    using Mma = MmaOp<T>;

    MHA_DYNAMIC_SMEM(smem_raw);
    // Buffer b (b = 0, 1) holds K rows then V rows: K of b at k_s + b * kBuf, V at v_s + b * kBuf.
    // The Q tile sits in buffer 1 (its K and V rows) until the prefetch of tile 1.
    static_assert(kBlockM <= 2 * kBlockN, "the Q tile lives in the second K/V buffer");
    constexpr int kBuf = 2 * kBlockN * kPitch;
    T* k_s = reinterpret_cast<T*>(smem_raw);
    T* v_s = k_s + kBlockN * kPitch;
    T* q_s = k_s + kBuf;  // (kBlockM, kPitch)

    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int g = lane >> 2;  // row within the 8-row group of an mma fragment
    const int t4 = lane & 3;  // thread within the quad

    const int64_t Lq = p.seqlen_q;
    const int64_t n_qtiles = (Lq + kBlockM - 1) / kBlockM;
    const int64_t bh_count = p.batch * p.num_heads_q;
    const int64_t task = blockIdx.x;
    const int64_t qt = n_qtiles - 1 - task / bh_count;
    const int64_t bh = task % bh_count;
    const int64_t b = bh / p.num_heads_q;
    const int64_t h = bh % p.num_heads_q;
    const int64_t hk = h / (p.num_heads_q / p.num_heads_k);
    const int64_t m0 = qt * kBlockM;
    const int64_t m_last = min(m0 + kBlockM, Lq) - 1;
    const int64_t lk = valid_keys(p, b);
    const int dim = static_cast<int>(p.head_dim);
    const int dim_v = static_cast<int>(p.head_dim_v);

    // Zero the whole tile storage once: columns >= dim stay zero for the dot products.
    {
        uint4* z = reinterpret_cast<uint4*>(smem_raw);
        const int n16 = 4 * kBlockN * kPitch * static_cast<int>(sizeof(T)) / 16;
        for (int x = threadIdx.x; x < n16; x += blockDim.x) z[x] = make_uint4(0, 0, 0, 0);
    }
    __syncthreads();

    // This block's key chunk [s_lo, s_hi) (all keys unless split); every range below is
    // clipped to it, which keeps them monotone in i.
    const int split = static_cast<int>(blockIdx.y);
    const bool split_out = args.num_splits > 1;
    const int64_t s_lo = split_out ? split * args.split_size : 0;
    const int64_t s_hi = split_out ? min(lk, s_lo + args.split_size) : lk;
    auto clip = [&](KeyRange r) {
        return KeyRange{max(r.lo, s_lo), min(r.hi, s_hi - 1)};
    };

    // Key interval of the block: the ranges are monotone in i, so the first row has the
    // smallest lo and the last row the largest hi.
    const KeyRange first = clip(visible_keys(p, m0, lk));
    const KeyRange last = clip(visible_keys(p, m_last, lk));
    const int64_t j_begin = max(first.lo, int64_t(0));
    const int64_t j_end = min(last.hi + 1, lk);
    const int64_t n_tiles = j_end > j_begin ? (j_end - j_begin + kBlockN - 1) / kBlockN : 0;

    const T* q = static_cast<const T*>(p.q) + b * p.q_stride_batch + h * p.q_stride_head +
                 m0 * p.q_stride_seq;
    const T* k = static_cast<const T*>(p.k) + b * p.k_stride_batch + hk * p.k_stride_head;
    const T* v = static_cast<const T*>(p.v) + b * p.v_stride_batch + hk * p.v_stride_head;

    // Rows of this thread (fragment rows g and g + 8 of the warp's 16) and their ranges.
    const int64_t row_i[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};
    KeyRange rng[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        rng[r] = row_i[r] < Lq ? clip(visible_keys(p, row_i[r], lk)) : KeyRange{1, 0};
    }
    const uint8_t* mask_rows[2] = {nullptr, nullptr};
    const float* bias_rows[2] = {nullptr, nullptr};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (row_i[r] < Lq) {
            mask_rows[r] = mask_row(p, b, h, row_i[r]);
            bias_rows[r] = bias_row<float>(p, b, h, row_i[r]);
        }
    }
    const bool per_element = p.mask != nullptr || p.bias != nullptr;

    constexpr float kLog2e = 1.4426950408889634f;
    const float scale_log2 = static_cast<float>(p.scale) * kLog2e;
    const float ninf = neg_inf<float>();

    float o[kTilesD][4];
#pragma unroll
    for (int x = 0; x < kTilesD; ++x) o[x][0] = o[x][1] = o[x][2] = o[x][3] = 0.0f;
    float m_run[2] = {ninf, ninf};  // running max of the two rows, base-2 units
    float l_run[2] = {0.0f, 0.0f};  // this thread's share of the running sums

    if (n_tiles > 0) {
        load_tile<T, kPitch>(q_s, q, p.q_stride_seq, kBlockM, Lq - m0, dim, args.vec);
        load_tile<T, kPitch>(k_s, k + j_begin * p.k_stride_seq, p.k_stride_seq, kBlockN,
                             j_end - j_begin, dim, args.vec);
        load_tile<T, kPitch>(v_s, v + j_begin * p.v_stride_seq, p.v_stride_seq, kBlockN,
                             j_end - j_begin, dim_v, args.vec);
        cp_async_commit();
    }

    // Q into registers, then the second K buffer is free for the prefetch of tile 1.
    uint32_t qf[kSteps][4];
    if (n_tiles > 0) {
        cp_async_wait<0>();
        __syncthreads();
        const T* qw = q_s + warp * 16 * kPitch;
#pragma unroll
        for (int ks = 0; ks < kSteps; ++ks) {
            const int c = ks * 16 + t4 * 2;
            qf[ks][0] = *reinterpret_cast<const uint32_t*>(qw + g * kPitch + c);
            qf[ks][1] = *reinterpret_cast<const uint32_t*>(qw + (g + 8) * kPitch + c);
            qf[ks][2] = *reinterpret_cast<const uint32_t*>(qw + g * kPitch + c + 8);
            qf[ks][3] = *reinterpret_cast<const uint32_t*>(qw + (g + 8) * kPitch + c + 8);
        }
        __syncthreads();
    }
    for (int64_t t = 0; t < n_tiles; ++t) {
        const int64_t n0 = j_begin + t * kBlockN;
        const int buf = static_cast<int>(t & 1);
        if (t + 1 < n_tiles) {
            // Prefetch the next tile into the other buffer (free since the barrier that
            // ended iteration t - 1, or for t = 0 the one after Q went to registers).
            const int64_t n1 = n0 + kBlockN;
            T* kd = k_s + (buf ^ 1) * kBuf;
            T* vd = v_s + (buf ^ 1) * kBuf;
            load_tile<T, kPitch>(kd, k + n1 * p.k_stride_seq, p.k_stride_seq, kBlockN,
                                 j_end - n1, dim, args.vec);
            load_tile<T, kPitch>(vd, v + n1 * p.v_stride_seq, p.v_stride_seq, kBlockN,
                                 j_end - n1, dim_v, args.vec);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        // A tile strictly inside every row's interval (and free of the zero-filled keys past
        // j_end) needs no per-element check. Any other tile: is there a NaN/Inf in its V?
        const bool inside = !per_element && last.lo <= n0 && first.hi >= n0 + kBlockN - 1 &&
                            first.lo <= first.hi && last.lo <= last.hi;
        bool v_bad = false;
        if (inside) {
            __syncthreads();
        } else {
            const int rows_here = static_cast<int>(min(int64_t(kBlockN), j_end - n0));
            v_bad = __syncthreads_or(own_rows_nonfinite<T, kPitch>(
                        v_s + buf * kBuf, rows_here, dim_v, args.vec)) != 0;
        }

        // S = Q K^T for this warp's 16 rows and kBlockN keys.
        const T* kt = k_s + buf * kBuf;
        float s[kTilesN][4];
#pragma unroll
        for (int nt = 0; nt < kTilesN; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < kSteps; ++ks) {
#pragma unroll
            for (int nt = 0; nt < kTilesN; ++nt) {
                const T* kr = kt + (nt * 8 + g) * kPitch + ks * 16 + t4 * 2;
                const uint32_t b0 = *reinterpret_cast<const uint32_t*>(kr);
                const uint32_t b1 = *reinterpret_cast<const uint32_t*>(kr + 8);
                Mma::run(s[nt], qf[ks], b0, b1);
            }
        }

        // Scale to base-2 units and hide what may not be seen; hidden: bit nt * 4 + e.
        uint32_t hidden = 0;
        if (inside) {
#pragma unroll
            for (int nt = 0; nt < kTilesN; ++nt) {
#pragma unroll
                for (int e = 0; e < 4; ++e) s[nt][e] *= scale_log2;
            }
        } else {
#pragma unroll
            for (int nt = 0; nt < kTilesN; ++nt) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int r = e >> 1;
                    const int64_t j = n0 + nt * 8 + t4 * 2 + (e & 1);
                    bool vis = j >= rng[r].lo && j <= rng[r].hi;  // also j < j_end <= lk
                    if (vis && mask_rows[r] != nullptr) {
                        vis = mask_rows[r][j * p.mask_stride_k] != 0;
                    }
                    float x = ninf;
                    if (vis) {
                        x = s[nt][e] * scale_log2;
                        if (bias_rows[r] != nullptr) x += bias_rows[r][j * p.bias_stride_k] * kLog2e;
                    } else {
                        hidden |= 1u << (nt * 4 + e);
                    }
                    s[nt][e] = x;
                }
            }
        }

        // Online softmax; each row is shared by the 4 threads of a quad.
        float alpha[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = ninf;
#pragma unroll
            for (int nt = 0; nt < kTilesN; ++nt) {
                mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
            }
            mx = quad_max(mx);
            const float m_new = fmaxf(m_run[r], mx);
            // Nothing visible yet: subtract 0 (exp2(-inf) = 0, a NaN score stays NaN).
            const float m_use = m_new == ninf ? 0.0f : m_new;
            alpha[r] = exp2f(m_run[r] - m_use);
            m_run[r] = m_new;
            float sum = 0.0f;
#pragma unroll
            for (int nt = 0; nt < kTilesN; ++nt) {
                s[nt][2 * r] = exp2f(s[nt][2 * r] - m_use);
                s[nt][2 * r + 1] = exp2f(s[nt][2 * r + 1] - m_use);
                sum += s[nt][2 * r] + s[nt][2 * r + 1];
            }
            l_run[r] = l_run[r] * alpha[r] + sum;
        }
#pragma unroll
        for (int x = 0; x < kTilesD; ++x) {
            o[x][0] *= alpha[0];
            o[x][1] *= alpha[0];
            o[x][2] *= alpha[1];
            o[x][3] *= alpha[1];
        }

        // O += P V: P (16 x kBlockN) from the S accumulators, V fragments by ldmatrix.trans.
        const T* vt = v_s + buf * kBuf;
        if (v_bad) {
            // A NaN/Inf in this V tile: lane by lane, so that keys hidden from a row (P = 0)
            // never reach it. Key j's P is in lane g * 4 + (j % 8) / 2, s[j / 8][j % 2 + 2 r].
            for (int j = 0; j < kBlockN; ++j) {
                const int src = g * 4 + ((j & 7) >> 1);
                float mine0 = 0.0f, mine1 = 0.0f;
#pragma unroll
                for (int nt = 0; nt < kTilesN; ++nt) {
                    if (nt == (j >> 3)) {
                        mine0 = (j & 1) ? s[nt][1] : s[nt][0];
                        mine1 = (j & 1) ? s[nt][3] : s[nt][2];
                    }
                }
                const float p0 = warp_shfl(mine0, src);
                const float p1 = warp_shfl(mine1, src);
                const uint32_t hb = warp_shfl(hidden, src);
                const int bit = (j >> 3) * 4 + (j & 1);
                const bool see0 = ((hb >> bit) & 1u) == 0;
                const bool see1 = ((hb >> (bit + 2)) & 1u) == 0;
                const T* vr = vt + j * kPitch;
#pragma unroll
                for (int x = 0; x < kTilesD; ++x) {
                    const int c = x * 8 + t4 * 2;
                    const float v0 = to_accum(vr[c]);
                    const float v1 = to_accum(vr[c + 1]);
                    if (see0) {
                        o[x][0] += p0 * v0;
                        o[x][1] += p0 * v1;
                    }
                    if (see1) {
                        o[x][2] += p1 * v0;
                        o[x][3] += p1 * v1;
                    }
                }
            }
        }
#pragma unroll
        for (int kk = 0; kk < (v_bad ? 0 : kBlockN / 16); ++kk) {
            uint32_t pa[4];
            pa[0] = Mma::pack(s[2 * kk][0], s[2 * kk][1]);
            pa[1] = Mma::pack(s[2 * kk][2], s[2 * kk][3]);
            pa[2] = Mma::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            pa[3] = Mma::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
            // Lane l addresses row (kk*16 + ((l>>3)&1)*8 + (l&7)), column (l>>4)*8 of a
            // 16-dim block: matrices (keys 0-7, dims 0-7), (keys 8-15, dims 0-7),
            // (keys 0-7, dims 8-15), (keys 8-15, dims 8-15).
            const T* vrow = vt + (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * kPitch +
                            (lane >> 4) * 8;
#pragma unroll
            for (int nv = 0; nv < kHeadDim / 16; ++nv) {
                uint32_t vb[4];
                ldmatrix_x4_trans(vb, vrow + nv * 16);
                Mma::run(o[2 * nv], pa, vb[0], vb[1]);
                Mma::run(o[2 * nv + 1], pa, vb[2], vb[3]);
            }
        }
        __syncthreads();  // every warp is done with buffer buf before it is refilled
    }

    // Finalise: out = O / l; empty rows 0 with lse -inf; NaN sums give NaN rows. A key
    // chunk writes the same as its partial row (float) for the combine kernel.
    constexpr float kLn2 = 0.6931471805599453f;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float l = l_run[r];
        l = quad_sum(l);
        const int64_t i = row_i[r];
        if (i >= Lq) continue;
        const bool empty = l == 0.0f;
        const float inv = empty ? 0.0f : 1.0f / l;
        if (split_out) {
            const int64_t row = (b * p.num_heads_q + h) * Lq + i;
            const int64_t part = static_cast<int64_t>(split) * p.batch * p.num_heads_q * Lq + row;
            float* po = args.part_out + part * dim_v;
#pragma unroll
            for (int x = 0; x < kTilesD; ++x) {
                const int c = x * 8 + t4 * 2;
                if (c < dim_v) po[c] = empty ? 0.0f : o[x][2 * r] * inv;
                if (c + 1 < dim_v) po[c + 1] = empty ? 0.0f : o[x][2 * r + 1] * inv;
            }
            if (t4 == 0) args.part_lse[part] = empty ? ninf : (m_run[r] + log2f(l)) * kLn2;
            continue;
        }
        T* out = static_cast<T*>(p.out) + b * p.out_stride_batch + h * p.out_stride_head +
                 i * p.out_stride_seq;
#pragma unroll
        for (int x = 0; x < kTilesD; ++x) {
            const int c = x * 8 + t4 * 2;
            if (c < dim_v) store_out(out + c, empty ? 0.0f : o[x][2 * r] * inv);
            if (c + 1 < dim_v) store_out(out + c + 1, empty ? 0.0f : o[x][2 * r + 1] * inv);
        }
        if (args.lse != nullptr && t4 == 0) {
            args.lse[(b * p.num_heads_q + h) * Lq + i] =
                empty ? ninf : (m_run[r] + log2f(l)) * kLn2;
        }
    }
}

// ------------------------------------------------------------------------------------------
// Launchers of the tensor-core kernel (attention_tc.cu). p holds device pointers.

// Dynamic shared memory of attention_tc_kernel: two K and two V buffers of kBlockN rows (the
// Q tile passes through the second pair).
template <typename T, int kHeadDim, int kBlockN>
constexpr size_t tc_smem_bytes() {
    return static_cast<size_t>(4 * kBlockN) * (kHeadDim + 8) * sizeof(T);
}

// The largest head dimension max(D, Dv) the tensor-core kernel covers.
constexpr int64_t kTcMaxHeadDim = 256;

// Launches attention_tc_kernel for p.dtype (fp16/bf16) and max(D, Dv) <= kTcMaxHeadDim.
// Keys per tile for a head dimension (registers: the O accumulators grow with it).
constexpr int tc_block_n(int head_dim) { return head_dim > 128 ? 32 : 64; }
// Throws std::runtime_error on launch failure.
void launch_attention_tc(const AttentionParams& p, const TcArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace mha
