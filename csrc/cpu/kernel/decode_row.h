// Decode row room of the blocked CPU kernel: one query row (Lq = 1, or a task's single row)
// against a key tile, scores along the keys, a row softmax and streaming P.V.
// Part of the CPU kernel compiled once per instruction set (see attention_cpu_isa.cpp):
// include only from there, inside namespace mha::MHA_CPU_NS, no STL templates.
#pragma once

#include "cpu/kernel/masking.h"
#include "cpu/kernel/micro.h"

namespace mha {
namespace MHA_CPU_NS {

// One query row against keys j0 .. j0+nk (decode: Lq = 1, or a task's single row), dot
// score. The S^T path would spend 7 of 8 lanes of every softmax vector on padding
// columns; here the scores are one contiguous row (in buf.st), the softmax runs along the
// keys, and P.V streams each V row once, four rows per accumulator pass. Same semantics
// as the tile path: hidden keys are -inf, NaN poisons the row, a hidden p = 0 never
// meets an Inf/NaN value. vr (ldv) are the tile's V rows in accum_t; prefetch: K and V are
// read in place, so prefetching their rows ahead pays.
template <typename A>
void row_update(const AttentionParams& p, const TileDims& g, const TileBuffers<A>& buf,
                const TileBlock& blk, int64_t j0, int64_t nk, const A* k_rows, int64_t ldk,
                bool prefetch, const A* vr, int64_t ldv, const uint8_t* mask, const A* bias) {
    constexpr int64_t kW = Vec<A>::kWidth;
    const int64_t dk = g.dk, dvp = g.dvp;
    using V = vec_t<A>;
    const A neg_inf = -std::numeric_limits<A>::infinity();
    A* s = buf.st;
    const int64_t nkv = round_up(nk, kW);
    const A* qr = buf.q_raw;  // scaled
    // Software prefetch (rows read in place only): K kPrefetchKeys keys ahead, which runs
    // into the next tile, and this tile's V rows, so P.V below finds them in cache.
    const bool pf = prefetch && k_rows != buf.k_rows;
    for (int64_t j = 0; j < nk; j += 4) {
        const int64_t nj = min_of<int64_t>(4, nk - j);
        const A* kr[4];
        for (int64_t x = 0; x < 4; ++x) kr[x] = k_rows + (j + min_of(x, nj - 1)) * ldk;
        if (pf) {
            for (int64_t x = 0; x < 4; ++x) {
                prefetch_row(k_rows + (j + x + kPrefetchKeys) * ldk, dk * sizeof(A));
                prefetch_row(vr + (j + x) * ldv, p.head_dim_v * sizeof(A));
            }
        }
        A t[4];
        dot4(qr, kr, t, dk);
        for (int64_t x = 0; x < nj; ++x) s[j + x] = t[x];
    }
    bias_and_hide(p, buf, blk, j0, 1, 0, 1, nk, mask, bias);
    for (int64_t j = nk; j < nkv; ++j) s[j] = neg_inf;  // vector padding: p = 0

    V mv = vbroadcast<A>(neg_inf);
    for (int64_t j = 0; j < nkv; j += kW) {
        const V x = vload(s + j);
        mv = x > mv ? x : mv;  // ignores NaN; a NaN still reaches l through exp
    }
    A mt = neg_inf;
    for (int w = 0; w < kW; ++w) mt = mv[w] > mt ? mv[w] : mt;
    const A m_old = buf.m[0];
    const A m_new = mt > m_old ? mt : m_old;
    const A m_safe = m_new == neg_inf ? A(0) : m_new;
    const A alpha = std::exp(m_old - m_safe);  // 0 while nothing was seen
    const V ms = vbroadcast<A>(m_safe);
    V sum{};
    for (int64_t j = 0; j < nkv; j += kW) {
        const V e = vexp(vload(s + j) - ms);
        vstore(s + j, e);
        sum += e;
    }
    A l_tile = 0;
    for (int w = 0; w < kW; ++w) l_tile += sum[w];
    buf.m[0] = m_new;
    buf.l[0] = buf.l[0] * alpha + l_tile;
    A* acc = buf.acc;
    if (alpha != A(1)) {
        for (int64_t d = 0; d < dvp; ++d) acc[d] *= alpha;
    }

    const bool hidden = !blk.inside || blk.masked || bias != nullptr;
    // P is the row s (a one-column P^T: nqc = 1).
    if (hidden && !all_finite(vr, nk, ldv, dvp)) {
        pv_skip_zero(buf, 0, 1, 1, nk, vr, ldv, dvp);
    } else {
        pv_stream(buf, 0, 1, 1, nk, vr, ldv, dvp);
    }
}

}  // namespace MHA_CPU_NS
}  // namespace mha
