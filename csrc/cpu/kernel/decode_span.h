// Head-spanning decode room of the blocked CPU kernel (issue 12): few query rows per K/V head
// (decode, Lq * group <= kSpanRows) over a cache whose heads are interleaved per key, i.e. the
// (B, L, Hk, D) cache of attention_kvcache, its paged (num_blocks, block_size, Hk, D) pool,
// and attention(layout="blhd").
//
// The tile loop's tasks are (batch, head): in these layouts a head's K/V rows are D elements
// at a stride of Hk * D (4-16 KB at D = 128, fp32: one row per page), a stream the L2
// streamer does not follow, and the decode ran at a third of the read bandwidth. Here a task is (batch, key chunk) and owns
// every query row of the batch (one online-softmax state m, l, acc[Dv] per (query head, row)).
// It walks its keys in tiles of kSpanKeys keys (fewer when K/V are converted) and reads, for
// each key, all Hk heads' K rows (then the tile's V rows) in address order: Hk * D contiguous
// elements per key, block_size * Hk * D within a paged block. Each K/V head row is read once
// for its whole GQA group. No software prefetch: the streamer follows this stream, and
// prefetching measured 20-47% slower (benchmarks/NOTES.md, 2026-12-03). The chunks leave
// (acc, m, l) partials that Blocked::combine() merges by lse, as the tile loop's key-axis
// split does.
//
// Semantics are the tile loop's: key_lengths / cache_seqlens, causal alignment (bottom-right
// or top-left) for Lq > 1, the window, ALiBi and softcap (in bias_and_hide's order: softcap,
// ALiBi, hiding), lse, NaN rules (a NaN score poisons its row; a hidden p = 0 never meets an
// Inf/NaN value), fp16/bf16 storage converted per tile with float accumulation, float64.
// No mask, bias, weights or non-dot score: those calls keep the tile loop.
// MHA_EXT_KV_SPAN=0 in the environment forces the tile loop (for comparisons).
// Part of the CPU kernel compiled once per instruction set (see attention_cpu_isa.cpp):
// include only from there, inside namespace mha::MHA_CPU_NS, no STL templates.
#pragma once

#include "cpu/kernel/tile_loop.h"

namespace mha {
namespace MHA_CPU_NS {

constexpr int64_t kSpanKeys = 64;       // keys per tile (K/V read in place)
constexpr int64_t kSpanMinKeys = 16;    // keys per tile at least: a multiple of every vector width
constexpr int64_t kSpanConvertBytes = 64 << 10;  // converted K (V) rows of a tile at most
constexpr int64_t kSpanRows = 8;        // query rows per K/V head (Lq * group) at most
constexpr int64_t kSpanMaxRows = 256;  // query rows per batch (Hq * Lq) at most
constexpr int64_t kSpanMinChunk = 256;  // keys per chunk at least
constexpr int64_t kSpanMaxSplits = 64;  // chunks per batch at most
constexpr int64_t kSpanTasksPerThread = 4;   // chunks per thread when B alone is too few

// MHA_EXT_KV_SPAN=0: the old (batch, head) tile loop for every call.
inline bool span_disabled() {
    const char* s = std::getenv("MHA_EXT_KV_SPAN");
    return s != nullptr && s[0] == '0' && s[1] == '\0';
}

// True when a head's rows are interleaved per key: rows of the Hk heads of one key lie side by
// side (head stride >= the row, key stride >= Hk head strides), both strides positive.
inline bool span_interleaved(int64_t stride_head, int64_t stride_seq, int64_t row, int64_t hk) {
    return stride_head >= row && stride_seq >= stride_head * hk;
}

// Whether a call takes the head-spanning decode.
inline bool span_fits(const AttentionParams& p) {
    if (p.score != Score::kDot || p.mask != nullptr || p.bias != nullptr ||
        p.weights != nullptr || p.naive || p.num_heads_k < 2 || p.seqlen_q < 1) {
        return false;
    }
    const int64_t group = p.num_heads_q / p.num_heads_k;
    if (p.seqlen_q * group > kSpanRows || p.seqlen_q * p.num_heads_q > kSpanMaxRows) return false;
    if (!span_interleaved(p.k_stride_head, p.k_stride_seq, p.head_dim_k, p.num_heads_k) ||
        !span_interleaved(p.v_stride_head, p.v_stride_seq, p.head_dim_v, p.num_heads_k)) {
        return false;
    }
    return !span_disabled();
}

// One task: batch b, keys [split * split_keys, (split + 1) * split_keys) of it, every query
// row r = hq * Lq + i of the batch; leaves the partials of its rows in kn.part_*.
// Buffers (the kernel's TileBuffers, sized by forward_span): q_raw (R, dk) scaled queries,
// st (R, kS) scores then p, acc (R, dvp), m / l / range / diag / slope per row (R), lo the
// row's K/V head, hi whether the row sees the whole current tile, k_rows / v_rows the tile's
// converted rows (kS * Hk) when not read in place.
template <typename T, typename A>
void span_task(const Blocked<T, A>& kn, const TileBuffers<A>& buf, int64_t b, int64_t split,
               int64_t kS) {
    using V = vec_t<A>;
    constexpr int64_t kW = Vec<A>::kWidth;
    const AttentionParams& p = kn.p;
    const int64_t Hq = p.num_heads_q, Hk = p.num_heads_k, Lq = p.seqlen_q, R = Hq * Lq;
    const int64_t group = kn.group, dk = kn.dk, dv = p.head_dim_v, dvp = kn.dvp;
    const int64_t lk = valid_keys(p, b);
    const int64_t ks = split * kn.split_keys;
    const int64_t ke = min_of(ks + kn.split_keys, lk);
    const A neg_inf = -std::numeric_limits<A>::infinity();

    // Visible keys of each query position (the same for every head); their union, cut to the
    // chunk, bounds the walk.
    int64_t j_begin = lk, j_end = 0;
    for (int64_t i = 0; i < Lq; ++i) {
        KeyRange rr = visible_keys(p, i, lk);
        if (rr.lo > rr.hi) rr = {lk, -1};  // empty row: sees nothing
        const int64_t diag = diagonal(p, i, lk);
        for (int64_t hq = 0; hq < Hq; ++hq) {
            buf.range[hq * Lq + i] = rr;
            buf.diag[hq * Lq + i] = diag;
            buf.lo[hq * Lq + i] = static_cast<int32_t>(hq / group);
        }
        if (rr.lo <= rr.hi) {
            j_begin = min_of(j_begin, rr.lo);
            j_end = max_of(j_end, rr.hi + 1);
        }
    }
    j_begin = max_of(j_begin, ks);
    j_end = min_of(j_end, ke);
    for (int64_t r = 0; r < R; ++r) {
        buf.m[r] = neg_inf;
        buf.l[r] = 0;
    }
    for (int64_t x = 0; x < R * dvp; ++x) buf.acc[x] = 0;

    if (j_begin < j_end) {
        for (int64_t hq = 0; hq < Hq; ++hq) {
            for (int64_t i = 0; i < Lq; ++i) {
                const int64_t r = hq * Lq + i;
                load_row(kn.q_row(b, hq, i), buf.q_raw + r * dk, dk, kn.scale);
                if (p.alibi_slopes != nullptr) buf.slope[r] = alibi_slope<A>(p, b, hq);
            }
        }
    }
    const int64_t sks = p.k_stride_seq, skh = p.k_stride_head;
    const int64_t svs = p.v_stride_seq, svh = p.v_stride_head;
    const bool paged = kn.kv != nullptr && kn.kv->block_table != nullptr;
    const int64_t bs = paged ? kn.kv->block_size : 0;
    const A cap = static_cast<A>(p.softcap), inv_cap = p.softcap > 0 ? A(1) / cap : A(0);

    for (int64_t j0 = j_begin, nk = 0; j0 < j_end; j0 += nk) {
        if (kn.stopped()) return;  // the call is abandoned: outputs are not needed
        nk = min_of(kS, j_end - j0);
        if (paged) nk = min_of(nk, bs - j0 % bs);
        const int64_t nkv = round_up(nk, kW);  // the softmax runs over whole vectors
        const T* kb = kn.k_tile(b, 0, j0);  // key j0, head 0
        const T* vb = kn.v_tile(b, 0, j0);

        // K rows (key jj, head hk) at kr + jj * ldks + hk * ldkh: in place or converted.
        const A* kr;
        int64_t ldks, ldkh;
        if (kn.direct_k) {
            kr = reinterpret_cast<const A*>(kb);
            ldks = sks;
            ldkh = skh;
        } else {
            for (int64_t jj = 0; jj < nk; ++jj) {
                for (int64_t hk = 0; hk < Hk; ++hk) {
                    load_row(kb + jj * sks + hk * skh, buf.k_rows + (jj * Hk + hk) * dk, dk, A(1));
                }
            }
            kr = buf.k_rows;
            ldks = Hk * dk;
            ldkh = dk;
        }

        // Scores, key by key, each key's heads in address order; rows in quads of dot4_pairs.
        A* s = buf.st;  // s[r * kS + jj]
        for (int64_t jj = 0; jj < nk; ++jj) {
            const A* kj = kr + jj * ldks;
            for (int64_t r0 = 0; r0 < R; r0 += 4) {
                const A* qs[4];
                const A* kx[4];
                for (int64_t x = 0; x < 4; ++x) {
                    const int64_t r = min_of(r0 + x, R - 1);
                    qs[x] = buf.q_raw + r * dk;
                    kx[x] = kj + buf.lo[r] * ldkh;
                }
                A t[4];
                dot4_pairs(qs, kx, t, dk);
                const int64_t nr = min_of<int64_t>(4, R - r0);
                for (int64_t x = 0; x < nr; ++x) s[(r0 + x) * kS + jj] = t[x];
            }
        }

        // Per row: softcap, ALiBi, hiding (as bias_and_hide), then the online softmax.
        for (int64_t r = 0; r < R; ++r) {
            const KeyRange rr = buf.range[r];
            const bool whole = rr.lo <= j0 && rr.hi >= j0 + nk - 1;
            buf.hi[r] = whole;
            A* sr = s + r * kS;
            if (p.softcap > 0) {
                for (int64_t x = 0; x + kW <= nk; x += kW) {
                    vstore(sr + x, vtanh(vload(sr + x) * inv_cap) * cap);
                }
                for (int64_t x = nk / kW * kW; x < nk; ++x) sr[x] = softcap_score(sr[x], cap);
            }
            if (p.alibi_slopes != nullptr) {
                const A rel = static_cast<A>(buf.diag[r] - j0), slope = buf.slope[r];
                for (int64_t jj = 0; jj < nk; ++jj) {
                    sr[jj] -= slope * std::fabs(rel - static_cast<A>(jj));
                }
            }
            if (!whole) {
                for (int64_t jj = 0; jj < nk; ++jj) {
                    if (j0 + jj < rr.lo || j0 + jj > rr.hi) sr[jj] = neg_inf;
                }
            }
            for (int64_t jj = nk; jj < nkv; ++jj) sr[jj] = neg_inf;  // padding: p = 0

            V mv = vbroadcast<A>(neg_inf);
            for (int64_t x = 0; x < nkv; x += kW) {
                const V y = vload(sr + x);
                mv = y > mv ? y : mv;  // ignores NaN; a NaN still reaches l through exp
            }
            A mt = neg_inf;
            for (int w = 0; w < kW; ++w) mt = mv[w] > mt ? mv[w] : mt;
            const A m_old = buf.m[r];
            const A m_new = mt > m_old ? mt : m_old;
            const A m_safe = m_new == neg_inf ? A(0) : m_new;
            const A alpha = std::exp(m_old - m_safe);  // 0 while nothing was seen
            const V ms = vbroadcast<A>(m_safe);
            V sum{};
            for (int64_t x = 0; x < nkv; x += kW) {
                const V e = vexp(vload(sr + x) - ms);
                vstore(sr + x, e);
                sum += e;
            }
            A l_tile = 0;
            for (int w = 0; w < kW; ++w) l_tile += sum[w];
            buf.m[r] = m_new;
            buf.l[r] = buf.l[r] * alpha + l_tile;
            if (alpha != A(1)) {
                A* ar = buf.acc + r * dvp;
                for (int64_t d = 0; d < dvp; ++d) ar[d] *= alpha;
            }
        }

        // V rows: in place or converted (zero padded to dvp).
        const A* vr;
        int64_t ldvs, ldvh;
        if (kn.direct_v) {
            vr = reinterpret_cast<const A*>(vb);
            ldvs = svs;
            ldvh = svh;
        } else {
            for (int64_t jj = 0; jj < nk; ++jj) {
                for (int64_t hk = 0; hk < Hk; ++hk) {
                    A* dst = buf.v_rows + (jj * Hk + hk) * dvp;
                    load_row(vb + jj * svs + hk * svh, dst, dv, A(1));
                    for (int64_t d = dv; d < dvp; ++d) dst[d] = 0;
                }
            }
            vr = buf.v_rows;
            ldvs = Hk * dvp;
            ldvh = dvp;
        }

        // acc += p . V, four keys at a time, each key's heads in address order (a row's group
        // reads its V rows from L1). A row that does not see the whole tile skips its p = 0
        // keys, so a hidden Inf/NaN value never reaches it.
        for (int64_t j4 = 0; j4 < nk; j4 += 4) {
            const int64_t n4 = min_of<int64_t>(4, nk - j4);
            const A* vj = vr + j4 * ldvs;
            for (int64_t r = 0; r < R; ++r) {
                const A* pr = s + r * kS + j4;
                const A* vh = vj + buf.lo[r] * ldvh;
                A* ar = buf.acc + r * dvp;
                if (n4 == 4 && buf.hi[r] != 0) {
                    const V p0 = vbroadcast<A>(pr[0]), p1 = vbroadcast<A>(pr[1]),
                            p2 = vbroadcast<A>(pr[2]), p3 = vbroadcast<A>(pr[3]);
                    const A* v1 = vh + ldvs;
                    const A* v2 = v1 + ldvs;
                    const A* v3 = v2 + ldvs;
                    for (int64_t d = 0; d < dvp; d += kW) {
                        V a = vload(ar + d);
                        a += p0 * vload(vh + d);
                        a += p1 * vload(v1 + d);
                        a += p2 * vload(v2 + d);
                        a += p3 * vload(v3 + d);
                        vstore(ar + d, a);
                    }
                    continue;
                }
                for (int64_t x = 0; x < n4; ++x) {
                    const A pj = pr[x];
                    if (buf.hi[r] == 0 && pj == 0) continue;
                    const V pv = vbroadcast<A>(pj);
                    const A* vx = vh + x * ldvs;
                    for (int64_t d = 0; d < dvp; d += kW) {
                        vstore(ar + d, vload(ar + d) + pv * vload(vx + d));
                    }
                }
            }
        }
    }

    // The partials of this chunk (Blocked::combine's layout: row (b * Hq + hq) * Lq + i).
    const int64_t rows = p.batch * R;
    for (int64_t r = 0; r < R; ++r) {
        const int64_t x = split * rows + b * R + r;
        kn.part_m[x] = buf.m[r];
        kn.part_l[x] = buf.l[r];
        const A* ar = buf.acc + r * dvp;
        A* dst = kn.part_acc + x * dv;
        for (int64_t d = 0; d < dv; ++d) dst[d] = ar[d];
    }
}

// The head-spanning decode of a call that span_fits(): kv the paged / contiguous cache of
// attention_kvcache (nullptr: attention's blhd arrays). Tasks (batch, key chunk); the chunks
// are merged by Blocked::combine (one chunk: combine only normalises).
template <typename T, typename A>
void forward_span(const AttentionParams& p, const KvcacheParams* kv) {
    Blocked<T, A> kernel(p);
    kernel.kv = kv;
    kernel.prepare();
    constexpr int64_t kW = Vec<A>::kWidth;
    const int64_t B = p.batch, R = p.num_heads_q * p.seqlen_q;
    // The per-thread buffers span_task carves from the tile buffers: bq rows of state, bk
    // converted K/V rows (one tile of all heads; none when both are read in place).
    kernel.amx = false;
    kernel.bq = round_up(R, kW);
    // Keys per tile: kSpanKeys, or fewer (down to kSpanMinKeys) when the tile's rows are
    // converted, so that the converted K (V) tile stays within kSpanConvertBytes.
    const bool direct = kernel.direct_k && kernel.direct_v;
    const int64_t row_bytes = p.num_heads_k * max_of(kernel.dk, kernel.dvp) *
                              static_cast<int64_t>(sizeof(A));
    const int64_t kS = direct ? kSpanKeys
                        : max_of(kSpanMinKeys, min_of(kSpanKeys, kSpanConvertBytes / row_bytes /
                                                                     kSpanMinKeys * kSpanMinKeys));
    kernel.bk = direct ? kS : kS * p.num_heads_k;

    int64_t longest = 0;
    for (int64_t b = 0; b < B; ++b) longest = max_of(longest, valid_keys(p, b));
    // Chunks per batch: asked for (at most num_splits), or enough for kSpanTasksPerThread
    // tasks per thread, none shorter than kSpanMinChunk keys.
    int64_t splits = kv != nullptr ? kv->num_splits : 0;
    if (splits == 0) {
        const int64_t threads = kernel.max_threads();
        splits = (kSpanTasksPerThread * threads + B - 1) / B;
        splits = min_of(splits, max_of<int64_t>(1, longest / kSpanMinChunk));
    }
    splits = max_of<int64_t>(
        1, min_of(min_of(splits, kSpanMaxSplits), (longest + kSpanKeys - 1) / kSpanKeys));
    const int64_t n_rows = B * R, dv = p.head_dim_v;
    const int64_t parts_bytes =
        Scratch::bytes_for<A>({splits * n_rows * dv, splits * n_rows, splits * n_rows});
    Scratch parts(parts_bytes);
    if (!parts.ok()) throw_bad_alloc(parts_bytes);
    kernel.splits = splits;
    kernel.split_keys = round_up((longest + splits - 1) / splits, kSpanKeys);
    kernel.part_acc = parts.take<A>(splits * n_rows * dv);
    kernel.part_m = parts.take<A>(splits * n_rows);
    kernel.part_l = parts.take<A>(splits * n_rows);

    const double flops = 2.0 * B * R * static_cast<double>(longest) * (kernel.dk + dv);
    kernel.execute(B * splits, flops, [&](const TileBuffers<A>& buf, int64_t t) {
        span_task(kernel, buf, t / splits, t % splits, kS);
    });
    const int threads = kernel.max_threads();
#pragma omp parallel for num_threads(threads) schedule(static) if (n_rows > 64 && threads > 1)
    for (int64_t x = 0; x < n_rows; ++x) kernel.combine(x, x + 1);
}

}  // namespace MHA_CPU_NS
}  // namespace mha
