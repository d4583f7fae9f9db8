// Which keys a query row may see, before the bool mask and the bias: the causal alignment,
// the sliding window and key_lengths. One rule for every backend: the CPU kernels and the
// CUDA kernels (cuda/attention_kernels.cuh) both include this header, so they can't drift.
//
//   lk = key_lengths[b] (or seqlen_k)       keys j >= lk are padding, never read
//   off = lk - seqlen_q (bottom-right alignment, causal True / None) or 0 (top-left)
//   causal:  j <= i + off
//   window:  i + off - left <= j <= i + off + right   (-1 = unbounded on that side)
//
// Overflow-safe: left/right may be as large as INT64_MAX (sys.maxsize, a common spelling of
// "unbounded") and then behave exactly like -1. Only differences of in-range positions are
// formed (|i|, |off|, lk are array sizes, far below 2^62), never i + off + right.
#pragma once

#include <cmath>
#include <cstdint>

#include "params.h"

#if defined(__CUDACC__)
#define MHA_HD __host__ __device__ __forceinline__
#else
#define MHA_HD inline
#endif

namespace mha {

struct KeyRange {
    int64_t lo;  // first visible key (inclusive)
    int64_t hi;  // last visible key (inclusive); lo > hi: the row sees no key
};

// Valid keys of batch b: key_lengths[b], or seqlen_k without key_lengths.
MHA_HD int64_t valid_keys(const AttentionParams& p, int64_t b) {
    return p.key_lengths != nullptr ? p.key_lengths[b] : p.seqlen_k;
}

// A flat query row (b * Hq + h) * Lq + i, the index of lse / weights rows, as (b, h, i) and
// the key/value head hk it reads (grouped-query attention).
struct RowCoords {
    int64_t b, h, i, hk;
};
MHA_HD RowCoords row_coords(const AttentionParams& p, int64_t row) {
    const int64_t i = row % p.seqlen_q;
    const int64_t h = (row / p.seqlen_q) % p.num_heads_q;
    const int64_t b = row / (p.seqlen_q * p.num_heads_q);
    return {b, h, i, h / (p.num_heads_q / p.num_heads_k)};
}

// The bool mask and the bias of query row (b, h, i): key j at [j * mask_stride_k] /
// [j * bias_stride_k]; nullptr when absent. A is accum_t (the bias is stored in it).
MHA_HD const uint8_t* mask_row(const AttentionParams& p, int64_t b, int64_t h, int64_t i) {
    return p.mask == nullptr ? nullptr
                             : p.mask + b * p.mask_stride_batch + h * p.mask_stride_head +
                                   i * p.mask_stride_q;
}
template <typename A>
MHA_HD const A* bias_row(const AttentionParams& p, int64_t b, int64_t h, int64_t i) {
    return p.bias == nullptr ? nullptr
                             : static_cast<const A*>(p.bias) + b * p.bias_stride_batch +
                                   h * p.bias_stride_head + i * p.bias_stride_q;
}

// Keys [lo, hi] of query row i (lk valid keys) through causal / window / key_lengths.
MHA_HD KeyRange visible_keys(const AttentionParams& p, int64_t i, int64_t lk) {
    const int64_t diag = i + (p.causal == Causal::kTopLeft ? 0 : lk - p.seqlen_q);
    int64_t lo = 0;
    int64_t hi = lk - 1;
    if (p.causal != Causal::kNone && diag < hi) hi = diag;
    // hi = min(hi, diag + right) and lo = max(lo, diag - left), compared as differences.
    if (p.window_right >= 0 && p.window_right < hi - diag) hi = diag + p.window_right;
    if (p.window_left >= 0 && p.window_left < diag - lo) lo = diag - p.window_left;
    return {lo, hi};
}

// ALiBi and softcap, the two score terms computed in the kernel (SPEC 3), in this order:
//   s = softcap * tanh(s / softcap)       after the scale, before bias / ALiBi / masks
//   s += -slope(b, h) * |diag(i) - j|     diag(i) = i + off, the position the window uses
// A query row's diagonal (its key position): i + off with off as in visible_keys.
MHA_HD int64_t diagonal(const AttentionParams& p, int64_t i, int64_t lk) {
    return i + (p.causal == Causal::kTopLeft ? 0 : lk - p.seqlen_q);
}

// The ALiBi slope of (b, h) in accum_t (float, double for float64); 0 without ALiBi.
template <typename A>
MHA_HD A alibi_slope(const AttentionParams& p, int64_t b, int64_t h) {
    return p.alibi_slopes == nullptr
               ? A(0)
               : static_cast<const A*>(p.alibi_slopes)[b * p.alibi_stride_batch + h];
}

// ALiBi's term for a row with diagonal `diag` and key j (the distance formed in int64).
template <typename A>
MHA_HD A alibi_term(A slope, int64_t diag, int64_t j) {
    const int64_t d = diag - j;
    return -slope * static_cast<A>(d < 0 ? -d : d);
}

MHA_HD float softcap_score(float s, float cap) { return cap * tanhf(s / cap); }
MHA_HD double softcap_score(double s, double cap) { return cap * tanh(s / cap); }

}  // namespace mha
