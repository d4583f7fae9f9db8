// Merge room of the CPU kernel: partial attention results over disjoint key shards combined
// by their lse (SPEC 6.1; the math in merge_params.h):
//   lse = m + log(sum_p exp(lse_p - m)),  out = sum_p exp(lse_p - lse) out_p,  m = max_p lse_p
//
// Memory-bound: per row it reads every part's out row (Dv elements) and lse and writes one out
// row and lse, so 2 parts of float32 at Dv = 128 move 3 * 512 bytes (+12 of lse) per row.
// Versions:
//   merge_rows   blocks of kMergeRows rows, contiguous per thread (static schedule). For a
//                block, the lse arrays alone give the max, the weights (vexp, vectorised
//                across rows) and the sums; then each row streams its parts' rows once,
//                register-blocked (4 vectors of accum_t across all parts), and the merged row
//                goes out with non-temporal stores when the output is large (no
//                read-for-ownership of the destination, as memcpy does for big copies).
//                When the output and every part hold their rows one after another and a
//                block has no empty / NaN row, the block runs as one flat stretch of
//                nr * Dv elements (merge_block_flat), aligned to the vector whatever the row
//                boundaries; otherwise row by row, with a masked head up to the first
//                aligned vector. float16 / bfloat16 convert through a row buffer in float.
// Part of the CPU kernel compiled once per instruction set (see attention_cpu_isa.cpp):
// include only from there, inside namespace mha::MHA_CPU_NS, no STL templates.
#pragma once

#include "cpu/kernel/common.h"
#include "cpu/kernel/convert.h"
#include "cpu/kernel/vec.h"
#include "merge_params.h"

namespace mha {
namespace MHA_CPU_NS {

// Rows whose weights are computed together (a multiple of every vector width).
constexpr int64_t kMergeRows = 64;
// Below this many elements read, one thread (an OpenMP team costs more than the work).
constexpr int64_t kMergeSerialElems = int64_t{1} << 16;
// Outputs of at least this many bytes are written with non-temporal stores: they do not fit
// the caches anyway, and a plain store would first read each destination line.
constexpr int64_t kMergeStreamBytes = int64_t{4} << 20;

// Non-temporal store of one vector to a vector-aligned address (x86 with AVX / AVX-512 only;
// kMergeCanStream says whether it exists).
#if defined(__AVX512F__) && MHA_CPU_VEC_BYTES == 64
constexpr bool kMergeCanStream = true;
inline void vstream(float* p, vec_t<float> v) { _mm512_stream_ps(p, (__m512)v); }
inline void vstream(double* p, vec_t<double> v) { _mm512_stream_pd(p, (__m512d)v); }
#elif defined(__AVX__) && MHA_CPU_VEC_BYTES == 32
constexpr bool kMergeCanStream = true;
inline void vstream(float* p, vec_t<float> v) { _mm256_stream_ps(p, (__m256)v); }
inline void vstream(double* p, vec_t<double> v) { _mm256_stream_pd(p, (__m256d)v); }
#else
constexpr bool kMergeCanStream = false;
template <typename A>
inline void vstream(A* p, vec_t<A> v) {
    vstore(p, v);
}
#endif

template <typename A>
inline void merge_put(A* p, vec_t<A> v, bool stream) {
    if (stream) {
        vstream(p, v);
    } else {
        vstore(p, v);
    }
}

// dst[d] = sum_q w[q] * src[q][d] for d in [d0, d1) over the nw parts, from 0 in part order;
// fewer elements than a vector (a row's unaligned head, its tail). AVX-512: one masked vector.
inline void merge_part_vector(const float* const* src, const float* w, int64_t nw, float* dst,
                              int64_t d0, int64_t d1) {
#if defined(__AVX512F__) && MHA_CPU_VEC_BYTES == 64
    if (d1 <= d0) return;
    const __mmask16 k = static_cast<__mmask16>((1u << (d1 - d0)) - 1u);
    __m512 a = _mm512_setzero_ps();
    for (int64_t q = 0; q < nw; ++q) {
        a = _mm512_fmadd_ps(_mm512_set1_ps(w[q]), _mm512_maskz_loadu_ps(k, src[q] + d0), a);
    }
    _mm512_mask_storeu_ps(dst + d0, k, a);
#else
    for (int64_t d = d0; d < d1; ++d) {
        float a = 0;
        for (int64_t q = 0; q < nw; ++q) a += w[q] * src[q][d];
        dst[d] = a;
    }
#endif
}
inline void merge_part_vector(const double* const* src, const double* w, int64_t nw, double* dst,
                              int64_t d0, int64_t d1) {
#if defined(__AVX512F__) && MHA_CPU_VEC_BYTES == 64
    if (d1 <= d0) return;
    const __mmask8 k = static_cast<__mmask8>((1u << (d1 - d0)) - 1u);
    __m512d a = _mm512_setzero_pd();
    for (int64_t q = 0; q < nw; ++q) {
        a = _mm512_fmadd_pd(_mm512_set1_pd(w[q]), _mm512_maskz_loadu_pd(k, src[q] + d0), a);
    }
    _mm512_mask_storeu_pd(dst + d0, k, a);
#else
    for (int64_t d = d0; d < d1; ++d) {
        double a = 0;
        for (int64_t q = 0; q < nw; ++q) a += w[q] * src[q][d];
        dst[d] = a;
    }
#endif
}

// The whole row. stream: the vector stores are non-temporal, so they start at the first
// vector-aligned element of dst (the elements before it, and the tail, go out as plain
// stores: one partly written line at each end of the row).
template <typename A>
inline void merge_row_same(const A* const* src, const A* w, int64_t nw, A* dst, int64_t dv,
                           bool stream) {
    using V = vec_t<A>;
    constexpr int64_t kW = Vec<A>::kWidth;
    int64_t d = 0;
    if (stream) {
        const uintptr_t at = reinterpret_cast<uintptr_t>(dst);
        if (at % sizeof(A) != 0) {
            stream = false;
        } else {
            d = min_of<int64_t>(dv, static_cast<int64_t>((MHA_CPU_VEC_BYTES - at % MHA_CPU_VEC_BYTES) %
                                                         MHA_CPU_VEC_BYTES / sizeof(A)));
            merge_part_vector(src, w, nw, dst, 0, d);
        }
    }
    for (; d + 4 * kW <= dv; d += 4 * kW) {
        V a0{}, a1{}, a2{}, a3{};
        for (int64_t q = 0; q < nw; ++q) {
            const V wq = vbroadcast(w[q]);
            const A* s = src[q] + d;
            a0 += wq * vload(s);
            a1 += wq * vload(s + kW);
            a2 += wq * vload(s + 2 * kW);
            a3 += wq * vload(s + 3 * kW);
        }
        merge_put(dst + d, a0, stream);
        merge_put(dst + d + kW, a1, stream);
        merge_put(dst + d + 2 * kW, a2, stream);
        merge_put(dst + d + 3 * kW, a3, stream);
    }
    for (; d + kW <= dv; d += kW) {
        V a{};
        for (int64_t q = 0; q < nw; ++q) a += vbroadcast(w[q]) * vload(src[q] + d);
        merge_put(dst + d, a, stream);
    }
    merge_part_vector(src, w, nw, dst, d, dv);
}

template <typename A>
struct MergeLane;
template <>
struct MergeLane<float> {
    typedef int32_t type;
};
template <>
struct MergeLane<double> {
    typedef int64_t type;
};

// A block of nr whole rows that are one run of nr * dv elements in the output and in every
// part (C-contiguous rows), none of them empty or NaN: the run is written in vector-aligned
// non-temporal pieces whatever the row boundaries, so a result that starts off the vector
// boundary (np.empty gives 16 bytes past one) needs no partial line per row; a vector that
// straddles two rows takes each lane's row weight. w: the normalised weights [part][row].
template <typename A>
inline void merge_block_flat(const A* const* part, const A* w, int64_t n, int64_t ldw, A* dst,
                             int64_t nr, int64_t dv, A* wr) {
    using V = vec_t<A>;
    using VI = typename Vec<A>::itype;
    constexpr int64_t kW = Vec<A>::kWidth;
    const int64_t total = nr * dv;
    const uintptr_t at = reinterpret_cast<uintptr_t>(dst);
    const int64_t head = min_of<int64_t>(
        total, static_cast<int64_t>((MHA_CPU_VEC_BYTES - at % MHA_CPU_VEC_BYTES) % MHA_CPU_VEC_BYTES /
                                    sizeof(A)));
    for (int64_t q = 0; q < n; ++q) wr[q] = w[q * ldw];
    merge_part_vector(part, wr, n, dst, 0, head);  // inside row 0 (head < kW <= dv)
    VI lane{};
    for (int64_t x = 0; x < kW; ++x) lane[x] = static_cast<typename MergeLane<A>::type>(x);
    int64_t e = head, row = 0;
    for (; e + kW <= total; e += kW) {
        if (e >= (row + 1) * dv) ++row;  // kW <= dv: at most one row per vector
        const int64_t bound = (row + 1) * dv;
        V acc{};
        if (e + kW <= bound) {
            for (int64_t q = 0; q < n; ++q) acc += vbroadcast(w[q * ldw + row]) * vload(part[q] + e);
        } else {
            const VI first = lane < static_cast<typename MergeLane<A>::type>(bound - e);
            for (int64_t q = 0; q < n; ++q) {
                const V wq = first ? vbroadcast(w[q * ldw + row]) : vbroadcast(w[q * ldw + row + 1]);
                acc += wq * vload(part[q] + e);
            }
        }
        vstream(dst + e, acc);
    }
    if (e < total) {  // inside the last row (total is a row end, total - e < kW <= dv)
        for (int64_t q = 0; q < n; ++q) wr[q] = w[q * ldw + nr - 1];
        merge_part_vector(part, wr, n, dst, e, total);
    }
}

// Whether (batch, head, seq) strides lay the rows out one after another, dv apart (an axis
// of size 1 may have any stride).
inline bool merge_rows_flat(int64_t sb, int64_t sh, int64_t sl, int64_t B, int64_t H, int64_t L,
                            int64_t dv) {
    return (L == 1 || sl == dv) && (H == 1 || sh == L * dv) && (B == 1 || sb == H * L * dv);
}

// float16 / bfloat16: each part's row converted and weighted into tmp, summed into acc.
template <typename T, typename A>
inline void merge_row_convert(const T* const* src, const A* w, int64_t nw, T* dst, int64_t dv,
                              A* acc, A* tmp) {
    for (int64_t d = 0; d < dv; ++d) acc[d] = 0;
    for (int64_t q = 0; q < nw; ++q) {
        load_row(src[q], tmp, dv, w[q]);
        for (int64_t d = 0; d < dv; ++d) acc[d] += tmp[d];
    }
    store_row(acc, dst, dv, A(1));
}

template <typename T, typename A>
inline void merge_row(const T* const* src, const A* w, int64_t nw, T* dst, int64_t dv,
                      bool stream, A* acc, A* tmp) {
    merge_row_convert(src, w, nw, dst, dv, acc, tmp);
}
template <>
inline void merge_row<float, float>(const float* const* src, const float* w, int64_t nw,
                                    float* dst, int64_t dv, bool stream, float*, float*) {
    merge_row_same(src, w, nw, dst, dv, stream);
}
template <>
inline void merge_row<double, double>(const double* const* src, const double* w, int64_t nw,
                                      double* dst, int64_t dv, bool stream, double*, double*) {
    merge_row_same(src, w, nw, dst, dv, stream);
}

template <typename T, typename A>
inline void merge_flat(const T* const*, const A*, int64_t, int64_t, T*, int64_t, int64_t, A*) {}
template <>
inline void merge_flat<float, float>(const float* const* part, const float* w, int64_t n,
                                     int64_t ldw, float* dst, int64_t nr, int64_t dv, float* wr) {
    merge_block_flat(part, w, n, ldw, dst, nr, dv, wr);
}
template <>
inline void merge_flat<double, double>(const double* const* part, const double* w, int64_t n,
                                       int64_t ldw, double* dst, int64_t nr, int64_t dv,
                                       double* wr) {
    merge_block_flat(part, w, n, ldw, dst, nr, dv, wr);
}

template <typename T>
inline void fill_row(T* dst, int64_t dv, float x) {
    for (int64_t d = 0; d < dv; ++d) store_row(&x, dst + d, 1, 1.0f);
}
template <>
inline void fill_row<float>(float* dst, int64_t dv, float x) {
    for (int64_t d = 0; d < dv; ++d) dst[d] = x;
}
inline void fill_row(double* dst, int64_t dv, double x) {
    for (int64_t d = 0; d < dv; ++d) dst[d] = x;
}

// (b, h, i) of row r and its successor.
struct MergeRowIndex {
    int64_t b, h, i;
    void next(int64_t heads, int64_t len) {
        if (++i == len) {
            i = 0;
            if (++h == heads) {
                h = 0;
                ++b;
            }
        }
    }
};

template <typename T, typename A>
void merge_rows(const MergeParams& p) {
    using V = vec_t<A>;
    using VI = typename Vec<A>::itype;
    constexpr int64_t kW = Vec<A>::kWidth;
    constexpr int64_t kR = kMergeRows;
    const int64_t L = p.seqlen, H = p.num_heads;
    const int64_t rows = p.batch * H * L;
    const int64_t n = p.num_parts;
    const int64_t dv = p.head_dim;
    if (rows == 0) return;
    const bool parallel = rows > 1 && rows * (dv + 1) * n > kMergeSerialElems;
    int threads = p.num_threads > 0 ? p.num_threads : omp_get_max_threads();
    if (!parallel) threads = 1;
    constexpr bool same = sizeof(T) == sizeof(A);  // float / double: no conversion
    const bool stream = kMergeCanStream && same && dv >= 4 * kW &&
                        rows * dv * static_cast<int64_t>(sizeof(T)) >= kMergeStreamBytes;
    // Per thread: lse and weights [part][row of the block], max and sum per row, the row's
    // part pointers and weights, two rows of accum_t (conversion only).
    const int64_t per_thread =
        Scratch::bytes_for<A>({n * kR, n * kR, kR, kR, n, dv > 0 ? dv : 1, dv > 0 ? dv : 1}) +
        Scratch::bytes_for<const T*>({n});
    Scratch scratch(per_thread * threads);
    if (!scratch.ok()) throw_bad_alloc(per_thread * threads);
    char* const scratch_base = scratch.take<char>(per_thread * threads);
    const int64_t blocks = (rows + kR - 1) / kR;
    const A neg_inf = -std::numeric_limits<A>::infinity();
    const A nan = std::numeric_limits<A>::quiet_NaN();
    T* const out = static_cast<T*>(p.out);
    A* const lse_out = static_cast<A*>(p.lse);
    // Every array lays its rows out one after another: blocks may run as one flat stretch.
    bool flat = stream && merge_rows_flat(p.out_stride_batch, p.out_stride_head, p.out_stride_seq,
                                          p.batch, H, L, dv);
    for (int64_t q = 0; q < n && flat; ++q) {
        const int64_t* s = p.out_strides + 3 * q;
        flat = merge_rows_flat(s[0], s[1], s[2], p.batch, H, L, dv);
    }
#pragma omp parallel num_threads(threads) if (parallel)
    {
        char* base = scratch_base + per_thread * static_cast<int64_t>(omp_get_thread_num());
        auto take = [&](int64_t count, int64_t size) {
            char* at = base;
            base += round_up(count * size, 64);
            return at;
        };
        A* lw = reinterpret_cast<A*>(take(n * kR, sizeof(A)));   // lse_q of the block's rows
        A* ew = reinterpret_cast<A*>(take(n * kR, sizeof(A)));   // exp(lse_q - m)
        A* mx = reinterpret_cast<A*>(take(kR, sizeof(A)));       // m, NaN for a NaN row
        A* tot = reinterpret_cast<A*>(take(kR, sizeof(A)));      // sum_q exp(lse_q - m)
        A* wr = reinterpret_cast<A*>(take(n, sizeof(A)));
        A* acc = reinterpret_cast<A*>(take(dv > 0 ? dv : 1, sizeof(A)));
        A* tmp = reinterpret_cast<A*>(take(dv > 0 ? dv : 1, sizeof(A)));
        const T** src = reinterpret_cast<const T**>(take(n, sizeof(const T*)));
#pragma omp for schedule(static) nowait
        for (int64_t blk = 0; blk < blocks; ++blk) {
            const int64_t r0 = blk * kR, nr = min_of(kR, rows - r0);
            const MergeRowIndex first{r0 / (L * H), (r0 / L) % H, r0 % L};
            for (int64_t q = 0; q < n; ++q) {
                const A* l = static_cast<const A*>(p.lses[q]);
                const int64_t* s = p.lse_strides + 3 * q;
                A* dstq = lw + q * kR;
                MergeRowIndex x = first;
                for (int64_t rr = 0; rr < nr; ++rr, x.next(H, L)) {
                    dstq[rr] = l[x.b * s[0] + x.h * s[1] + x.i * s[2]];
                }
                for (int64_t rr = nr; rr < kR; ++rr) dstq[rr] = neg_inf;
            }
            // Max (NaN rows flagged), then the weights against it, vectorised across rows.
            for (int64_t c = 0; c < kR; c += kW) {
                V m = vbroadcast(neg_inf);
                VI bad{};
                for (int64_t q = 0; q < n; ++q) {
                    const V x = vload(lw + q * kR + c);
                    bad |= (VI)(x != x);
                    m = x > m ? x : m;
                }
                // An all-empty row: m = -inf; exp(-inf - 0) = 0 keeps its weights 0, not NaN.
                const V ms = m == vbroadcast(neg_inf) ? V{} : m;
                V t{};
                for (int64_t q = 0; q < n; ++q) {
                    const V e = vexp(vload(lw + q * kR + c) - ms);
                    vstore(ew + q * kR + c, e);
                    t += e;
                }
                vstore(mx + c, bad != 0 ? vbroadcast(nan) : m);
                vstore(tot + c, t);
            }
            if (flat) {
                bool plain = true;  // no empty part, no NaN or infinite lse in the block
                for (int64_t q = 0; q < n && plain; ++q) {
                    for (int64_t rr = 0; rr < nr; ++rr) plain &= std::isfinite(lw[q * kR + rr]);
                }
                if (plain) {
                    for (int64_t rr = 0; rr < nr; ++rr) {
                        const A total = tot[rr];
                        const A inv = A(1) / total;
                        for (int64_t q = 0; q < n; ++q) ew[q * kR + rr] *= inv;
                        if (lse_out != nullptr) lse_out[r0 + rr] = mx[rr] + std::log(total);
                    }
                    for (int64_t q = 0; q < n; ++q) {
                        const int64_t* s = p.out_strides + 3 * q;
                        src[q] = static_cast<const T*>(p.outs[q]) + first.b * s[0] +
                                 first.h * s[1] + first.i * s[2];
                    }
                    T* dst = out + first.b * p.out_stride_batch + first.h * p.out_stride_head +
                             first.i * p.out_stride_seq;
                    merge_flat<T, A>(src, ew, n, kR, dst, nr, dv, wr);
                    continue;
                }
            }
            MergeRowIndex x = first;
            for (int64_t rr = 0; rr < nr; ++rr, x.next(H, L)) {
                T* dst = out + x.b * p.out_stride_batch + x.h * p.out_stride_head +
                         x.i * p.out_stride_seq;
                const A m = mx[rr];
                A lse;
                if (m != m) {  // NaN in a part's lse: the row is NaN
                    lse = nan;
                    fill_row(dst, dv, nan);
                } else if (m == neg_inf) {  // every part empty: out 0, lse -inf
                    lse = neg_inf;
                    fill_row(dst, dv, A(0));
                } else {
                    const A total = tot[rr];
                    lse = m + std::log(total);
                    const A inv = A(1) / total;
                    int64_t nw = 0;
                    for (int64_t q = 0; q < n && dv > 0; ++q) {
                        if (lw[q * kR + rr] == neg_inf) continue;  // contributes nothing
                        const int64_t* s = p.out_strides + 3 * q;
                        src[nw] = static_cast<const T*>(p.outs[q]) + x.b * s[0] + x.h * s[1] +
                                  x.i * s[2];
                        wr[nw] = ew[q * kR + rr] * inv;
                        ++nw;
                    }
                    merge_row<T, A>(src, wr, nw, dst, dv, stream, acc, tmp);
                }
                if (lse_out != nullptr) lse_out[r0 + rr] = lse;
            }
        }
#if defined(__SSE2__)
        if (stream) _mm_sfence();  // the streamed lines are visible before the barrier
#endif
#pragma omp barrier
    }
}

}  // namespace MHA_CPU_NS
}  // namespace mha
