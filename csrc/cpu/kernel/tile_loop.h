// Tile loop of the blocked ("flash") CPU kernel: the tasks, the walk over key tiles and the
// score / P.V products of one tile, calling the rooms beside it (masking.h, softmax.h,
// decode_row.h, micro.h).
//
// A task owns kBlockQ query rows of one (batch, head). It walks the visible key range in tiles
// of kBlockK keys and keeps the transposed score tile S^T (keys x queries): then
//   S^T = K . Q^T    reads K rows in place (fp32/fp64: straight from the caller's array),
//   softmax          runs down the columns, one vector holds 8 queries (max, exp, sums),
//   O += P . V       reads P^T by columns and V rows in place.
// Only Q^T is packed (once per task), and K/V only when they need a dtype conversion.
// Part of the CPU kernel compiled once per instruction set (see attention_cpu_isa.cpp):
// include only from there, inside namespace mha::MHA_CPU_NS, no STL templates.
#pragma once

#include "cpu/kernel/amx.h"
#include "cpu/kernel/convert.h"
#include "cpu/kernel/decode_row.h"
#include "cpu/kernel/masking.h"
#include "cpu/kernel/micro.h"
#include "cpu/kernel/softmax.h"

namespace mha {
namespace MHA_CPU_NS {

template <typename T, typename A>
struct Blocked : TileDims {
    static constexpr int kW = Vec<A>::kWidth;
    // K/V rows can be read where they are (no conversion) for same-precision input.
    static constexpr bool kDirect = sizeof(T) == sizeof(A) && sizeof(T) >= 4;

    const AttentionParams& p;  // TileDims (the base) holds the call's geometry
    int64_t group = 1;  // query heads per key/value head
    bool direct_k = false, direct_v = false;
    // Set (atomically) when the interrupt hook asks to abandon the call; tasks poll it
    // between key tiles, so even one long task (a million-key row) stops promptly.
    mutable int stop = 0;
    // Query rows per task: kBlockQ, or half of it for short sequences, where a few big tiles
    // would leave the threads unbalanced and make causal diagonal tiles a large share.
    int64_t q_tile = kBlockQ;
    A scale = 1;
    // Packed score parameters (read-only, shared by the threads), zero padded:
    // general W (dq x dkp) with the scale folded in; additive W_q (dq x dap), W_k (dk x dap),
    // w (dap).
    A* w_q = nullptr;
    A* w_k = nullptr;
    A* w_vec = nullptr;

    explicit Blocked(const AttentionParams& params) : p(params) {}

    // Q^T (dk x nqc) for dot/general, or Q W_q (nq x dap) for additive. Columns nq..nqc of
    // Q^T are zero: those queries do not exist and are never stored.
    void load_queries(const TileBuffers<A>& buf, const T* q, int64_t nq, int64_t nqc) const {
        if (p.score == Score::kDot) {
            // q_raw keeps the scaled rows (the decode path reads them), qt their transpose.
            for (int64_t r = 0; r < nq; ++r) {
                A* row = buf.q_raw + r * dq;
                load_row(q + r * p.q_stride_seq, row, dq, scale);
                for (int64_t d = 0; d < dq; ++d) buf.qt[d * nqc + r] = row[d];
            }
        } else {
            for (int64_t r = 0; r < nq; ++r) {
                load_row(q + r * p.q_stride_seq, buf.q_raw + r * dq, dq, A(1));
            }
            const int64_t n = p.score == Score::kGeneral ? dkp : dap;
            gemm<A, false>(nq, n, dq, buf.q_raw, dq, 1, w_q, n, buf.q_proj, n);
            if (p.score == Score::kGeneral) {
                for (int64_t r = 0; r < nq; ++r) {
                    for (int64_t d = 0; d < dk; ++d) buf.qt[d * nqc + r] = buf.q_proj[r * dkp + d];
                }
            }
        }
        if (p.score != Score::kAdditive) {
            for (int64_t d = 0; d < dk; ++d) {
                for (int64_t r = nq; r < nqc; ++r) buf.qt[d * nqc + r] = 0;
            }
        }
    }

    // S^T (nk x nqc) for a few queries (decode): one dot product per (query, key), 4 keys at a
    // time, reading K rows with full vectors. The GEMM would spend 7 of 8 lanes on padding.
    void scores_gemv(const TileBuffers<A>& buf, int64_t nq, int64_t nqc, int64_t nk, const A* k_rows,
                     int64_t ldk) const {
        const A* q_rows = p.score == Score::kGeneral ? buf.q_proj : buf.q_raw;
        const int64_t ldq = p.score == Score::kGeneral ? dkp : dq;
        A* st = buf.st;
        for (int64_t j = 0; j < nk; j += 4) {
            const int64_t nj = min_of<int64_t>(4, nk - j);
            const A* kr[4];
            for (int64_t x = 0; x < 4; ++x) kr[x] = k_rows + (j + min_of(x, nj - 1)) * ldk;
            for (int64_t r = 0; r < nq; ++r) {
                A t[4];
                dot4(q_rows + r * ldq, kr, t, dk);
                for (int64_t x = 0; x < nj; ++x) st[(j + x) * nqc + r] = t[x];
            }
        }
        for (int64_t j = 0; j < nk; ++j) {
            for (int64_t r = nq; r < nqc; ++r) st[j * nqc + r] = 0;
        }
    }

    // S^T (nk x nqc, ld nqc) of the task's queries against keys j0 .. j0+nk, hidden pairs
    // -inf, for the query columns [c0, c1) only (c0, c1 multiples of the vector width).
    void scores(const TileBuffers<A>& buf, const TileBlock& blk, int64_t j0, int64_t nq, int64_t nqc,
                int64_t c0, int64_t c1, int64_t nk, const A* k_rows, int64_t ldk,
                const uint8_t* mask, const A* bias) const {
        A* st = buf.st;
        const int64_t r_end = min_of(c1, nq);  // real query rows of the window: [c0, r_end)
        if (p.score == Score::kAdditive) {
            gemm<A, false>(nk, dap, dk, k_rows, ldk, 1, w_k, dap, buf.k_proj, dap);
            for (int64_t j = 0; j < nk; ++j) {
                const A* kp = buf.k_proj + j * dap;
                for (int64_t r = c0; r < r_end; ++r) {
                    st[j * nqc + r] = scale * additive_dot(buf.q_proj + r * dap, kp, w_vec, dap);
                }
                for (int64_t r = max_of(nq, c0); r < c1; ++r) st[j * nqc + r] = 0;
            }
        } else if (nq <= kGemvRows) {
            scores_gemv(buf, nq, nqc, nk, k_rows, ldk);
        } else if (blk.inside) {
            gemm<A, false>(nk, c1 - c0, dk, k_rows, ldk, 1, buf.qt + c0, nqc, st + c0, nqc);
        } else {
            // A diagonal tile (causal / window / key_lengths edge): for each 6-key block, only
            // the query columns that can see one of its keys. The rows that see a key form
            // one run (lo and hi grow with the row), so the skipped entries are all hidden:
            // the masking below sets them to -inf. Padding columns are 0 as in the full GEMM.
            for (int64_t jj = 0; jj < nk; jj += kMr) {
                const int64_t mr = min_of<int64_t>(kMr, nk - jj);
                const int64_t ja = j0 + jj, jb = ja + mr - 1;
                int64_t ra = r_end, rb = -1;
                for (int64_t r = c0; r < r_end; ++r) {
                    if (buf.range[r].hi >= ja && buf.range[r].lo <= jb) {
                        ra = min_of(ra, r);
                        rb = r;
                    }
                }
                if (rb < ra) continue;
                const int64_t ca = ra / kW * kW, cb = min_of(c1, round_up(rb + 1, kW));
                gemm<A, false>(mr, cb - ca, dk, k_rows + jj * ldk, ldk, 1, buf.qt + ca, nqc,
                               st + jj * nqc + ca, nqc);
            }
            for (int64_t j = 0; j < nk; ++j) {
                for (int64_t r = max_of(nq, c0); r < c1; ++r) st[j * nqc + r] = 0;
            }
        }

        bias_and_hide(p, buf, blk, j0, nqc, c0, r_end, nk, mask, bias);
    }

    // Rows of K (and V) for keys j0 .. j0+nk: in place when possible, else converted.
    const A* key_rows(const TileBuffers<A>& buf, const T* k, int64_t nk, int64_t* ld) const {
        if (direct_k) {
            *ld = p.k_stride_seq;
            return reinterpret_cast<const A*>(k);
        }
        for (int64_t j = 0; j < nk; ++j) load_row(k + j * p.k_stride_seq, buf.k_rows + j * dk, dk, A(1));
        *ld = dk;
        return buf.k_rows;
    }
    const A* value_rows(const TileBuffers<A>& buf, const T* v, int64_t nk, int64_t* ld) const {
        if (direct_v) {
            *ld = p.v_stride_seq;
            return reinterpret_cast<const A*>(v);
        }
        for (int64_t j = 0; j < nk; ++j) {
            A* vj = buf.v_rows + j * dvp;
            load_row(v + j * p.v_stride_seq, vj, p.head_dim_v, A(1));
            for (int64_t d = p.head_dim_v; d < dvp; ++d) vj[d] = 0;
        }
        *ld = dvp;
        return buf.v_rows;
    }

    // Polls the interrupt hook (thread 0 only) and says whether the call was abandoned.
    bool stopped() const {
        poll_interrupt(p, &stop);
        int s;
#pragma omp atomic read
        s = stop;
        return s != 0;
    }

    // One task: batch b, query head h, query rows i0 .. i0+nq.
    void run_tile(const TileBuffers<A>& buf, int64_t b, int64_t h, int64_t i0, int64_t nq) const {
        const int64_t hk = h / group;
        const int64_t lk = valid_keys(p, b);
        const int64_t nqc = round_up(nq, kW);
        const T* q = static_cast<const T*>(p.q) + b * p.q_stride_batch + h * p.q_stride_head +
                     i0 * p.q_stride_seq;
        const T* k = static_cast<const T*>(p.k) + b * p.k_stride_batch + hk * p.k_stride_head;
        const T* v = static_cast<const T*>(p.v) + b * p.v_stride_batch + hk * p.v_stride_head;
        const uint8_t* mask = p.mask == nullptr ? nullptr
                                                : p.mask + b * p.mask_stride_batch +
                                                      h * p.mask_stride_head +
                                                      i0 * p.mask_stride_q;
        const A* bias = p.bias == nullptr ? nullptr
                                          : static_cast<const A*>(p.bias) +
                                                b * p.bias_stride_batch +
                                                h * p.bias_stride_head + i0 * p.bias_stride_q;

        // Visible key interval per row; the union over rows bounds the tiles we visit.
        int64_t j_begin = lk, j_end = 0;
        for (int64_t r = 0; r < nq; ++r) {
            KeyRange rr = visible_keys(p, i0 + r, lk);
            if (rr.lo > rr.hi) rr = {lk, -1};  // empty row: sees nothing
            buf.range[r] = rr;
            if (rr.lo <= rr.hi) {
                j_begin = min_of(j_begin, rr.lo);
                j_end = max_of(j_end, rr.hi + 1);
            }
        }
        const A neg_inf = -std::numeric_limits<A>::infinity();
        for (int64_t r = 0; r < nqc; ++r) {
            buf.m[r] = neg_inf;
            buf.l[r] = 0;
        }
        // bf16 on AMX (amx.h): tasks of more than kGemvRows queries, dot score.
        const bool use_amx = amx && nq > kGemvRows && j_begin < j_end;
        for (int64_t x = 0; x < (use_amx ? nqc : nq) * dvp; ++x) buf.acc[x] = 0;

        // (AMX tasks read their own Q^T; the fp32 one only serves the weights pass.)
        if (j_begin < j_end && !(use_amx && p.weights == nullptr)) load_queries(buf, q, nq, nqc);
        const bool row_path = nq == 1 && p.score == Score::kDot;
#if MHA_CPU_AMX
        const AmxTask amx_task(use_amx);
        const float amx_scale =
            use_amx ? amx_pack_queries(reinterpret_cast<const bf16*>(q), p.q_stride_seq, nq, nqc,
                                       dk, static_cast<float>(p.scale), buf.amx_q)
                    : 1.0f;
        (void)amx_scale;  // read by bf16 tasks only
#endif
        for (int64_t j0 = j_begin; j0 < j_end; j0 += kBlockK) {
            if (stopped()) return;  // the call is abandoned: outputs are not needed
            const int64_t nk = min_of(kBlockK, j_end - j0);
            const uint8_t* mask_j = mask == nullptr ? nullptr : mask + j0 * p.mask_stride_k;
            const A* bias_j = bias == nullptr ? nullptr : bias + j0 * p.bias_stride_k;
            const TileBlock blk = block_visibility(p, buf, j0, nq, nk, mask_j);
            if (!blk.any) continue;  // hidden tile: skip it whole
#if MHA_CPU_AMX
            if constexpr (AmxStorage<T>::value) {
                if (use_amx) {
                    amx_tile_step(p, *this, buf, blk, j0, nq, nqc, nk, k + j0 * p.k_stride_seq,
                                  v + j0 * p.v_stride_seq, mask_j, bias_j, amx_scale);
                    continue;
                }
            }
#endif
            int64_t ldk, ldv;
            const A* k_rows = key_rows(buf, k + j0 * p.k_stride_seq, nk, &ldk);
            if (row_path) {
                const A* vr = value_rows(buf, v + j0 * p.v_stride_seq, nk, &ldv);
                row_update(p, *this, buf, blk, j0, nk, k_rows, ldk, direct_k && direct_v, vr, ldv,
                           mask_j, bias_j);
                continue;
            }
            scores(buf, blk, j0, nq, nqc, blk.c0, blk.c1, nk, k_rows, ldk, mask_j, bias_j);
            softmax_update(buf, nq, nqc, blk.c0, blk.c1, nk, dvp);
            const A* v_rows = value_rows(buf, v + j0 * p.v_stride_seq, nk, &ldv);
            // acc (nq x dvp) += P (nq x nk) . V (nk x dvp), P read from P^T by columns. Where
            // some pair is hidden, p = 0 must not meet an Inf/NaN value (0 * inf = NaN): such
            // tiles, rare, take a product that skips zero probabilities.
            const bool hidden = !blk.inside || blk.masked || bias != nullptr;
            const int64_t r0 = blk.c0, nr = min_of(blk.c1, nq) - blk.c0;
            if (hidden && !all_finite(v_rows, nk, ldv, dvp)) {
                pv_skip_zero(buf, r0, nr, nqc, nk, v_rows, ldv, dvp);
            } else if (nr <= kGemvRows) {
                pv_stream(buf, r0, nr, nqc, nk, v_rows, ldv, dvp);
            } else if (blk.inside) {
                gemm<A, true>(nr, dvp, nk, buf.st + r0, 1, nqc, v_rows, ldv,
                              buf.acc + r0 * dvp, dvp);
            } else {
                // Diagonal tile: each 6-row block multiplies only the keys one of its rows
                // can see (p = 0 elsewhere).
                for (int64_t rr = r0; rr < r0 + nr; rr += kMr) {
                    const int64_t mr = min_of<int64_t>(kMr, r0 + nr - rr);
                    int64_t ka = nk, kb = -1;
                    for (int64_t r = rr; r < rr + mr; ++r) {
                        const int64_t lo = max_of<int64_t>(buf.range[r].lo - j0, 0);
                        const int64_t hi = min_of(buf.range[r].hi - j0, nk - 1);
                        if (lo <= hi) {
                            ka = min_of(ka, lo);
                            kb = max_of(kb, hi);
                        }
                    }
                    if (kb < ka) continue;
                    gemm<A, true>(mr, dvp, kb - ka + 1, buf.st + ka * nqc + rr, 1, nqc,
                                  v_rows + ka * ldv, ldv, buf.acc + rr * dvp, dvp);
                }
            }
        }

        // out = acc / l. l = 0: no visible key, the output is defined as 0 and lse = -inf.
        // l = NaN: a NaN score reached the row, and output and lse are NaN.
        T* out = static_cast<T*>(p.out) + b * p.out_stride_batch + h * p.out_stride_head +
                 i0 * p.out_stride_seq;
        // lse feeds the lse output and the weights' second pass (NaN rows); else skip the log.
        const bool need_lse = p.lse != nullptr || p.weights != nullptr;
        for (int64_t r = 0; r < nq; ++r) {
            A* ar = buf.acc + r * dvp;
            A inv;
            if (buf.l[r] == 0) {
                inv = 0;
                for (int64_t d = 0; d < dvp; ++d) ar[d] = 0;
                buf.lse[r] = neg_inf;
            } else {
                inv = A(1) / buf.l[r];
                if (need_lse) buf.lse[r] = buf.m[r] + std::log(buf.l[r]);
            }
            store_row(ar, out + r * p.out_stride_seq, p.head_dim_v, inv);
        }
        const int64_t row0 = (b * p.num_heads_q + h) * p.seqlen_q + i0;
        if (p.lse != nullptr) {
            A* lse = static_cast<A*>(p.lse) + row0;
            for (int64_t r = 0; r < nq; ++r) lse[r] = buf.lse[r];
        }
        if (p.weights != nullptr) {
            write_weights(buf, static_cast<A*>(p.weights) + row0 * p.seqlen_k, k, nq, nqc,
                          j_begin, j_end, mask, bias);
        }
    }

    // Second pass for the weights (nq rows of seqlen_k): w = exp(s - m) / l, 0 where hidden,
    // and a whole row of NaN where a NaN reached the row (lse = NaN).
    void write_weights(const TileBuffers<A>& buf, A* w, const T* k, int64_t nq, int64_t nqc,
                       int64_t j_begin, int64_t j_end, const uint8_t* mask, const A* bias) const {
        const int64_t ldw = p.seqlen_k;
        for (int64_t r = 0; r < nq; ++r) {
            A* wr = w + r * ldw;
            if (buf.lse[r] != buf.lse[r]) {
                for (int64_t j = 0; j < ldw; ++j) wr[j] = buf.lse[r];
                continue;
            }
            for (int64_t j = 0; j < j_begin && j < ldw; ++j) wr[j] = 0;
            for (int64_t j = j_end; j < ldw; ++j) wr[j] = 0;
        }
        for (int64_t j0 = j_begin; j0 < j_end; j0 += kBlockK) {
            const int64_t nk = min_of(kBlockK, j_end - j0);
            const uint8_t* mask_j = mask == nullptr ? nullptr : mask + j0 * p.mask_stride_k;
            const A* bias_j = bias == nullptr ? nullptr : bias + j0 * p.bias_stride_k;
            const TileBlock blk = block_visibility(p, buf, j0, nq, nk, mask_j);
            if (blk.any) {
                int64_t ldk;
                const A* k_rows = key_rows(buf, k + j0 * p.k_stride_seq, nk, &ldk);
                scores(buf, blk, j0, nq, nqc, 0, nqc, nk, k_rows, ldk, mask_j, bias_j);
            }
            for (int64_t r = 0; r < nq; ++r) {
                A* wr = w + r * ldw + j0;
                const A lse = buf.lse[r];
                if (lse != lse) continue;  // NaN row: filled whole below
                if (!blk.any || lse == -std::numeric_limits<A>::infinity()) {
                    for (int64_t j = 0; j < nk; ++j) wr[j] = 0;
                } else {
                    // exp(s - m) / l rather than exp(s - lse): s - m is exact where s is
                    // large (logits of 1e4), s - lse would carry lse's rounding.
                    const A m = buf.m[r], inv_l = A(1) / buf.l[r];
                    for (int64_t j = 0; j < nk; ++j) {
                        wr[j] = std::exp(buf.st[j * nqc + r] - m) * inv_l;
                    }
                }
            }
        }
    }

    void run() {
        const int64_t B = p.batch, H = p.num_heads_q, Lq = p.seqlen_q;
        dq = p.head_dim;
        dk = p.head_dim_k;
        group = p.num_heads_q / p.num_heads_k;
        scale = static_cast<A>(p.scale);
        dvp = round_up(p.head_dim_v, kW);
        q_tile = Lq <= kShortQueries ? kBlockQ / 2 : kBlockQ;
        bq = min_of(q_tile, round_up(Lq, kW));
        bk = min_of(kBlockK, max_of<int64_t>(p.seqlen_k, 1));
        direct_k = kDirect && p.score != Score::kAdditive;
        direct_v = kDirect && p.head_dim_v % kW == 0;
        amx = AmxStorage<T>::value && p.score == Score::kDot;

        // Packed score parameters.
        if (p.score != Score::kDot) {
            dkp = round_up(dk, kW);
            da = p.score == Score::kAdditive ? p.score_dim : 0;
            dap = round_up(da, kW);
        }
        const int64_t n_weights = p.score == Score::kDot ? 0 : dq * max_of(dkp, dap) + dk * dap + dap;
        Scratch packed_buf(n_weights * static_cast<int64_t>(sizeof(A)));
        if (!packed_buf.ok()) throw_bad_alloc();
        if (p.score != Score::kDot) {
            const int64_t n = n_weights;
            A* packed = packed_buf.take<A>(n);
            for (int64_t x = 0; x < n; ++x) packed[x] = 0;
            w_q = packed;
            const A* wq = static_cast<const A*>(p.score_wq);
            if (p.score == Score::kGeneral) {
                for (int64_t d = 0; d < dq; ++d) {
                    for (int64_t a = 0; a < dk; ++a) w_q[d * dkp + a] = wq[d * dk + a] * scale;
                }
            } else {
                w_k = packed + dq * dap;
                w_vec = w_k + dk * dap;
                const A* wk = static_cast<const A*>(p.score_wk);
                const A* wv = static_cast<const A*>(p.score_w);
                for (int64_t d = 0; d < dq; ++d) {
                    for (int64_t a = 0; a < da; ++a) w_q[d * dap + a] = wq[d * da + a];
                }
                for (int64_t d = 0; d < dk; ++d) {
                    for (int64_t a = 0; a < da; ++a) w_k[d * dap + a] = wk[d * da + a];
                }
                for (int64_t a = 0; a < da; ++a) w_vec[a] = wv[a];
            }
        }

        const int64_t n_qtiles = (Lq + q_tile - 1) / q_tile;
        const int64_t n_tasks = B * H * n_qtiles;
        int threads = 1;
#ifdef _OPENMP
        threads = p.num_threads > 0 ? p.num_threads : omp_get_max_threads();
        if (threads > n_tasks) threads = static_cast<int>(n_tasks > 0 ? n_tasks : 1);
        // A call of a few microseconds gains nothing from a thread team, and starting one
        // wakes OpenMP threads that then spin against NumPy's BLAS threads between calls.
        const double flops = 2.0 * B * H * Lq * p.seqlen_k * (dk + p.head_dim_v);
        if (p.num_threads <= 0 && flops < kSerialFlops) threads = 1;
#endif
        const int64_t bytes = scratch_bytes<A>();
        auto task = [&](const TileBuffers<A>& buf, int64_t t) {
            // Heaviest tiles first (under causal the last query tiles see the most keys).
            const int64_t qt = n_qtiles - 1 - t / (B * H);
            const int64_t bh = t % (B * H);
            const int64_t i0 = qt * q_tile;
            run_tile(buf, bh / H, bh % H, i0, min_of(q_tile, Lq - i0));
        };
        if (threads <= 1) {  // no OpenMP team at all: small calls stay cheap
            // Small calls reuse this thread's scratch instead of a malloc/free pair per call.
            static thread_local Scratch cached(kCachedScratchBytes);
            Scratch fresh(bytes <= kCachedScratchBytes ? 0 : bytes);
            Scratch& scratch = bytes <= kCachedScratchBytes ? cached : fresh;
            if (!scratch.ok()) throw_bad_alloc();
            scratch.reset();
            const TileBuffers<A> buf = carve<A>(scratch);
            for (int64_t t = 0; t < n_tasks && !stopped(); ++t) task(buf, t);
            if (stop != 0) throw_interrupted();
            return;
        }
        // Exceptions must not leave an OpenMP region: note a failed allocation, rethrow after.
        bool failed = false;
#pragma omp parallel num_threads(threads)
        {
            Scratch scratch(bytes);
            if (!scratch.ok()) {
#pragma omp atomic write
                failed = true;
            }
            const TileBuffers<A> buf = scratch.ok() ? carve<A>(scratch) : TileBuffers<A>{};
#pragma omp for schedule(dynamic, 1)
            for (int64_t t = 0; t < n_tasks; ++t) {
                if (!scratch.ok() || stopped()) continue;
                task(buf, t);
            }
        }
        if (failed) throw_bad_alloc();
        if (stop != 0) throw_interrupted();
    }
};

template <typename T, typename A>
void forward_blocked(const AttentionParams& p) {
    Blocked<T, A> kernel(p);
    kernel.run();
}

}  // namespace MHA_CPU_NS
}  // namespace mha
