// The naive CPU kernel: one query row at a time, all Lk scores in a row buffer, a plain
// softmax. Documents the math; the tests and mha_bench cross-check the blocked kernel with it.
// Same conventions as the blocked kernel (attention_cpu_isa.cpp's header).
// Part of the CPU kernel compiled once per instruction set (see attention_cpu_isa.cpp):
// include only from there, inside namespace mha::MHA_CPU_NS, no STL templates.
#pragma once

#include "cpu/kernel/common.h"
#include "cpu/kernel/convert.h"
#include "visibility.h"

namespace mha {
namespace MHA_CPU_NS {

template <typename T, typename A>
void forward_naive(const AttentionParams& p) {
    const int64_t Lk = p.seqlen_k, dq = p.head_dim, dk = p.head_dim_k, dv = p.head_dim_v;
    const int64_t na = p.score == Score::kAdditive ? p.score_dim : 0;
    const A scale = static_cast<A>(p.scale);
    const A neg_inf = -std::numeric_limits<A>::infinity();
    const int64_t rows = p.batch * p.num_heads_q * p.seqlen_q;
    const int64_t row_bytes = Scratch::bytes_for<A>({Lk, dq, dk, dk + na, dv + 1});
    int stop = 0;
#pragma omp parallel if (p.num_threads != 1) num_threads(p.num_threads > 0 ? p.num_threads : omp_get_max_threads())
    {
        Scratch sc(row_bytes);
        A *s = nullptr, *qrow = nullptr, *krow = nullptr, *qw = nullptr, *o = nullptr;
        if (sc.ok()) {
            s = sc.take<A>(Lk);        // (Lk) scores, then probabilities
            qrow = sc.take<A>(dq);     // (dq)
            krow = sc.take<A>(dk);     // (dk)
            qw = sc.take<A>(dk + na);  // (dk) q W for general, (na) q W_q for additive
            o = sc.take<A>(dv + 1);    // (dv)
        } else {  // a thread without scratch makes every thread skip its rows
#pragma omp atomic write
            stop = 2;
        }
#pragma omp for schedule(static)
        for (int64_t row = 0; row < rows; ++row) {
            int stopped;
#pragma omp atomic read
            stopped = stop;
            if (stopped != 0) continue;
            poll_interrupt(p, &stop);
            const RowCoords rc = row_coords(p, row);
            const int64_t b = rc.b, h = rc.h, i = rc.i, hk = rc.hk;
            const int64_t lk = valid_keys(p, b);
            const KeyRange rr = visible_keys(p, i, lk);
            load_row(static_cast<const T*>(p.q) + b * p.q_stride_batch + h * p.q_stride_head +
                         i * p.q_stride_seq,
                     qrow, dq, A(1));
            if (p.score == Score::kGeneral || p.score == Score::kAdditive) {
                const int64_t n = p.score == Score::kGeneral ? dk : na;
                const A* w = static_cast<const A*>(p.score_wq);
                for (int64_t a = 0; a < n; ++a) {
                    A t = 0;
                    for (int64_t d = 0; d < dq; ++d) t += qrow[d] * w[d * n + a];
                    qw[a] = t;
                }
            }
            A mx = neg_inf;
            bool poison = false;
            for (int64_t j = 0; j < Lk; ++j) {
                bool visible = j >= rr.lo && j <= rr.hi;
                if (visible && p.mask != nullptr) {
                    visible = p.mask[b * p.mask_stride_batch + h * p.mask_stride_head +
                                     i * p.mask_stride_q + j * p.mask_stride_k] != 0;
                }
                if (!visible) {
                    s[j] = neg_inf;
                    continue;
                }
                load_row(static_cast<const T*>(p.k) + b * p.k_stride_batch +
                             hk * p.k_stride_head + j * p.k_stride_seq,
                         krow, dk, A(1));
                A t = 0;
                if (p.score == Score::kAdditive) {
                    const A* wk = static_cast<const A*>(p.score_wk);
                    const A* wv = static_cast<const A*>(p.score_w);
                    for (int64_t a = 0; a < na; ++a) {
                        A u = 0;
                        for (int64_t d = 0; d < dk; ++d) u += krow[d] * wk[d * na + a];
                        t += wv[a] * std::tanh(qw[a] + u);
                    }
                } else {
                    const A* x = p.score == Score::kGeneral ? qw : qrow;
                    for (int64_t d = 0; d < dk; ++d) t += x[d] * krow[d];
                }
                t *= scale;
                if (p.softcap > 0) t = softcap_score(t, static_cast<A>(p.softcap));
                if (p.alibi_slopes != nullptr) {
                    t += alibi_term(alibi_slope<A>(p, b, h), diagonal(p, i, lk), j);
                }
                if (p.bias != nullptr) {
                    t += static_cast<const A*>(p.bias)[b * p.bias_stride_batch +
                                                       h * p.bias_stride_head +
                                                       i * p.bias_stride_q + j * p.bias_stride_k];
                }
                s[j] = t;
                if (t != t) poison = true;
                mx = t > mx ? t : mx;
            }
            A sum = 0;
            if (mx != neg_inf && !poison) {
                for (int64_t j = 0; j < Lk; ++j) {
                    s[j] = std::exp(s[j] - mx);
                    sum += s[j];
                }
            }
            const bool empty = !poison && sum == 0;
            const A nan = std::numeric_limits<A>::quiet_NaN();
            for (int64_t d = 0; d < dv; ++d) o[d] = 0;
            if (!empty && !poison) {
                const A inv = A(1) / sum;
                for (int64_t j = 0; j < Lk; ++j) {
                    s[j] *= inv;
                    if (s[j] == 0) continue;
                    const T* vj = static_cast<const T*>(p.v) + b * p.v_stride_batch +
                                  hk * p.v_stride_head + j * p.v_stride_seq;
                    for (int64_t d = 0; d < dv; ++d) {
                        A x;
                        load_row(vj + d, &x, 1, A(1));
                        o[d] += s[j] * x;
                    }
                }
            } else if (empty) {
                for (int64_t j = 0; j < Lk; ++j) s[j] = 0;
            } else {
                for (int64_t j = 0; j < Lk; ++j) s[j] = nan;
                for (int64_t d = 0; d < dv; ++d) o[d] = nan;
            }
            store_row(o, static_cast<T*>(p.out) + b * p.out_stride_batch + h * p.out_stride_head +
                             i * p.out_stride_seq,
                      dv, A(1));
            if (p.weights != nullptr) {
                A* w = static_cast<A*>(p.weights) + row * Lk;
                for (int64_t j = 0; j < Lk; ++j) w[j] = s[j];
            }
            if (p.lse != nullptr) {
                const int64_t lsh = p.lse_stride_head != 0 ? p.lse_stride_head : p.seqlen_q;
                static_cast<A*>(p.lse)[(b * p.num_heads_q + h) * lsh + i] =
                    poison ? nan : (empty ? neg_inf : mx + std::log(sum));
            }
        }
    }
    if (stop == 2) throw_bad_alloc(row_bytes);
    if (stop != 0) throw_interrupted();
}

}  // namespace MHA_CPU_NS
}  // namespace mha
