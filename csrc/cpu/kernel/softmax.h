// Online softmax room of the blocked CPU kernel: the running max / sum of the S^T columns
// and the rescaling of the accumulator rows.
// Part of the CPU kernel compiled once per instruction set (see attention_cpu_isa.cpp):
// include only from there, inside namespace mha::MHA_CPU_NS, no STL templates.
#pragma once

#include "cpu/kernel/tile.h"
#include "cpu/kernel/vec.h"

namespace mha {
namespace MHA_CPU_NS {

// Online softmax over the query columns [c0, c1) of S^T (nk x nqc): turns them into P^T,
// updates m and l, and rescales the accumulator rows whose max grew.
template <typename A>
void softmax_update(const TileBuffers<A>& buf, int64_t nq, int64_t nqc, int64_t c0, int64_t c1,
                    int64_t nk, int64_t dvp) {
    constexpr int64_t kW = Vec<A>::kWidth;
    using V = vec_t<A>;
    const V neg_inf = vbroadcast<A>(-std::numeric_limits<A>::infinity());
    V sums[kBlockQ / kW];
    for (int64_t c = c0; c < c1; c += kW) {
        V mt = neg_inf;
        for (int64_t j = 0; j < nk; ++j) {
            const V x = vload(buf.st + j * nqc + c);
            mt = x > mt ? x : mt;  // ignores NaN; a NaN still reaches l through exp
        }
        const V m_old = vload(buf.m + c);
        const V m_new = mt > m_old ? mt : m_old;
        const V m_safe = m_new == neg_inf ? V{} : m_new;
        vstore(buf.m + c, m_new);
        vstore(buf.m_safe + c, m_safe);
        vstore(buf.alpha + c, vexp(m_old - m_safe));  // 0 while nothing was seen
        sums[(c - c0) / kW] = V{};
    }
    for (int64_t j = 0; j < nk; ++j) {
        A* sj = buf.st + j * nqc;
        for (int64_t c = c0; c < c1; c += kW) {
            const V e = vexp(vload(sj + c) - vload(buf.m_safe + c));
            vstore(sj + c, e);
            sums[(c - c0) / kW] += e;
        }
    }
    for (int64_t c = c0; c < c1; c += kW) {
        vstore(buf.l + c, vload(buf.l + c) * vload(buf.alpha + c) + sums[(c - c0) / kW]);
    }
    for (int64_t r = c0; r < min_of(c1, nq); ++r) {
        const A alpha = buf.alpha[r];
        if (alpha == A(1)) continue;
        A* ar = buf.acc + r * dvp;
        for (int64_t d = 0; d < dvp; ++d) ar[d] *= alpha;
    }
}

}  // namespace MHA_CPU_NS
}  // namespace mha
