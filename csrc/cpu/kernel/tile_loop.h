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
    A* packed_mem = nullptr;  // owns w_q / w_k / w_vec (prepare(); views borrow them)

    // Grouped-query packing (no mask, bias or weights): a task is one key/value head and its
    // rows are "virtual" rows v = i * group + g, query head h * group + g and row i. The
    // group's query heads then read each K/V tile once (decode: the group's rows are one
    // block), and the visible ranges still grow with v (a diagonal tile stays one run).
    bool pack = false;
    // attention_kvcache: the paged cache (nullptr: contiguous) and the key-axis splits. With
    // splits > 1 a task covers keys [s * split_keys, (s + 1) * split_keys) and leaves its
    // unnormalised partial (acc, m, l) in part_* for combine() (merge_cpu.cpp's rule).
    const KvcacheParams* kv = nullptr;
    int64_t splits = 1;
    int64_t split_keys = 0;
    A* part_acc = nullptr;  // (splits, B * Hq * Lq, Dv)
    A* part_m = nullptr;    // (splits, B * Hq * Lq)
    A* part_l = nullptr;    // (splits, B * Hq * Lq)

    explicit Blocked(const AttentionParams& params) : p(params) {}
    ~Blocked() { std::free(packed_mem); }
    Blocked(const Blocked&) = delete;
    Blocked& operator=(const Blocked&) = delete;

    // A view of `like` (the prepared kernel: geometry, packed weights) over other params:
    // attention_varlen runs one sequence's tasks on a view of its own AttentionParams.
    Blocked(const AttentionParams& params, const Blocked& like)
        : TileDims(like), p(params), group(like.group), direct_k(like.direct_k),
          direct_v(like.direct_v), q_tile(like.q_tile), scale(like.scale), w_q(like.w_q),
          w_k(like.w_k), w_vec(like.w_vec), pack(like.pack) {}

    // Tasks with at most this many rows take the GEMV / streaming P.V path. A packed decode
    // group (a few rows over one K/V head) is memory bound: its rows re-read each K/V tile
    // from L1 instead of padding a GEMM tile to whole vectors.
    int64_t gemv_rows() const { return pack ? kPackGemvRows : kGemvRows; }

    // Query head and row of task row v (see pack).
    void row_of(int64_t h, int64_t v, int64_t* hq, int64_t* i) const {
        if (pack) {
            *hq = h * group + v % group;
            *i = v / group;
        } else {
            *hq = h;
            *i = v;
        }
    }
    const T* q_row(int64_t b, int64_t hq, int64_t i) const {
        return static_cast<const T*>(p.q) + b * p.q_stride_batch + hq * p.q_stride_head +
               i * p.q_stride_seq;
    }
    // K (V) rows of keys j0 .. of kv head hk in batch b: contiguous rows, or (paged) the rows
    // of one block from j0 on (tile_keys() keeps a tile inside one block).
    const T* kv_rows(const void* base, int64_t sb, int64_t sblock, int64_t sh, int64_t ss,
                     int64_t b, int64_t hk, int64_t j0) const {
        const T* t = static_cast<const T*>(base) + hk * sh;
        if (kv == nullptr || kv->block_table == nullptr) return t + b * sb + j0 * ss;
        const int64_t bs = kv->block_size;
        const int64_t block = kv->block_table[b * kv->block_table_stride + j0 / bs];
        return t + block * sblock + (j0 % bs) * ss;
    }
    const T* k_tile(int64_t b, int64_t hk, int64_t j0) const {
        return kv_rows(p.k, p.k_stride_batch, kv != nullptr ? kv->k_stride_block : 0,
                       p.k_stride_head, p.k_stride_seq, b, hk, j0);
    }
    const T* v_tile(int64_t b, int64_t hk, int64_t j0) const {
        return kv_rows(p.v, p.v_stride_batch, kv != nullptr ? kv->v_stride_block : 0,
                       p.v_stride_head, p.v_stride_seq, b, hk, j0);
    }
    // Keys of the tile starting at j0 (the range ends at j_end): kBlockK, or up to the end of
    // j0's block in a paged cache.
    int64_t tile_keys(int64_t j0, int64_t j_end) const {
        int64_t nk = min_of(kBlockK, j_end - j0);
        if (kv != nullptr && kv->block_table != nullptr) {
            nk = min_of(nk, kv->block_size - j0 % kv->block_size);
        }
        return nk;
    }

    // Q^T (dk x nqc) for dot/general, or Q W_q (nq x dap) for additive. Columns nq..nqc of
    // Q^T are zero: those queries do not exist and are never stored.
    void load_queries(const TileBuffers<A>& buf, int64_t b, int64_t h, int64_t i0, int64_t nq,
                      int64_t nqc) const {
        const T* q_rows[kBlockQ];
        for (int64_t r = 0; r < nq; ++r) {
            int64_t hq, i;
            row_of(h, i0 + r, &hq, &i);
            q_rows[r] = q_row(b, hq, i);
        }
        if (p.score == Score::kDot) {
            // q_raw keeps the scaled rows (the decode path reads them), qt their transpose.
            for (int64_t r = 0; r < nq; ++r) {
                A* row = buf.q_raw + r * dq;
                load_row(q_rows[r], row, dq, scale);
                for (int64_t d = 0; d < dq; ++d) buf.qt[d * nqc + r] = row[d];
            }
        } else {
            for (int64_t r = 0; r < nq; ++r) load_row(q_rows[r], buf.q_raw + r * dq, dq, A(1));
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
        } else if (nq <= gemv_rows()) {
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

    // One task: batch b, query head h (pack: kv head h), task rows i0 .. i0+nq; keys
    // [ks, ke) only (a key-axis split; the visibility rule still speaks of whole rows).
    void run_tile(const TileBuffers<A>& buf, int64_t b, int64_t h, int64_t i0, int64_t nq,
                  int64_t split = 0) const {
        const int64_t hk = pack ? h : h / group;
        const int64_t lk = valid_keys(p, b);
        const int64_t nqc = round_up(nq, kW);
        // No mask, bias or weights when packing (setup() decides): their row 0 is (h, i0).
        const uint8_t* mask = mask_row(p, b, h, i0);
        const A* bias = bias_row<A>(p, b, h, i0);
        const int64_t ks = splits > 1 ? split * split_keys : 0;
        const int64_t ke = splits > 1 ? ks + split_keys : lk;

        // Visible key interval per row; the union over rows bounds the tiles we visit.
        int64_t j_begin = lk, j_end = 0;
        for (int64_t r = 0; r < nq; ++r) {
            int64_t hq, i;
            row_of(h, i0 + r, &hq, &i);
            KeyRange rr = visible_keys(p, i, lk);
            if (rr.lo > rr.hi) rr = {lk, -1};  // empty row: sees nothing
            buf.range[r] = rr;
            if (rr.lo <= rr.hi) {
                j_begin = min_of(j_begin, rr.lo);
                j_end = max_of(j_end, rr.hi + 1);
            }
            if (p.alibi_slopes != nullptr) {
                buf.diag[r] = diagonal(p, i, lk);
                buf.slope[r] = alibi_slope<A>(p, b, hq);
            }
        }
        j_begin = max_of(j_begin, ks);
        j_end = min_of(j_end, ke);
        const A neg_inf = -std::numeric_limits<A>::infinity();
        for (int64_t r = 0; r < nqc; ++r) {
            buf.m[r] = neg_inf;
            buf.l[r] = 0;
        }
        // bf16 on AMX (amx.h): tasks of more than kGemvRows queries, dot score; not for
        // tasks that pack the query rows of a GQA group (their rows come from several heads).
        const bool use_amx = amx && !pack && nq > kGemvRows && j_begin < j_end;
        for (int64_t x = 0; x < (use_amx ? nqc : nq) * dvp; ++x) buf.acc[x] = 0;

        // (AMX tasks read their own Q^T; the fp32 one only serves the weights pass.)
        if (j_begin < j_end && !(use_amx && p.weights == nullptr)) {
            load_queries(buf, b, h, i0, nq, nqc);
        }
        const bool row_path = nq == 1 && p.score == Score::kDot;
#if MHA_CPU_AMX
        const AmxTask amx_task(use_amx);
        const float amx_scale =
            use_amx ? amx_pack_queries(reinterpret_cast<const bf16*>(q_row(b, h, i0)),
                                       p.q_stride_seq, nq, nqc, dk, static_cast<float>(p.scale),
                                       buf.amx_q)
                    : 1.0f;
        (void)amx_scale;  // read by bf16 tasks only
#endif
        for (int64_t j0 = j_begin, nk = 0; j0 < j_end; j0 += nk) {
            if (stopped()) return;  // the call is abandoned: outputs are not needed
            nk = tile_keys(j0, j_end);
            const uint8_t* mask_j = mask == nullptr ? nullptr : mask + j0 * p.mask_stride_k;
            const A* bias_j = bias == nullptr ? nullptr : bias + j0 * p.bias_stride_k;
            const TileBlock blk = block_visibility(p, buf, j0, nq, nk, mask_j);
            if (!blk.any) continue;  // hidden tile: skip it whole
#if MHA_CPU_AMX
            if constexpr (AmxStorage<T>::value) {
                if (use_amx) {
                    amx_tile_step(p, *this, buf, blk, j0, nq, nqc, nk, k_tile(b, hk, j0),
                                  v_tile(b, hk, j0), mask_j, bias_j, amx_scale);
                    continue;
                }
            }
#endif
            int64_t ldk, ldv;
            const A* k_rows = key_rows(buf, k_tile(b, hk, j0), nk, &ldk);
            if (row_path) {
                const A* vr = value_rows(buf, v_tile(b, hk, j0), nk, &ldv);
                row_update(p, *this, buf, blk, j0, nk, k_rows, ldk, direct_k && direct_v, vr, ldv,
                           mask_j, bias_j);
                continue;
            }
            scores(buf, blk, j0, nq, nqc, blk.c0, blk.c1, nk, k_rows, ldk, mask_j, bias_j);
            softmax_update(buf, nq, nqc, blk.c0, blk.c1, nk, dvp);
            const A* v_rows = value_rows(buf, v_tile(b, hk, j0), nk, &ldv);
            // acc (nq x dvp) += P (nq x nk) . V (nk x dvp), P read from P^T by columns. Where
            // some pair is hidden, p = 0 must not meet an Inf/NaN value (0 * inf = NaN): such
            // tiles, rare, take a product that skips zero probabilities.
            const bool hidden = !blk.inside || blk.masked || bias != nullptr;
            const int64_t r0 = blk.c0, nr = min_of(blk.c1, nq) - blk.c0;
            if (hidden && !all_finite(v_rows, nk, ldv, dvp)) {
                pv_skip_zero(buf, r0, nr, nqc, nk, v_rows, ldv, dvp);
            } else if (nr <= gemv_rows()) {
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

        const int64_t H = p.num_heads_q, Lq = p.seqlen_q;
        if (splits > 1) {  // a partial: combine() normalises the splits together
            const int64_t rows = p.batch * H * Lq;
            for (int64_t r = 0; r < nq; ++r) {
                int64_t hq, i;
                row_of(h, i0 + r, &hq, &i);
                const int64_t x = split * rows + (b * H + hq) * Lq + i;
                part_m[x] = buf.m[r];
                part_l[x] = buf.l[r];
                const A* ar = buf.acc + r * dvp;
                A* dst = part_acc + x * p.head_dim_v;
                for (int64_t d = 0; d < p.head_dim_v; ++d) dst[d] = ar[d];
            }
            return;
        }

        // out = acc / l. l = 0: no visible key, the output is defined as 0 and lse = -inf.
        // l = NaN: a NaN score reached the row, and output and lse are NaN.
        // lse feeds the lse output and the weights' second pass (NaN rows); else skip the log.
        const bool need_lse = p.lse != nullptr || p.weights != nullptr;
        const int64_t lsh = p.lse_stride_head != 0 ? p.lse_stride_head : Lq;
        for (int64_t r = 0; r < nq; ++r) {
            int64_t hq, i;
            row_of(h, i0 + r, &hq, &i);
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
            T* out = static_cast<T*>(p.out) + b * p.out_stride_batch + hq * p.out_stride_head +
                     i * p.out_stride_seq;
            store_row(ar, out, p.head_dim_v, inv);
            if (p.lse != nullptr) static_cast<A*>(p.lse)[(b * H + hq) * lsh + i] = buf.lse[r];
        }
        if (p.weights != nullptr) {
            const int64_t row0 = (b * H + h) * Lq + i0;
            const T* k = static_cast<const T*>(p.k) + b * p.k_stride_batch + hk * p.k_stride_head;
            write_weights(buf, static_cast<A*>(p.weights) + row0 * p.seqlen_k, k, nq, nqc,
                          j_begin, j_end, mask, bias);
        }
    }

    // Combines the key-axis splits of every row (merge_cpu.cpp's rule on unnormalised parts):
    // M = max m_s, L = sum l_s exp(m_s - M), out = sum acc_s exp(m_s - M) / L, lse = M + log L.
    // No key in any split (L = 0): output 0, lse -inf; NaN in a split makes the row NaN.
    void combine(int64_t row_lo, int64_t row_hi) const {
        const int64_t H = p.num_heads_q, Lq = p.seqlen_q, rows = p.batch * H * Lq;
        const int64_t dv = p.head_dim_v;
        const A neg_inf = -std::numeric_limits<A>::infinity();
        const int64_t lsh = p.lse_stride_head != 0 ? p.lse_stride_head : Lq;
        for (int64_t x = row_lo; x < row_hi; ++x) {
            A mx = neg_inf;
            for (int64_t sp = 0; sp < splits; ++sp) {
                const A m = part_m[sp * rows + x];
                mx = m > mx ? m : mx;
            }
            const A m_safe = mx == neg_inf ? A(0) : mx;
            A total = 0;
            A* acc = part_acc + x * dv;  // split 0's row accumulates the others
            for (int64_t sp = 0; sp < splits; ++sp) {
                const A w = part_l[sp * rows + x] == 0 ? A(0)
                                                       : std::exp(part_m[sp * rows + x] - m_safe);
                total += part_l[sp * rows + x] * w;
                if (sp == 0) {
                    for (int64_t d = 0; d < dv; ++d) acc[d] *= w;
                } else if (w != 0) {
                    const A* src = part_acc + (sp * rows + x) * dv;
                    for (int64_t d = 0; d < dv; ++d) acc[d] += w * src[d];
                }
            }
            const int64_t i = x % Lq, hq = (x / Lq) % H, b = x / (Lq * H);
            T* out = static_cast<T*>(p.out) + b * p.out_stride_batch + hq * p.out_stride_head +
                     i * p.out_stride_seq;
            const bool empty = total == 0;
            if (empty) {
                for (int64_t d = 0; d < dv; ++d) acc[d] = 0;
            }
            store_row(acc, out, dv, empty ? A(0) : A(1) / total);
            if (p.lse != nullptr) {
                static_cast<A*>(p.lse)[(b * H + hq) * lsh + i] =
                    empty ? neg_inf : mx + std::log(total);
            }
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

    // Rows of one task list entry per head: Lq, or Lq * group when packing.
    int64_t task_rows(int64_t lq) const { return pack ? lq * group : lq; }

    // The call's geometry, the grouped-query packing and the packed score parameters.
    void prepare() {
        const int64_t Lq = p.seqlen_q;
        dq = p.head_dim;
        dk = p.head_dim_k;
        group = p.num_heads_q / p.num_heads_k;
        scale = static_cast<A>(p.scale);
        dvp = round_up(p.head_dim_v, kW);
        pack = group > 1 && Lq <= kPackQueries && p.mask == nullptr && p.bias == nullptr &&
               p.weights == nullptr;
        const int64_t rows = task_rows(Lq);
        q_tile = rows <= kShortQueries ? kBlockQ / 2 : kBlockQ;
        bq = min_of(q_tile, round_up(rows, kW));
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
        if (p.score != Score::kDot) {
            const int64_t n = n_weights;
            packed_mem = static_cast<A*>(
                std::aligned_alloc(64, static_cast<size_t>(round_up(n * sizeof(A), 64))));
            if (packed_mem == nullptr) throw_bad_alloc(n * static_cast<int64_t>(sizeof(A)));
            A* packed = packed_mem;
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
    }

    // Runs task(buf, t) for t < n_tasks on the thread team (heaviest first is the caller's
    // order; dynamic schedule). `flops` decides whether a team is worth starting.
    template <typename Task>
    void execute(int64_t n_tasks, double flops, const Task& task) const {
        int threads = 1;
#ifdef _OPENMP
        threads = p.num_threads > 0 ? p.num_threads : omp_get_max_threads();
        if (threads > n_tasks) threads = static_cast<int>(n_tasks > 0 ? n_tasks : 1);
        // A call of a few microseconds gains nothing from a thread team, and starting one
        // wakes OpenMP threads that then spin against NumPy's BLAS threads between calls.
        if (p.num_threads <= 0 && flops < kSerialFlops) threads = 1;
#else
        (void)flops;
#endif
        const int64_t bytes = scratch_bytes<A>();
        if (threads <= 1) {  // no OpenMP team at all: small calls stay cheap
            // Small calls reuse this thread's scratch instead of a malloc/free pair per call.
            // A call that re-enters on this thread while the cache is in use (a Python signal
            // handler run from the outer call's Ctrl-C poll) takes a fresh block instead.
            static thread_local Scratch cached(kCachedScratchBytes);
            static thread_local bool cached_busy = false;
            const bool use_cached = bytes <= kCachedScratchBytes && !cached_busy;
            Scratch fresh(use_cached ? 0 : bytes);
            Scratch& scratch = use_cached ? cached : fresh;
            const CacheClaim claim(&cached_busy, use_cached);
            if (!scratch.ok()) throw_bad_alloc(use_cached ? kCachedScratchBytes : bytes);
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
        if (failed) throw_bad_alloc(bytes);
        if (stop != 0) throw_interrupted();
    }

    // The threads this call may use (OpenMP default or num_threads).
    int max_threads() const {
#ifdef _OPENMP
        return p.num_threads > 0 ? p.num_threads : omp_get_max_threads();
#else
        return 1;
#endif
    }

    // The (batch, head, query tile[, split]) task list: heaviest first (under causal the last
    // query tiles see the most keys), then combine() when the keys were split.
    void run_tasks() {
        const int64_t B = p.batch, Ht = pack ? p.num_heads_k : p.num_heads_q;
        const int64_t rows = task_rows(p.seqlen_q);
        const int64_t n_qtiles = (rows + q_tile - 1) / q_tile;
        const int64_t n_tasks = B * Ht * n_qtiles * splits;
        const double flops = 2.0 * B * p.num_heads_q * p.seqlen_q * p.seqlen_k * (dk + p.head_dim_v);
        execute(n_tasks, flops, [&](const TileBuffers<A>& buf, int64_t t) {
            const int64_t split = t % splits, u = t / splits;
            const int64_t qt = n_qtiles - 1 - u / (B * Ht);
            const int64_t bh = u % (B * Ht);
            const int64_t i0 = qt * q_tile;
            run_tile(buf, bh / Ht, bh % Ht, i0, min_of(q_tile, rows - i0), split);
        });
        if (splits > 1) {
            const int64_t n_rows = B * p.num_heads_q * p.seqlen_q;
            const int threads = max_threads();
#pragma omp parallel for num_threads(threads) schedule(static) if (n_rows > 64 && threads > 1)
            for (int64_t x = 0; x < n_rows; ++x) combine(x, x + 1);
        }
    }

    void run() {
        prepare();
        run_tasks();
    }
};

template <typename T, typename A>
void forward_blocked(const AttentionParams& p) {
    Blocked<T, A> kernel(p);
    kernel.run();
}

}  // namespace MHA_CPU_NS
}  // namespace mha
