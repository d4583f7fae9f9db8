// Micro-kernels: the register-blocked GEMM of the score and P.V tiles, the four-key dot
// product of the GEMV / decode paths and the P.V row kernels. An instruction set with its own
// micro-kernels (an AMX tile GEMM, an AVX-512 register block) adds a header like this one.
// Part of the CPU kernel compiled once per instruction set (see attention_cpu_isa.cpp):
// include only from there, inside namespace mha::MHA_CPU_NS, no STL templates.
#pragma once

#include "cpu/kernel/vec.h"
#include "cpu/kernel/tile.h"

namespace mha {
namespace MHA_CPU_NS {

constexpr int kMr = 6;  // row block of the tile loop's diagonal tiles (and of the AVX2 GEMM)

// Register blocks of the GEMM by vector width: MR rows x NV vectors of accumulators.
//   32-byte vectors (AVX2, 16 registers): 6 x 2 (12 accumulators + 2 loads), tail 6 x 1.
//   64-byte vectors (AVX-512, 32 registers): 6 x 4 (24 accumulators + 4 loads; the A element
//   is an embedded broadcast of the FMA), then 12 x 2 and 12 x 1 for narrower tails.
template <int NV>
struct GemmBlock {
    static constexpr int kRows = MHA_CPU_VEC_BYTES >= 64 ? (NV >= 4 ? 6 : 12) : 6;
};
constexpr int kGemmWideNv = MHA_CPU_VEC_BYTES >= 64 ? 4 : 2;

// C[MR x NV*W] (+)= A[MR x K] . B[K x NV*W] with W the vector width. A[r][kk] is
// a[r * a_rs + kk * a_cs] (either operand order of a row-major matrix), B and C row-major.
template <typename A, int MR, int NV, bool kAccumulate>
inline void gemm_micro(int64_t K, const A* __restrict a, int64_t a_rs, int64_t a_cs,
                       const A* __restrict b, int64_t ldb, A* __restrict c, int64_t ldc) {
    using V = vec_t<A>;
    constexpr int W = Vec<A>::kWidth;
    V acc[MR][NV];
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
        for (int n = 0; n < NV; ++n) acc[r][n] = kAccumulate ? vload(c + r * ldc + n * W) : V{};
    }
    for (int64_t kk = 0; kk < K; ++kk) {
        V bv[NV];
#pragma GCC unroll 4
        for (int n = 0; n < NV; ++n) bv[n] = vload(b + kk * ldb + n * W);
        const A* ak = a + kk * a_cs;
#pragma GCC unroll 12
        for (int r = 0; r < MR; ++r) {
            const A ar = ak[r * a_rs];
#pragma GCC unroll 4
            for (int n = 0; n < NV; ++n) acc[r][n] += ar * bv[n];
        }
    }
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
        for (int n = 0; n < NV; ++n) vstore(c + r * ldc + n * W, acc[r][n]);
    }
}

// The last M < MR rows of a column block: one micro-kernel of exactly that many rows.
template <typename A, int MR, int NV, bool kAccumulate>
inline void gemm_tail(int64_t m, int64_t K, const A* a, int64_t a_rs, int64_t a_cs, const A* b,
                      int64_t ldb, A* c, int64_t ldc) {
    if constexpr (MR > 0) {
        if (m == MR) {
            gemm_micro<A, MR, NV, kAccumulate>(K, a, a_rs, a_cs, b, ldb, c, ldc);
        } else {
            gemm_tail<A, MR - 1, NV, kAccumulate>(m, K, a, a_rs, a_cs, b, ldb, c, ldc);
        }
    }
}

// All rows of one column block of NV vectors.
template <typename A, int NV, bool kAccumulate>
inline void gemm_rows(int64_t M, int64_t K, const A* a, int64_t a_rs, int64_t a_cs,
                      const A* b, int64_t ldb, A* c, int64_t ldc) {
    constexpr int MR = GemmBlock<NV>::kRows;
    int64_t i = 0;
    for (; i + MR <= M; i += MR) {
        gemm_micro<A, MR, NV, kAccumulate>(K, a + i * a_rs, a_rs, a_cs, b, ldb, c + i * ldc, ldc);
    }
    if (i < M) {
        gemm_tail<A, MR - 1, NV, kAccumulate>(M - i, K, a + i * a_rs, a_rs, a_cs, b, ldb,
                                              c + i * ldc, ldc);
    }
}

// C[M x N] (+)= A[M x K] . B[K x N], N a multiple of the vector width; A strided as above.
template <typename A, bool kAccumulate>
void gemm(int64_t M, int64_t N, int64_t K, const A* a, int64_t a_rs, int64_t a_cs, const A* b,
          int64_t ldb, A* c, int64_t ldc) {
    constexpr int W = Vec<A>::kWidth;
    constexpr int NW = kGemmWideNv;
    int64_t j = 0;
    for (; j + NW * W <= N; j += NW * W) {
        gemm_rows<A, NW, kAccumulate>(M, K, a, a_rs, a_cs, b + j, ldb, c + j, ldc);
    }
    if constexpr (NW > 2) {
        if (j + 2 * W <= N) {
            gemm_rows<A, 2, kAccumulate>(M, K, a, a_rs, a_cs, b + j, ldb, c + j, ldc);
            j += 2 * W;
        }
    }
    if (j < N) gemm_rows<A, 1, kAccumulate>(M, K, a, a_rs, a_cs, b + j, ldb, c + j, ldc);
}

// t[x] = q . k_x (dk long) for four key rows: full vectors, then the tail of a dk that is
// not a multiple of the vector width.
template <typename A>
inline void dot4(const A* qr, const A* const kr[4], A t[4], int64_t dk) {
    constexpr int64_t kW = Vec<A>::kWidth;
    using V = vec_t<A>;
    const int64_t dkv = dk / kW * kW;
    V a0{}, a1{}, a2{}, a3{};
    for (int64_t d = 0; d < dkv; d += kW) {
        const V qv = vload(qr + d);
        a0 += qv * vload(kr[0] + d);
        a1 += qv * vload(kr[1] + d);
        a2 += qv * vload(kr[2] + d);
        a3 += qv * vload(kr[3] + d);
    }
    for (int x = 0; x < 4; ++x) t[x] = 0;
    for (int w = 0; w < kW; ++w) {
        t[0] += a0[w];
        t[1] += a1[w];
        t[2] += a2[w];
        t[3] += a3[w];
    }
    for (int64_t d = dkv; d < dk; ++d) {
        for (int x = 0; x < 4; ++x) t[x] += qr[d] * kr[x][d];
    }
}

// t[x] = the sum of a_x's lanes, for four vectors at once by a shuffle tree: the halves of
// (a0, a1) and (a2, a3) are added pairwise, then the quarters of both, then what is left of
// each quarter (13 operations for 16 lanes instead of 64 lane extractions).
template <typename A>
inline void hsum4(vec_t<A> a0, vec_t<A> a1, vec_t<A> a2, vec_t<A> a3, A t[4]) {
    using V = vec_t<A>;
    using I = typename Vec<A>::itype;
    constexpr int kW = Vec<A>::kWidth;
    static_assert(kW >= 4 && (kW & (kW - 1)) == 0, "hsum4: a power-of-two width of >= 4 lanes");
    constexpr int h = kW / 2, q = kW / 4;
    I lo, hi;
    for (int w = 0; w < kW; ++w) {
        lo[w] = w < h ? w : kW + (w - h);  // a's lanes [0, h), then b's [0, h)
        hi[w] = lo[w] + h;
    }
    const V b0 = __builtin_shuffle(a0, a1, lo) + __builtin_shuffle(a0, a1, hi);
    const V b1 = __builtin_shuffle(a2, a3, lo) + __builtin_shuffle(a2, a3, hi);
    // b0 = [a0 on h lanes | a1 on h lanes], b1 likewise: now group g of c holds a_g on q lanes.
    I lo2, hi2;
    for (int w = 0; w < kW; ++w) {
        const int g = w / q, o = w % q;
        const int base = (g >= 2 ? kW : 0) + (g % 2) * h;
        lo2[w] = base + o;
        hi2[w] = base + q + o;
    }
    V c = __builtin_shuffle(b0, b1, lo2) + __builtin_shuffle(b0, b1, hi2);
    for (int step = q / 2; step >= 1; step /= 2) {
        I m;
        for (int w = 0; w < kW; ++w) m[w] = w % q + step < q ? w + step : w;
        c += __builtin_shuffle(c, m);
    }
    for (int x = 0; x < 4; ++x) t[x] = c[x * q];
}

// t[x] = q_x . k_x (dk long) for four (query row, key row) pairs: dot4 with a query row per
// lane (the head-spanning decode, decode_span.h, pairs each row with its own head's key).
// The lanes are summed by hsum4's tree (not dot4's order: the results may differ in the last
// bits).
template <typename A>
inline void dot4_pairs(const A* const qr[4], const A* const kr[4], A t[4], int64_t dk) {
    constexpr int64_t kW = Vec<A>::kWidth;
    using V = vec_t<A>;
    const int64_t dkv = dk / kW * kW;
    V a0{}, a1{}, a2{}, a3{};
    for (int64_t d = 0; d < dkv; d += kW) {
        a0 += vload(qr[0] + d) * vload(kr[0] + d);
        a1 += vload(qr[1] + d) * vload(kr[1] + d);
        a2 += vload(qr[2] + d) * vload(kr[2] + d);
        a3 += vload(qr[3] + d) * vload(kr[3] + d);
    }
    hsum4(a0, a1, a2, a3, t);
    for (int64_t d = dkv; d < dk; ++d) {
        for (int x = 0; x < 4; ++x) t[x] += qr[x][d] * kr[x][d];
    }
}

// True when the nk value rows (dvp wide, zero padded) hold no Inf or NaN.
template <typename A>
inline bool all_finite(const A* v_rows, int64_t nk, int64_t ldv, int64_t dvp) {
    constexpr int64_t kW = Vec<A>::kWidth;
    using V = vec_t<A>;
    V z{};
    for (int64_t j = 0; j < nk; ++j) {
        for (int64_t d = 0; d < dvp; d += kW) z += vload(v_rows + j * ldv + d) * A(0);
    }
    for (int w = 0; w < kW; ++w) {
        if (z[w] != 0) return false;  // inf * 0 and nan * 0 are nan
    }
    return true;
}

// acc += P . V for a few rows (decode): each V row is read once, front to back. The GEMM
// would sweep V in 64-byte column strips, each a strided pass that misses in cache.
template <typename A>
inline void pv_stream(const TileBuffers<A>& buf, int64_t r0, int64_t nr, int64_t nqc, int64_t nk,
                      const A* v_rows, int64_t ldv, int64_t dvp) {
    constexpr int64_t kW = Vec<A>::kWidth;
    using V = vec_t<A>;
    for (int64_t r = r0; r < r0 + nr; ++r) {
        A* ar = buf.acc + r * dvp;
        const A* pr = buf.st + r;  // p_j = pr[j * nqc]
        int64_t j = 0;
        for (; j + 4 <= nk; j += 4) {  // four V rows per pass over the accumulator row
            const V p0 = vbroadcast<A>(pr[j * nqc]), p1 = vbroadcast<A>(pr[(j + 1) * nqc]),
                    p2 = vbroadcast<A>(pr[(j + 2) * nqc]), p3 = vbroadcast<A>(pr[(j + 3) * nqc]);
            const A* v0 = v_rows + j * ldv;
            const A* v1 = v0 + ldv;
            const A* v2 = v1 + ldv;
            const A* v3 = v2 + ldv;
            for (int64_t d = 0; d < dvp; d += kW) {
                V a = vload(ar + d);
                a += p0 * vload(v0 + d);
                a += p1 * vload(v1 + d);
                a += p2 * vload(v2 + d);
                a += p3 * vload(v3 + d);
                vstore(ar + d, a);
            }
        }
        for (; j < nk; ++j) {
            const A pj = pr[j * nqc];
            const A* vj = v_rows + j * ldv;
            for (int64_t d = 0; d < dvp; d += kW) vstore(ar + d, vload(ar + d) + pj * vload(vj + d));
        }
    }
}

// acc += P . V skipping p = 0, so a hidden Inf/NaN value never reaches a row.
template <typename A>
inline void pv_skip_zero(const TileBuffers<A>& buf, int64_t r0, int64_t nr, int64_t nqc,
                         int64_t nk, const A* v_rows, int64_t ldv, int64_t dvp) {
    for (int64_t r = r0; r < r0 + nr; ++r) {
        A* ar = buf.acc + r * dvp;
        for (int64_t j = 0; j < nk; ++j) {
            const A pj = buf.st[j * nqc + r];
            if (pj == 0) continue;
            const A* vj = v_rows + j * ldv;
            for (int64_t d = 0; d < dvp; ++d) ar[d] += pj * vj[d];
        }
    }
}

}  // namespace MHA_CPU_NS
}  // namespace mha
