// Masking room of the blocked CPU kernel: which (query, key) pairs of a tile can be seen.
// The causal / window / key_lengths rule itself is visible_keys() in csrc/visibility.h,
// shared with the CUDA kernels; here it meets the bool mask and the bias.
// Part of the CPU kernel compiled once per instruction set (see attention_cpu_isa.cpp):
// include only from there, inside namespace mha::MHA_CPU_NS, no STL templates.
#pragma once

#include "cpu/kernel/tile.h"
#include "cpu/kernel/vec.h"

namespace mha {
namespace MHA_CPU_NS {

template <typename A>
TileBlock block_visibility(const AttentionParams& p, const TileBuffers<A>& buf, int64_t j0,
                           int64_t nq, int64_t nk, const uint8_t* mask) {
    constexpr int64_t kW = Vec<A>::kWidth;
    const int64_t j_last = j0 + nk - 1;
    bool inside = true;
    int64_t r_first = nq, r_last = -1;
    for (int64_t r = 0; r < nq; ++r) {
        const KeyRange rr = buf.range[r];
        if (max_of(rr.lo, j0) <= min_of(rr.hi, j_last)) {
            r_first = min_of(r_first, r);
            r_last = r;
        }
        inside &= rr.lo <= j0 && rr.hi >= j_last;
    }
    const bool any = r_last >= 0;
    const int64_t c0 = any ? r_first / kW * kW : 0;
    const int64_t c1 = any ? round_up(r_last + 1, kW) : 0;
    if (!any || mask == nullptr) return {any, inside, false, c0, c1};
    int64_t seen = 0;
    const int64_t rows = p.mask_stride_q == 0 ? 1 : nq;  // stride 0: one row for all
    for (int64_t r = 0; r < rows; ++r) {
        const uint8_t* mr = mask + r * p.mask_stride_q;
        if (p.mask_stride_k == 1) {  // contiguous keys: a loop the compiler vectorises
            int32_t row_seen = 0;
            for (int64_t j = 0; j < nk; ++j) row_seen += mr[j] != 0;
            seen += row_seen;
        } else {
            for (int64_t j = 0; j < nk; ++j) seen += mr[j * p.mask_stride_k] != 0;
        }
    }
    if (rows == 1) seen *= nq;
    return {seen != 0, inside, seen != nq * nk, c0, c1};
}

// Adds the bias to S^T's columns [c0, r_end) (nk keys, ld nqc), then sets the pairs hidden
// by causal / window / key_lengths or by the mask to -inf. The bias goes in before
// hiding, so a hidden pair stays -inf whatever its bias (+inf). nqc = 1 is a plain row.
// softcap = false skips the cap: the backward applies it itself (it keeps 1 - tanh^2).
template <typename A>
void bias_and_hide(const AttentionParams& p, const TileBuffers<A>& buf, const TileBlock& blk,
                   int64_t j0, int64_t nqc, int64_t c0, int64_t r_end, int64_t nk,
                   const uint8_t* mask, const A* bias, bool softcap = true) {
    A* st = buf.st;
    if (softcap && p.softcap > 0) {  // before bias, ALiBi and masks; padding columns stay 0
        using V = vec_t<A>;
        constexpr int64_t kW = Vec<A>::kWidth;
        const A cap = static_cast<A>(p.softcap), inv_cap = A(1) / cap;
        const int64_t c_end = round_up(r_end, kW);
        for (int64_t j = 0; j < nk; ++j) {
            A* sj = st + j * nqc;
            if (nqc == 1) {  // a plain row (decode): the keys run along sj
                for (int64_t x = 0; x + kW <= nk; x += kW) {
                    vstore(sj + x, vtanh(vload(sj + x) * inv_cap) * cap);
                }
                for (int64_t x = nk / kW * kW; x < nk; ++x) sj[x] = softcap_score(sj[x], cap);
                break;
            }
            for (int64_t c = c0 / kW * kW; c < c_end; c += kW) {
                vstore(sj + c, vtanh(vload(sj + c) * inv_cap) * cap);
            }
        }
    }
    if (p.alibi_slopes != nullptr) {  // -slope * |diag - j|, diag - j0 formed in int64
        for (int64_t r = c0; r < r_end; ++r) buf.alibi_rel[r] = static_cast<A>(buf.diag[r] - j0);
        for (int64_t j = 0; j < nk; ++j) {
            A* sj = st + j * nqc;
            const A jf = static_cast<A>(j);
            for (int64_t r = c0; r < r_end; ++r) {
                sj[r] -= buf.slope[r] * std::fabs(buf.alibi_rel[r] - jf);
            }
        }
    }
    if (bias != nullptr) {
        for (int64_t j = 0; j < nk; ++j) {
            A* sj = st + j * nqc;
            const A* bj = bias + j * p.bias_stride_k;
            for (int64_t r = c0; r < r_end; ++r) sj[r] += bj[r * p.bias_stride_q];
        }
    }
    const A neg_inf = -std::numeric_limits<A>::infinity();
    if (!blk.inside) {
        for (int64_t r = c0; r < r_end; ++r) {
            buf.lo[r] = static_cast<int32_t>(max_of<int64_t>(-1, min_of(buf.range[r].lo - j0, nk)));
            buf.hi[r] = static_cast<int32_t>(max_of<int64_t>(-1, min_of(buf.range[r].hi - j0, nk)));
        }
        // Rows of one sequence (every task but a packed GQA group's) have lo and hi
        // non-decreasing in r, so key j is seen by one run of columns [ra, rb): hide the two
        // runs around it, found by two pointers that only move forward (O(nk + nq) instead of
        // a compare per pair, and the stores touch only hidden pairs).
        bool monotone = true;
        for (int64_t r = c0 + 1; r < r_end; ++r) {
            monotone &= buf.lo[r] >= buf.lo[r - 1] && buf.hi[r] >= buf.hi[r - 1];
        }
        if (monotone) {
            int64_t ra = c0, rb = c0;
            for (int64_t j = 0; j < nk; ++j) {
                A* sj = st + j * nqc;
                const int32_t jj = static_cast<int32_t>(j);
                while (ra < r_end && buf.hi[ra] < jj) ++ra;  // first column with hi >= j
                rb = max_of(rb, ra);
                while (rb < r_end && buf.lo[rb] <= jj) ++rb;  // past the last with lo <= j
                for (int64_t r = c0; r < ra; ++r) sj[r] = neg_inf;
                for (int64_t r = rb; r < r_end; ++r) sj[r] = neg_inf;
            }
        } else {
            for (int64_t j = 0; j < nk; ++j) {
                A* sj = st + j * nqc;
                const int32_t jj = static_cast<int32_t>(j);
                for (int64_t r = c0; r < r_end; ++r) {
                    sj[r] = (jj < buf.lo[r] || jj > buf.hi[r]) ? neg_inf : sj[r];
                }
            }
        }
    }
    if (blk.masked) {
        for (int64_t j = 0; j < nk; ++j) {
            A* sj = st + j * nqc;
            const uint8_t* mj = mask + j * p.mask_stride_k;
            if (p.mask_stride_q == 0) {
                if (*mj == 0) {
                    for (int64_t r = c0; r < r_end; ++r) sj[r] = neg_inf;
                }
            } else {
                for (int64_t r = c0; r < r_end; ++r) {
                    if (mj[r * p.mask_stride_q] == 0) sj[r] = neg_inf;
                }
            }
        }
    }
}

}  // namespace MHA_CPU_NS
}  // namespace mha
