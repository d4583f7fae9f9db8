// Backward room of the CPU kernel (SPEC 6.4): FlashAttention-2's backward, tiled.
//
// Versions:
//   backward_blocked   every score (dot / scaled-dot, General, additive = Concat). Per row, D = rowsum(dout * out)
//                      first (one pass, (B, Hq, Lq) accum_t). Then tasks own the key blocks
//                      of one (batch, key head), walk them in order and, for every query
//                      head of the group and every query tile that can see the block,
//                      recompute P^T = exp(S^T - lse) (nothing of size Lq x Lk exists;
//                      S as the forward: softcap, then bias / ALiBi, then masks) and
//                        dV  += P^T dO           dP^T = V dO^T
//                        dS^T = P^T (dP^T - D)   (the gradient of the scores, = dbias)
//                        softcap: dS^T *= 1 - tanh^2 (the score before the cap); ALiBi's
//                        slopes are constants (no gradient)
//                        dK  += dS^T (scale Q')  dQ' += scale dS K
//                      with the register-blocked GEMM of micro.h; Q' = Q (dot) or Q W
//                      (General), and dq = dQ' W^T, dW = sum_rows Q^T dQ' at the end.
//                      Additive: Q' = Q W_q and K' = K W_k (width A); the scores and, from
//                      dS, dQ', dK' and dw are formed pair by pair with tanh recomputed
//                      (O(L A) memory, never O(Lq Lk A)); dk = dK' W_k^T, dW_k = K^T dK'.
//                      dK and dV of a block are finished in the task (no reduction); dQ' is
//                      accumulated per task in accum_t.
//   Parallelism:       with at least as many (batch, key head) groups as threads each task
//                      is a whole group (its dQ' lives in the thread's scratch, group x Lq
//                      x Dk). With fewer, the key blocks of a group are dealt to S tasks
//                      round robin (balanced under causal), each with its own dQ' slice of
//                      a shared (S, B, Hq, Lq, Dk) buffer, summed in a last pass: no atomics,
//                      the result does not depend on the thread count's schedule.
//
// Conventions: a row with lse = -inf (it saw no key) gets zero gradients and gives none.
// Hidden pairs (causal / window / key_lengths / mask) contribute exactly 0: where a tile hides
// some pair and a row or key holds Inf/NaN, the products skip zero coefficients, so a NaN
// reaches only the gradients of the rows and keys that saw it.
// Part of the CPU kernel compiled once per instruction set (see attention_cpu_isa.cpp):
// include only from there, inside namespace mha::MHA_CPU_NS, no STL templates.
#pragma once

#include "backward_params.h"
#include "cpu/kernel/convert.h"
#include "cpu/kernel/masking.h"
#include "cpu/kernel/micro.h"

namespace mha {
namespace MHA_CPU_NS {

constexpr int64_t kBwdBlockQ = 64;  // query rows per tile of the backward
constexpr int64_t kBwdBlockK = 64;  // keys per block: S^T, dS^T, K, V, dK, dV fit L2

// The buffers of one backward thread.
template <typename A>
struct BwdBuffers {
    A* k_rows;   // (bk, dkp)   keys in accum_t, zero padded
    A* v_rows;   // (bk, dvp)   values, zero padded
    A* dk_acc;   // (bk, dkp)   dK of the block (before the General projection)
    A* dv_acc;   // (bk, dvp)
    A* q_raw;    // (bq, dq)    query rows (General / additive: the input of Q W); at least dk
    // The task's query side, packed once per task for all group x Lq rows, tile by tile
    // (nt = group * ceil(Lq / bq) tiles): the key blocks then only read it.
    A* q_rows;   // (nt, bq, dkp)  scale * Q' rows, zero padded
    A* qt;       // (nt, dk, bq)   scale * Q'^T (ld: the tile's nqc)
    A* do_rows;  // (nt, bq, dvp)  dout rows, zero padded
    A* dot;      // (nt, dv, bq)   dout^T (ld: the tile's nqc)
    A* lse;      // (nt, bq)       lse per column (+inf for empty rows: P = 0)
    A* dd;       // (nt, bq)       D per column
    int32_t* finite;  // (nt)      the tile's values are all finite
    A* st;       // (bk, bq)    S^T, then P^T
    A* dst;      // (bk, bq)    dP^T, then dS^T
    int32_t* lo;      // (bq)
    int32_t* hi;      // (bq)
    KeyRange* range;  // (bq)
    int64_t* diag;    // (bq)        ALiBi: each row's diagonal (visibility.h)
    A* slope;         // (bq)        ALiBi: each row's slope
    A* alibi_rel;     // (bq)        ALiBi: diag - j0 of the current block
    A* cap_grad;      // (bk, bq)    softcap: 1 - tanh^2 of each pair, or nullptr
    A* dq_group;  // (group * Lq, dkp) this task's dQ' (one task per group), or nullptr
    A* dw;        // (dq, dkp)  General / additive: this thread's share of dW (dW_q)
    A* k_raw;     // (bk, dk)   additive: the key rows (K' = K W_k is in k_rows)
    A* dwk;       // (dk, dkp)  additive: this thread's share of dW_k
    A* dwv;       // (dkp)      additive: this thread's share of dw
};

template <typename T, typename A>
struct Backward {
    static constexpr int kW = Vec<A>::kWidth;
    const BackwardParams& p;
    // dkp: the width of the Q' / K' rows, zero padded: dk rounded up to the vector width for
    // dot / General, the additive width A rounded up for additive (Q' = Q W_q, K' = K W_k).
    // qcols: the real columns of W (General: dk; additive: A).
    int64_t dq = 0, dk = 0, dv = 0, dkp = 0, dvp = 0, qcols = 0;
    bool additive = false;
    int64_t group = 1, bq = kBwdBlockQ, bk = kBwdBlockK;
    int64_t n_kblocks = 0, splits = 1, n_qtiles = 0;
    A scale = 1;
    A* w_gen = nullptr;  // General: W (dq, dkp); additive: W_q (dq, dkp); zero padded
    A* w_k = nullptr;    // additive: W_k (dk, dkp)
    A* w_vec = nullptr;  // additive: w (dkp)
    A* dvec = nullptr;   // (B, Hq, Lq) D = rowsum(dout * out)
    A* dq_split = nullptr;  // (splits, B, Hq, Lq, dkp) when splits > 1
    mutable int stop = 0;

    explicit Backward(const BackwardParams& params) : p(params) {}

    bool stopped() const {
        poll_interrupt(p, &stop);
        int s;
#pragma omp atomic read
        s = stop;
        return s != 0;
    }

    int64_t scratch_bytes(bool own_dq) const {
        const int64_t a = sizeof(A), pad = 64;
        int64_t n = 0;
        n += 2 * round_up(bk * dkp * a, pad) + 2 * round_up(bk * dvp * a, pad);
        const int64_t nt = group * n_qtiles;
        n += round_up(max_of(bq * dq, dk) * a, pad) + round_up(nt * bq * dkp * a, pad) +
             round_up(nt * dk * bq * a, pad);
        n += round_up(nt * bq * dvp * a, pad) + round_up(nt * dv * bq * a, pad);
        n += 2 * round_up(bk * bq * a, pad) + 2 * round_up(nt * bq * a, pad) +
             round_up(nt * 4, pad);
        n += 2 * round_up(bq * 4, pad) + round_up(bq * static_cast<int64_t>(sizeof(KeyRange)), pad);
        n += round_up(bq * 8, pad) + 2 * round_up(bq * a, pad);  // diag, slope, alibi_rel
        if (p.softcap > 0) n += round_up(bk * bq * a, pad);
        if (own_dq) n += round_up(group * p.seqlen_q * dkp * a, pad);
        if (p.score != Score::kDot) n += round_up(dq * dkp * a, pad);
        if (additive) n += round_up(bk * dk * a, pad) + round_up(dk * dkp * a, pad) + round_up(dkp * a, pad);
        return n + pad;
    }

    BwdBuffers<A> carve(Scratch& sc, bool own_dq) const {
        BwdBuffers<A> b;
        b.k_rows = sc.take<A>(bk * dkp);
        b.v_rows = sc.take<A>(bk * dvp);
        b.dk_acc = sc.take<A>(bk * dkp);
        b.dv_acc = sc.take<A>(bk * dvp);
        const int64_t nt = group * n_qtiles;
        b.q_raw = sc.take<A>(max_of(bq * dq, dk));
        b.q_rows = sc.take<A>(nt * bq * dkp);
        b.qt = sc.take<A>(nt * dk * bq);
        b.do_rows = sc.take<A>(nt * bq * dvp);
        b.dot = sc.take<A>(nt * dv * bq);
        b.lse = sc.take<A>(nt * bq);
        b.dd = sc.take<A>(nt * bq);
        b.finite = sc.take<int32_t>(nt);
        b.st = sc.take<A>(bk * bq);
        b.dst = sc.take<A>(bk * bq);
        b.lo = sc.take<int32_t>(bq);
        b.hi = sc.take<int32_t>(bq);
        b.range = sc.take<KeyRange>(bq);
        b.diag = sc.take<int64_t>(bq);
        b.slope = sc.take<A>(bq);
        b.alibi_rel = sc.take<A>(bq);
        b.cap_grad = p.softcap > 0 ? sc.take<A>(bk * bq) : nullptr;
        b.dq_group = own_dq ? sc.take<A>(group * p.seqlen_q * dkp) : nullptr;
        b.dw = b.k_raw = b.dwk = b.dwv = nullptr;
        if (p.score != Score::kDot) {
            b.dw = sc.take<A>(dq * dkp);
            for (int64_t x = 0; x < dq * dkp; ++x) b.dw[x] = 0;
        }
        if (additive) {
            b.k_raw = sc.take<A>(bk * dk);
            b.dwk = sc.take<A>(dk * dkp);
            b.dwv = sc.take<A>(dkp);
            for (int64_t x = 0; x < dk * dkp; ++x) b.dwk[x] = 0;
            for (int64_t x = 0; x < dkp; ++x) b.dwv[x] = 0;
        }
        return b;
    }

    // The masking room's view of these buffers (it reads st, range, lo, hi).
    static TileBuffers<A> tile_view(const BwdBuffers<A>& b) {
        TileBuffers<A> t{};
        t.st = b.st;
        t.lo = b.lo;
        t.hi = b.hi;
        t.range = b.range;
        t.diag = b.diag;
        t.slope = b.slope;
        t.alibi_rel = b.alibi_rel;
        return t;
    }

    // D = rowsum(dout * out) for every row, in accum_t.
    void row_dots(int threads) const {
        const int64_t H = p.num_heads_q, Lq = p.seqlen_q;
        const int64_t rows = p.batch * H * Lq;
#pragma omp parallel num_threads(threads) if (threads > 1)
        {
            Scratch sc(Scratch::bytes_for<A>({dv + 1, dv + 1}));
            const bool ok = sc.ok();
            A* o = ok ? sc.take<A>(dv + 1) : nullptr;
            A* g = ok ? sc.take<A>(dv + 1) : nullptr;
            if (!ok) {
#pragma omp atomic write
                stop = 2;
            }
#pragma omp for schedule(static)
            for (int64_t row = 0; row < rows; ++row) {
                if (!ok) continue;
                const int64_t i = row % Lq, h = (row / Lq) % H, b = row / (Lq * H);
                load_row(static_cast<const T*>(p.out) + b * p.out_stride_batch +
                             h * p.out_stride_head + i * p.out_stride_seq,
                         o, dv, A(1));
                load_row(static_cast<const T*>(p.dout) + b * p.dout_stride_batch +
                             h * p.dout_stride_head + i * p.dout_stride_seq,
                         g, dv, A(1));
                A s = 0;
                for (int64_t d = 0; d < dv; ++d) s += o[d] * g[d];
                dvec[row] = s;
            }
        }
    }

    // Whether x[0 .. n) holds no Inf/NaN (inf * 0 and nan * 0 are nan), with a vector
    // accumulator: a scalar chain of dependent adds cost as much as a small tile's GEMMs.
    static bool all_finite_n(const A* x, int64_t n) {
        using V = vec_t<A>;
        V z{};
        int64_t i = 0;
        for (; i + kW <= n; i += kW) {
            V e;
            std::memcpy(&e, x + i, sizeof(V));
            z += e * A(0);
        }
        A t = 0;
        for (; i < n; ++i) t += x[i] * A(0);
        for (int w = 0; w < kW; ++w) t += z[w];
        return t == 0;
    }

    // One packed query tile of the task (see BwdBuffers).
    struct QTile {
        A *q_rows, *qt, *do_rows, *dot, *lse, *dd;
        int32_t* finite;
    };
    QTile qtile(const BwdBuffers<A>& buf, int64_t ti) const {
        return {buf.q_rows + ti * bq * dkp, buf.qt + ti * dk * bq, buf.do_rows + ti * bq * dvp,
                buf.dot + ti * dv * bq,      buf.lse + ti * bq,    buf.dd + ti * bq,
                buf.finite + ti};
    }

    // Packs query tile rows i0 .. i0+nq of head h (Q', dout, lse, D; transposes) into qt_.
    void load_query_tile(const BwdBuffers<A>& buf, const QTile& t, int64_t b, int64_t h,
                         int64_t i0, int64_t nq, int64_t nqc) const {
        const T* q = static_cast<const T*>(p.q) + b * p.q_stride_batch + h * p.q_stride_head +
                     i0 * p.q_stride_seq;
        const T* g = static_cast<const T*>(p.dout) + b * p.dout_stride_batch +
                     h * p.dout_stride_head + i0 * p.dout_stride_seq;
        if (p.score != Score::kDot) {
            for (int64_t r = 0; r < nq; ++r) load_row(q + r * p.q_stride_seq, buf.q_raw + r * dq, dq, A(1));
            gemm<A, false>(nq, dkp, dq, buf.q_raw, dq, 1, w_gen, dkp, t.q_rows, dkp);
            if (!additive) {
                for (int64_t x = 0; x < nq * dkp; ++x) t.q_rows[x] *= scale;
            }
        } else {
            for (int64_t r = 0; r < nq; ++r) {
                A* row = t.q_rows + r * dkp;
                load_row(q + r * p.q_stride_seq, row, dq, scale);
                for (int64_t d = dq; d < dkp; ++d) row[d] = 0;
            }
        }
        for (int64_t r = 0; r < nq; ++r) {
            A* row = t.do_rows + r * dvp;
            load_row(g + r * p.dout_stride_seq, row, dv, A(1));
            for (int64_t d = dv; d < dvp; ++d) row[d] = 0;
        }
        for (int64_t d = 0; d < (additive ? 0 : dk); ++d) {
            A* col = t.qt + d * nqc;
            for (int64_t r = 0; r < nq; ++r) col[r] = t.q_rows[r * dkp + d];
            for (int64_t r = nq; r < nqc; ++r) col[r] = 0;
        }
        for (int64_t d = 0; d < dv; ++d) {
            A* col = t.dot + d * nqc;
            for (int64_t r = 0; r < nq; ++r) col[r] = t.do_rows[r * dvp + d];
            for (int64_t r = nq; r < nqc; ++r) col[r] = 0;
        }
        const int64_t row0 = (b * p.num_heads_q + h) * p.seqlen_q + i0;
        const A* lse = static_cast<const A*>(p.lse) + row0;
        const A inf = std::numeric_limits<A>::infinity();
        A z = 0;
        for (int64_t r = 0; r < nq; ++r) {
            t.lse[r] = lse[r] == -inf ? inf : lse[r];  // empty row: exp(s - inf) = 0
            t.dd[r] = dvec[row0 + r];
            z += lse[r] == -inf ? A(0) : lse[r] * A(0);
            z += t.dd[r] * A(0);
        }
        for (int64_t r = nq; r < nqc; ++r) {
            t.lse[r] = inf;
            t.dd[r] = 0;
        }
        *t.finite = z == 0 && all_finite_n(t.q_rows, nq * dkp) && all_finite_n(t.do_rows, nq * dvp);
    }

    // C (m x n, ldc) += A B skipping zero coefficients of A (a[r * a_rs + kk * a_cs]), so a
    // hidden pair's 0 never meets an Inf/NaN. The slow path of tiles that need it.
    static void gemm_skip_zero(int64_t m, int64_t n, int64_t kdim, const A* a, int64_t a_rs,
                               int64_t a_cs, const A* bm, int64_t ldb, A* c, int64_t ldc) {
        for (int64_t r = 0; r < m; ++r) {
            A* cr = c + r * ldc;
            for (int64_t kk = 0; kk < kdim; ++kk) {
                const A x = a[r * a_rs + kk * a_cs];
                if (x == 0) continue;
                const A* br = bm + kk * ldb;
                for (int64_t d = 0; d < n; ++d) cr[d] += x * br[d];
            }
        }
    }

    // The block of keys j0 .. j0+nk (valid ones) against query tile i0 .. i0+nq of head h.
    void tile(const BwdBuffers<A>& buf, const QTile& t, int64_t b, int64_t h, int64_t i0,
              int64_t nq, int64_t j0, int64_t nk, bool keys_finite, A* dq_rows) const {
        const int64_t nqc = round_up(nq, kW);
        const int64_t lk = valid_keys(p, b);
        for (int64_t r = 0; r < nq; ++r) {
            KeyRange rr = visible_keys(p, i0 + r, lk);
            if (rr.lo > rr.hi) rr = {lk, -1};
            buf.range[r] = rr;
        }
        if (p.alibi_slopes != nullptr) {
            const A slope = alibi_slope<A>(p, b, h);
            for (int64_t r = 0; r < nq; ++r) {
                buf.diag[r] = diagonal(p, i0 + r, lk);
                buf.slope[r] = slope;
            }
        }
        const uint8_t* mask = p.mask == nullptr ? nullptr
                                                : p.mask + b * p.mask_stride_batch +
                                                      h * p.mask_stride_head +
                                                      i0 * p.mask_stride_q + j0 * p.mask_stride_k;
        const A* bias = p.bias == nullptr ? nullptr
                                          : static_cast<const A*>(p.bias) +
                                                b * p.bias_stride_batch + h * p.bias_stride_head +
                                                i0 * p.bias_stride_q + j0 * p.bias_stride_k;
        const TileBuffers<A> tv = tile_view(buf);
        const TileBlock blk = block_visibility(p, tv, j0, nq, nk, mask);
        if (!blk.any) return;
        const bool finite = *t.finite != 0 && keys_finite;
        using V = vec_t<A>;
        const V neg_inf = vbroadcast<A>(-std::numeric_limits<A>::infinity());

        // S^T (nk x nqc) = K Q'^T (additive: scale w . tanh(q'_r + k'_j)), capped, bias and
        // ALiBi added, hidden pairs -inf.
        if (additive) {
            for (int64_t j = 0; j < nk; ++j) {
                const A* kp = buf.k_rows + j * dkp;
                A* sj = buf.st + j * nqc;
                for (int64_t r = 0; r < nq; ++r) {
                    sj[r] = scale * additive_dot(t.q_rows + r * dkp, kp, w_vec, dkp);
                }
                for (int64_t r = nq; r < nqc; ++r) sj[r] = 0;
            }
        } else {
            gemm<A, false>(nk, nqc, dk, buf.k_rows, dkp, 1, t.qt, nqc, buf.st, nqc);
        }
        if (buf.cap_grad != nullptr) {
            // As the forward: s = cap tanh(s / cap); d(capped)/ds = 1 - tanh^2 kept per pair.
            const V cap = vbroadcast<A>(static_cast<A>(p.softcap));
            const V inv_cap = vbroadcast<A>(A(1) / static_cast<A>(p.softcap));
            const V one = vbroadcast<A>(A(1));
            for (int64_t x = 0; x < nk * nqc; x += kW) {
                const V th = vtanh(vload(buf.st + x) * inv_cap);
                vstore(buf.st + x, th * cap);
                vstore(buf.cap_grad + x, one - th * th);
            }
        }
        bias_and_hide(p, tv, blk, j0, nqc, 0, nq, nk, mask, bias, false);
        // P^T = exp(S^T - lse), exactly 0 where hidden.
        for (int64_t j = 0; j < nk; ++j) {
            A* sj = buf.st + j * nqc;
            for (int64_t c = 0; c < nqc; c += kW) {
                const V s = vload(sj + c);
                const V e = vexp(s - vload(t.lse + c));
                vstore(sj + c, s == neg_inf ? V{} : e);
            }
        }
        // dP^T (nk x nqc) = V dO^T.
        gemm<A, false>(nk, nqc, dv, buf.v_rows, dvp, 1, t.dot, nqc, buf.dst, nqc);
        // dS^T = P^T (dP^T - D), 0 where P = 0 (a hidden Inf/NaN value never leaks).
        for (int64_t j = 0; j < nk; ++j) {
            const A* pj = buf.st + j * nqc;
            A* dj = buf.dst + j * nqc;
            for (int64_t c = 0; c < nqc; c += kW) {
                const V pv = vload(pj + c);
                const V ds = pv * (vload(dj + c) - vload(t.dd + c));
                vstore(dj + c, pv == V{} ? V{} : ds);
            }
        }
        if (p.dbias != nullptr) add_dbias(buf, b, h, i0, nq, nqc, j0, nk);  // dS after the cap
        if (buf.cap_grad != nullptr) {
            // The gradient of the score before the cap: dS (1 - tanh^2); hidden pairs stay 0.
            for (int64_t x = 0; x < nk * nqc; x += kW) {
                const V ds = vload(buf.dst + x);
                const V g = ds * vload(buf.cap_grad + x);
                vstore(buf.dst + x, ds == V{} ? V{} : g);
            }
        }
        const bool hidden = !blk.inside || blk.masked || p.bias != nullptr;
        if (additive) {
            if (hidden && !finite) {
                gemm_skip_zero(nk, dvp, nq, buf.st, nqc, 1, t.do_rows, dvp, buf.dv_acc, dvp);
            } else {
                gemm<A, true>(nk, dvp, nq, buf.st, nqc, 1, t.do_rows, dvp, buf.dv_acc, dvp);
            }
            additive_grads(buf, t, nq, nqc, nk, dq_rows);
            return;
        }
        if (hidden && !finite) {
            gemm_skip_zero(nk, dvp, nq, buf.st, nqc, 1, t.do_rows, dvp, buf.dv_acc, dvp);
            gemm_skip_zero(nk, dkp, nq, buf.dst, nqc, 1, t.q_rows, dkp, buf.dk_acc, dkp);
            gemm_skip_zero(nq, dkp, nk, buf.dst, 1, nqc, buf.k_rows, dkp, dq_rows, dkp);
            return;
        }
        // dV (nk x dvp) += P^T dO;  dK (nk x dkp) += dS^T (scale Q');  dQ' (nq x dkp) += dS K.
        gemm<A, true>(nk, dvp, nq, buf.st, nqc, 1, t.do_rows, dvp, buf.dv_acc, dvp);
        gemm<A, true>(nk, dkp, nq, buf.dst, nqc, 1, t.q_rows, dkp, buf.dk_acc, dkp);
        gemm<A, true>(nq, dkp, nk, buf.dst, 1, nqc, buf.k_rows, dkp, dq_rows, dkp);
    }

    // Additive: with g = scale dS and u = g w (1 - tanh^2(q'_r + k'_j)),
    // dQ'_r += u, dK'_j += u, dw += g tanh(...). Pairs with dS = 0 (hidden) are skipped.
    void additive_grads(const BwdBuffers<A>& buf, const QTile& t, int64_t nq, int64_t nqc,
                        int64_t nk, A* dq_rows) const {
        using V = vec_t<A>;
        for (int64_t j = 0; j < nk; ++j) {
            const A* kp = buf.k_rows + j * dkp;
            A* dkj = buf.dk_acc + j * dkp;
            const A* dj = buf.dst + j * nqc;
            for (int64_t r = 0; r < nq; ++r) {
                if (dj[r] == 0) continue;
                const V g = vbroadcast<A>(scale * dj[r]);
                const A* qp = t.q_rows + r * dkp;
                A* dqr = dq_rows + r * dkp;
                for (int64_t a = 0; a < dkp; a += kW) {
                    const V th = vtanh(vload(qp + a) + vload(kp + a));
                    const V u = g * vload(w_vec + a) * (A(1) - th * th);
                    vstore(dqr + a, vload(dqr + a) + u);
                    vstore(dkj + a, vload(dkj + a) + u);
                    vstore(buf.dwv + a, vload(buf.dwv + a) + g * th);
                }
            }
        }
    }

    // Whether two tasks can add to one dbias element (a broadcast axis that tasks split).
    bool dbias_shared() const {
        const bool b_shared = p.dbias_stride_batch == 0 && p.batch > 1;
        const bool h_shared = p.dbias_stride_head == 0 && p.num_heads_k > 1;
        const bool k_shared = p.dbias_stride_k == 0 && splits > 1;
        return b_shared || h_shared || k_shared;
    }

    void add_dbias(const BwdBuffers<A>& buf, int64_t b, int64_t h, int64_t i0, int64_t nq,
                   int64_t nqc, int64_t j0, int64_t nk) const {
        A* base = static_cast<A*>(p.dbias) + b * p.dbias_stride_batch + h * p.dbias_stride_head +
                  i0 * p.dbias_stride_q + j0 * p.dbias_stride_k;
        const bool atomic = dbias_shared();
        for (int64_t j = 0; j < nk; ++j) {
            const A* dj = buf.dst + j * nqc;
            A* col = base + j * p.dbias_stride_k;
            for (int64_t r = 0; r < nq; ++r) {
                if (dj[r] == 0) continue;
                A* x = col + r * p.dbias_stride_q;
                if (atomic) {
#pragma omp atomic update
                    *x += dj[r];
                } else {
                    *x += dj[r];
                }
            }
        }
    }

    // Writes dK, dV of one block (General: dK as computed, dk is the key's own gradient).
    void store_keys(const BwdBuffers<A>& buf, int64_t b, int64_t hk, int64_t j0, int64_t nk,
                    int64_t nk_valid) const {
        T* dkp_out = static_cast<T*>(p.dk) + b * p.dk_stride_batch + hk * p.dk_stride_head +
                     j0 * p.dk_stride_seq;
        T* dvp_out = static_cast<T*>(p.dv) + b * p.dv_stride_batch + hk * p.dv_stride_head +
                     j0 * p.dv_stride_seq;
        for (int64_t j = 0; j < nk; ++j) {
            if (additive) {
                // dk = dK' W_k^T; dW_k += k^T dK' (keys past lk have dK' = 0).
                A* row = buf.q_raw;  // (dk) scratch: q_raw is free between tiles
                const A* dkj = buf.dk_acc + j * dkp;
                for (int64_t d = 0; d < dk; ++d) {
                    const A* wd = w_k + d * dkp;
                    A x = 0;
                    for (int64_t a = 0; a < dkp; ++a) x += dkj[a] * wd[a];
                    row[d] = x;
                }
                store_row(row, dkp_out + j * p.dk_stride_seq, dk, A(1));
                if (j < nk_valid) {
                    const A* kr = buf.k_raw + j * dk;
                    for (int64_t d = 0; d < dk; ++d) {
                        A* dwd = buf.dwk + d * dkp;
                        for (int64_t a = 0; a < dkp; ++a) dwd[a] += kr[d] * dkj[a];
                    }
                }
            } else {
                store_row(buf.dk_acc + j * dkp, dkp_out + j * p.dk_stride_seq, dk, A(1));
            }
            store_row(buf.dv_acc + j * dvp, dvp_out + j * p.dv_stride_seq, dv, A(1));
        }
    }

    // One task: key blocks s, s + splits, ... of (batch b, key head hk).
    void run_task(const BwdBuffers<A>& buf, int64_t b, int64_t hk, int64_t s) const {
        const int64_t Lq = p.seqlen_q, Lk = p.seqlen_k;
        const int64_t lk = valid_keys(p, b);
        A* dq_base = buf.dq_group;  // rows (hh * Lq + i) of this group, hh = h - hk * group
        if (dq_base == nullptr) {
            dq_base = dq_split + ((s * p.batch + b) * p.num_heads_q + hk * group) * Lq * dkp;
        }
        for (int64_t x = 0; x < group * Lq * dkp; ++x) dq_base[x] = 0;
        for (int64_t hh = 0; hh < group; ++hh) {
            for (int64_t qi = 0; qi < n_qtiles; ++qi) {
                const int64_t i0 = qi * bq, nq = min_of(bq, Lq - i0);
                load_query_tile(buf, qtile(buf, hh * n_qtiles + qi), b, hk * group + hh, i0, nq,
                                round_up(nq, kW));
            }
        }
        for (int64_t kb = s; kb < n_kblocks; kb += splits) {
            if (stopped()) return;
            const int64_t j0 = kb * bk;
            const int64_t nk_all = min_of(bk, Lk - j0);
            const int64_t nk = max_of<int64_t>(0, min_of(nk_all, lk - j0));  // valid keys
            for (int64_t x = 0; x < nk_all * dkp; ++x) buf.dk_acc[x] = 0;
            for (int64_t x = 0; x < nk_all * dvp; ++x) buf.dv_acc[x] = 0;
            if (nk > 0) {
                const T* k = static_cast<const T*>(p.k) + b * p.k_stride_batch +
                             hk * p.k_stride_head + j0 * p.k_stride_seq;
                const T* v = static_cast<const T*>(p.v) + b * p.v_stride_batch +
                             hk * p.v_stride_head + j0 * p.v_stride_seq;
                for (int64_t j = 0; j < nk; ++j) {
                    A* kr = additive ? buf.k_raw + j * dk : buf.k_rows + j * dkp;
                    A* vr = buf.v_rows + j * dvp;
                    load_row(k + j * p.k_stride_seq, kr, dk, A(1));
                    load_row(v + j * p.v_stride_seq, vr, dv, A(1));
                    for (int64_t d = dk; d < (additive ? dk : dkp); ++d) kr[d] = 0;
                    for (int64_t d = dv; d < dvp; ++d) vr[d] = 0;
                }
                bool keys_finite = all_finite_n(buf.v_rows, nk * dvp) &&
                                   all_finite_n(additive ? buf.k_raw : buf.k_rows,
                                                nk * (additive ? dk : dkp));
                if (additive) {
                    gemm<A, false>(nk, dkp, dk, buf.k_raw, dk, 1, w_k, dkp, buf.k_rows, dkp);
                    keys_finite = keys_finite && all_finite_n(buf.k_rows, nk * dkp);
                }
                for (int64_t hh = 0; hh < group; ++hh) {
                    const int64_t h = hk * group + hh;
                    for (int64_t qi = 0; qi < n_qtiles; ++qi) {
                        const int64_t i0 = qi * bq, nq = min_of(bq, Lq - i0);
                        // Rows' visible ranges grow with i: a cheap test skips whole tiles.
                        const KeyRange first = visible_keys(p, i0, lk);
                        const KeyRange last = visible_keys(p, i0 + nq - 1, lk);
                        if (last.hi < j0 || first.lo > j0 + nk - 1) continue;
                        tile(buf, qtile(buf, hh * n_qtiles + qi), b, h, i0, nq, j0, nk, keys_finite,
                             dq_base + (hh * Lq + i0) * dkp);
                    }
                }
            }
            store_keys(buf, b, hk, j0, nk_all, nk);
        }
        if (buf.dq_group != nullptr) {
            for (int64_t hh = 0; hh < group; ++hh) {
                finish_dq_rows(buf, b, hk * group + hh, 0, Lq, buf.dq_group + hh * Lq * dkp, dkp);
            }
        }
    }

    // dq rows i0 .. i0+n of (b, h) from dQ' (acc rows of width dkp): dq = scale dQ' (dot),
    // dq = scale dQ' W^T and dW += Q^T scale dQ' (General).
    void finish_dq_rows(const BwdBuffers<A>& buf, int64_t b, int64_t h, int64_t i0, int64_t n,
                        A* acc, int64_t ld) const {
        T* out = static_cast<T*>(p.dq) + b * p.dq_stride_batch + h * p.dq_stride_head +
                 i0 * p.dq_stride_seq;
        if (p.score == Score::kDot) {
            for (int64_t r = 0; r < n; ++r) store_row(acc + r * ld, out + r * p.dq_stride_seq, dq, scale);
            return;
        }
        const A post = additive ? A(1) : scale;  // additive: scale is already in dQ'
        const T* q = static_cast<const T*>(p.q) + b * p.q_stride_batch + h * p.q_stride_head +
                     i0 * p.q_stride_seq;
        A* row = buf.q_raw;  // (dq) one q row / one dq row
        for (int64_t r = 0; r < n; ++r) {
            A* ar = acc + r * ld;
            for (int64_t a = 0; a < qcols; ++a) ar[a] *= post;
            // dq[d] = sum_a dQ'[a] W[d, a]
            for (int64_t d = 0; d < dq; ++d) {
                const A* wd = w_gen + d * dkp;
                A t = 0;
                for (int64_t a = 0; a < qcols; ++a) t += ar[a] * wd[a];
                row[d] = t;
            }
            store_row(row, out + r * p.dq_stride_seq, dq, A(1));
            load_row(q + r * p.q_stride_seq, row, dq, A(1));
            for (int64_t d = 0; d < dq; ++d) {
                A* dwd = buf.dw + d * dkp;
                const A qd = row[d];
                for (int64_t a = 0; a < dkp; ++a) dwd[a] += qd * ar[a];
            }
        }
    }

    void run() {
        const int64_t B = p.batch, Hq = p.num_heads_q, Hk = p.num_heads_k, Lq = p.seqlen_q;
        dq = p.head_dim;
        dk = p.head_dim_k;
        dv = p.head_dim_v;
        additive = p.score == Score::kAdditive;
        qcols = additive ? p.score_dim : dk;
        dkp = round_up(qcols, kW);
        dvp = round_up(max_of<int64_t>(dv, 1), kW);
        group = Hq / Hk;
        scale = static_cast<A>(p.scale);
        bq = min_of(kBwdBlockQ, round_up(max_of<int64_t>(Lq, 1), kW));
        bk = min_of(kBwdBlockK, max_of<int64_t>(p.seqlen_k, 1));
        n_kblocks = (p.seqlen_k + bk - 1) / bk;
        n_qtiles = (Lq + bq - 1) / bq;

        int threads = 1;
#ifdef _OPENMP
        threads = p.num_threads > 0 ? p.num_threads : omp_get_max_threads();
        const double flops = 4.0 * B * Hq * Lq * p.seqlen_k * (dk + dv);
        if (p.num_threads <= 0 && flops < kSerialFlops) threads = 1;
#endif
        const int64_t n_groups = B * Hk;
        splits = 1;
        if (threads > 1 && n_groups % threads != 0 && n_groups < 4 * threads) {
            splits = (4 * threads + n_groups - 1) / n_groups;
        }
        splits = max_of<int64_t>(1, min_of(splits, n_kblocks));
        const bool own_dq = splits == 1;
        const int64_t n_tasks = n_groups * splits;
        if (threads > n_tasks) threads = static_cast<int>(max_of<int64_t>(n_tasks, 1));

        const int64_t gen_n = p.score != Score::kDot ? dq * dkp + (additive ? dk * dkp + dkp : 0) : 0;
        const int64_t split_n = own_dq ? 0 : splits * B * Hq * Lq * dkp;
        const int64_t shared_bytes = Scratch::bytes_for<A>({B * Hq * Lq, gen_n, split_n});
        Scratch shared(shared_bytes);
        if (!shared.ok()) throw_bad_alloc(shared_bytes);
        dvec = shared.take<A>(B * Hq * Lq);
        if (gen_n > 0) {
            w_gen = shared.take<A>(gen_n);
            const A* w = static_cast<const A*>(p.score_wq);
            for (int64_t d = 0; d < dq; ++d) {
                for (int64_t a = 0; a < dkp; ++a) {
                    w_gen[d * dkp + a] = a < qcols ? w[d * qcols + a] : A(0);
                }
            }
            if (additive) {
                w_k = w_gen + dq * dkp;
                w_vec = w_k + dk * dkp;
                const A* wk = static_cast<const A*>(p.score_wk);
                const A* wv = static_cast<const A*>(p.score_w);
                for (int64_t d = 0; d < dk; ++d) {
                    for (int64_t a = 0; a < dkp; ++a) {
                        w_k[d * dkp + a] = a < qcols ? wk[d * qcols + a] : A(0);
                    }
                }
                for (int64_t a = 0; a < dkp; ++a) w_vec[a] = a < qcols ? wv[a] : A(0);
            }
        }
        if (split_n > 0) dq_split = shared.take<A>(split_n);

        row_dots(threads);
        if (stop == 2) throw_bad_alloc(Scratch::bytes_for<A>({dv + 1, dv + 1}));

        const int64_t bytes = scratch_bytes(own_dq);
        A* dw_out = p.score != Score::kDot ? static_cast<A*>(p.dscore_wq) : nullptr;
        A* dwk_out = additive ? static_cast<A*>(p.dscore_wk) : nullptr;
        A* dwv_out = additive ? static_cast<A*>(p.dscore_w) : nullptr;
        if (dw_out != nullptr) {
            for (int64_t x = 0; x < dq * qcols; ++x) dw_out[x] = 0;
        }
        if (additive) {
            for (int64_t x = 0; x < dk * qcols; ++x) dwk_out[x] = 0;
            for (int64_t x = 0; x < qcols; ++x) dwv_out[x] = 0;
        }
        bool failed = false;
        // dW: each thread's share is added under a critical section at the end.
        auto add_dw = [&](const BwdBuffers<A>& buf) {
            if (dw_out == nullptr) return;
#pragma omp critical(mha_bwd_dw)
            {
                for (int64_t d = 0; d < dq; ++d) {
                    for (int64_t a = 0; a < qcols; ++a) dw_out[d * qcols + a] += buf.dw[d * dkp + a];
                }
                if (additive) {
                    for (int64_t d = 0; d < dk; ++d) {
                        for (int64_t a = 0; a < qcols; ++a) {
                            dwk_out[d * qcols + a] += buf.dwk[d * dkp + a];
                        }
                    }
                    for (int64_t a = 0; a < qcols; ++a) dwv_out[a] += buf.dwv[a];
                }
            }
        };
#pragma omp parallel num_threads(threads) if (threads > 1)
        {
            Scratch scratch(bytes);
            if (!scratch.ok()) {
#pragma omp atomic write
                failed = true;
            }
            const BwdBuffers<A> buf = scratch.ok() ? carve(scratch, own_dq) : BwdBuffers<A>{};
#pragma omp for schedule(dynamic, 1)
            for (int64_t t = 0; t < n_tasks; ++t) {
                if (!scratch.ok() || stopped()) continue;
                const int64_t g = t / splits, s = t % splits;
                run_task(buf, g / Hk, g % Hk, s);
            }
            if (!own_dq && scratch.ok()) {
                // dq = the sum of the splits' dQ', row by row.
#pragma omp for schedule(static)
                for (int64_t row = 0; row < B * Hq * Lq; ++row) {
                    if (stopped()) continue;
                    A* acc = dq_split + row * dkp;
                    const int64_t part = B * Hq * Lq * dkp;
                    for (int64_t s = 1; s < splits; ++s) {
                        const A* x = acc + s * part;
                        for (int64_t a = 0; a < dkp; ++a) acc[a] += x[a];
                    }
                    const int64_t i = row % Lq, h = (row / Lq) % Hq, b = row / (Lq * Hq);
                    finish_dq_rows(buf, b, h, i, 1, acc, dkp);
                }
            }
            if (scratch.ok()) add_dw(buf);
        }
        if (failed) throw_bad_alloc(bytes);
        if (stop != 0) throw_interrupted();
    }
};

template <typename T, typename A>
void backward_blocked(const BackwardParams& p) {
    Backward<T, A> kernel(p);
    kernel.run();
}

}  // namespace MHA_CPU_NS
}  // namespace mha
