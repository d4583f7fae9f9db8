// Serving room of the blocked CPU kernel: packed variable-length batches (attention_varlen,
// SPEC 6.2) and KV-cache decoding over contiguous or paged caches (attention_kvcache, 6.3).
// Both run the tile loop of tile_loop.h; they only choose the tasks.
//
// Versions:
//   forward_varlen    one task list over (sequence, query tile, head), heaviest first, so a
//                     long sequence among many short ones is cut into query tiles that run
//                     beside the short ones; each task runs on a view of its sequence (its
//                     own AttentionParams: pointers at its rows, its lengths).
//   forward_kvcache   the (batch, kv head) tasks of the cache, the group's query rows packed
//                     into one task (GQA reads each K/V tile once); a paged cache is read
//                     block by block through the block table; when B * Hk tasks cannot keep
//                     the threads busy the keys are split and the parts combined by lse.
//                     Decode (Lq * group <= kSpanRows, heads interleaved per key) takes the
//                     head-spanning tasks of decode_span.h instead.
// Part of the CPU kernel compiled once per instruction set (see attention_cpu_isa.cpp):
// include only from there, inside namespace mha::MHA_CPU_NS, no STL templates.
#pragma once

#include "cpu/kernel/decode_span.h"
#include "cpu/kernel/tile_loop.h"

namespace mha {
namespace MHA_CPU_NS {

// Keys per split at least this many: a split shorter than this costs more to merge than
// it gains.
constexpr int64_t kMinSplitKeys = 512;
constexpr int64_t kMaxSplits = 64;

// Heaviest first: sorts idx[0..n) by cost[idx] descending (heapsort: no STL templates).
inline void sort_by_cost_desc(int64_t* idx, const double* cost, int64_t n) {
    auto sift = [&](int64_t root, int64_t end) {
        for (;;) {
            int64_t c = 2 * root + 1;
            if (c >= end) return;
            // A min-heap on cost, popped to the back: the result runs from the largest down.
            if (c + 1 < end && cost[idx[c + 1]] < cost[idx[c]]) ++c;
            if (!(cost[idx[c]] < cost[idx[root]])) return;
            const int64_t t = idx[c];
            idx[c] = idx[root];
            idx[root] = t;
            root = c;
        }
    };
    for (int64_t r = n / 2 - 1; r >= 0; --r) sift(r, n);
    for (int64_t end = n - 1; end > 0; --end) {
        const int64_t t = idx[0];
        idx[0] = idx[end];
        idx[end] = t;
        sift(0, end);
    }
}

template <typename T, typename A>
void forward_varlen(const VarlenParams& p) {
    Blocked<T, A> kernel(p);
    kernel.prepare();
    const int64_t nseq = p.batch;
    const int64_t Ht = kernel.pack ? p.num_heads_k : p.num_heads_q;
    const int64_t q_tile = kernel.q_tile;
    // The (sequence, query tile) entries: seq[e], i0[e], cost[e]; order[] sorts them.
    int64_t n_entries = 0;
    for (int64_t b = 0; b < nseq; ++b) {
        const int64_t rows = kernel.task_rows(p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b]);
        n_entries += (rows + q_tile - 1) / q_tile;
    }
    if (n_entries == 0) return;
    const int64_t list_bytes = Scratch::bytes_for<int64_t>({n_entries, n_entries, n_entries}) +
                               Scratch::bytes_for<double>({n_entries});
    Scratch list(list_bytes);
    if (!list.ok()) throw_bad_alloc(list_bytes);
    int64_t* seq = list.take<int64_t>(n_entries);
    int64_t* first = list.take<int64_t>(n_entries);
    int64_t* order = list.take<int64_t>(n_entries);
    double* cost = list.take<double>(n_entries);
    double flops = 0;
    for (int64_t b = 0, e = 0; b < nseq; ++b) {
        const int64_t lq = p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b];
        const int64_t lk = p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b];
        const int64_t rows = kernel.task_rows(lq);
        flops += 2.0 * p.num_heads_q * lq * lk * (kernel.dk + p.head_dim_v);
        for (int64_t i0 = 0; i0 < rows; i0 += q_tile, ++e) {
            const int64_t nq = min_of(q_tile, rows - i0);
            // Keys the tile's last row may see: all, or up to its causal diagonal.
            int64_t keys = lk;
            if (p.causal != Causal::kNone) {
                const int64_t i_last = kernel.pack ? (i0 + nq - 1) / kernel.group : i0 + nq - 1;
                const int64_t diag = i_last + (p.causal == Causal::kTopLeft ? 0 : lk - lq);
                keys = max_of<int64_t>(0, min_of(lk, diag + 1));
            }
            seq[e] = b;
            first[e] = i0;
            cost[e] = static_cast<double>(nq) * static_cast<double>(keys + 1);
            order[e] = e;
        }
    }
    sort_by_cost_desc(order, cost, n_entries);
    kernel.execute(n_entries * Ht, flops, [&](const TileBuffers<A>& buf, int64_t t) {
        const int64_t e = order[t / Ht], h = t % Ht, b = seq[e];
        const int64_t q0 = p.cu_seqlens_q[b], k0 = p.cu_seqlens_k[b];
        // Sequence b as a one-batch call of its own lengths (the visibility rule then aligns
        // per sequence); the lse keeps the packed (Hq, total_q) rows.
        AttentionParams ps = p;
        ps.batch = 1;
        ps.seqlen_q = p.cu_seqlens_q[b + 1] - q0;
        ps.seqlen_k = p.cu_seqlens_k[b + 1] - k0;
        ps.q = static_cast<const T*>(p.q) + q0 * p.q_stride_seq;
        ps.k = static_cast<const T*>(p.k) + k0 * p.k_stride_seq;
        ps.v = static_cast<const T*>(p.v) + k0 * p.v_stride_seq;
        ps.out = static_cast<T*>(p.out) + q0 * p.out_stride_seq;
        if (p.lse != nullptr) ps.lse = static_cast<A*>(p.lse) + q0;
        ps.lse_stride_head = p.total_q;
        if (p.alibi_slopes != nullptr) {
            ps.alibi_slopes = static_cast<const A*>(p.alibi_slopes) + b * p.alibi_stride_batch;
            ps.alibi_stride_batch = 0;
        }
        const int64_t rows = kernel.task_rows(ps.seqlen_q);
        const Blocked<T, A> view(ps, kernel);
        view.run_tile(buf, 0, h, first[e], min_of(q_tile, rows - first[e]));
        if (view.stop != 0) {
#pragma omp atomic write
            kernel.stop = 1;
        }
    });
}

template <typename T, typename A>
void forward_kvcache(const KvcacheParams& p) {
    if (span_fits(p)) {  // few rows per K/V head: tasks over key chunks of all heads
        forward_span<T, A>(p, &p);
        return;
    }
    Blocked<T, A> kernel(p);
    kernel.kv = &p;
    kernel.prepare();
    const int64_t Ht = kernel.pack ? p.num_heads_k : p.num_heads_q;
    const int64_t rows = kernel.task_rows(p.seqlen_q);
    const int64_t tasks = p.batch * Ht * ((rows + kernel.q_tile - 1) / kernel.q_tile);
    int64_t longest = 0;
    for (int64_t b = 0; b < p.batch; ++b) longest = max_of(longest, valid_keys(p, b));
    // Splits: asked for (at most num_splits), or enough to give every thread two tasks.
    int64_t splits = p.num_splits;
    if (splits == 0) {
        const int64_t threads = kernel.max_threads();
        splits = tasks >= threads ? 1 : (2 * threads + tasks - 1) / tasks;
        splits = min_of(splits, max_of<int64_t>(1, longest / kMinSplitKeys));
    }
    splits = max_of<int64_t>(1, min_of(min_of(splits, kMaxSplits), (longest + kBlockK - 1) / kBlockK));
    const int64_t n_rows = p.batch * p.num_heads_q * p.seqlen_q;
    // Partials: acc (splits, rows, Dv), m and l (splits, rows).
    const int64_t parts_bytes = splits > 1 ? Scratch::bytes_for<A>({splits * n_rows * p.head_dim_v,
                                                                    splits * n_rows, splits * n_rows})
                                           : 0;
    Scratch parts(parts_bytes);
    if (!parts.ok()) throw_bad_alloc(parts_bytes);
    if (splits > 1) {
        kernel.splits = splits;
        kernel.split_keys = round_up((longest + splits - 1) / splits, kBlockK);
        kernel.part_acc = parts.take<A>(splits * n_rows * p.head_dim_v);
        kernel.part_m = parts.take<A>(splits * n_rows);
        kernel.part_l = parts.take<A>(splits * n_rows);
    }
    kernel.run_tasks();
}

}  // namespace MHA_CPU_NS
}  // namespace mha
