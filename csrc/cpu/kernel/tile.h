// The shapes shared by the rooms of the blocked CPU kernel: block sizes, the geometry of one
// call (TileDims), the buffers of one thread (TileBuffers) and what a key tile can see
// (TileBlock).
// Part of the CPU kernel compiled once per instruction set (see attention_cpu_isa.cpp):
// include only from there, inside namespace mha::MHA_CPU_NS, no STL templates.
#pragma once

#include "cpu/kernel/common.h"
#include "visibility.h"

namespace mha {
namespace MHA_CPU_NS {
inline int64_t amx_scratch_bytes(int64_t dk, int64_t dvp, int64_t bq, int64_t bk);  // amx.h
}  // namespace MHA_CPU_NS
}  // namespace mha

namespace mha {
namespace MHA_CPU_NS {

#ifndef MHA_CPU_BLOCK_Q  // overridable at build time for tuning experiments
#define MHA_CPU_BLOCK_Q 192
#endif
#ifndef MHA_CPU_BLOCK_K
#define MHA_CPU_BLOCK_K 64
#endif
constexpr int64_t kBlockQ = MHA_CPU_BLOCK_Q;  // query rows per task: a multiple of 2 vectors
constexpr int64_t kShortQueries = 1024;  // up to this many queries, tasks take kBlockQ / 2 rows
constexpr int64_t kPackQueries = 16;  // GQA: up to this many queries, a group is one task
constexpr int64_t kGemvRows = 2;  // tasks with at most this many queries take the GEMV path
constexpr int64_t kPackGemvRows = 8;  // the same for a packed GQA group (tile_loop.h)
constexpr double kSerialFlops = 4e6;  // below this (~50 us on one core) stay on one thread
constexpr int64_t kCachedScratchBytes = 256 << 10;  // per-thread scratch kept between calls
constexpr int64_t kBlockK = MHA_CPU_BLOCK_K;  // keys per tile: P^T and a V panel fit L1
constexpr int64_t kPrefetchKeys = 16;  // decode: how far ahead K rows are prefetched

// The buffers of one thread.
template <typename A>
struct TileBuffers {
    A* qt;       // (dk, kBlockQ)      scale * Q^T, or scale * (Q W)^T for general
    A* q_proj;   // (kBlockQ, max(dkp, dap))  general: Q W; additive: Q W_q
    A* q_raw;    // (kBlockQ, dq)      q rows in accum_t (scaled for the dot score)
    A* k_rows;   // (kBlockK, dk)      converted keys (when not read in place)
    A* k_proj;   // (kBlockK, dap)     additive: K W_k
    A* v_rows;   // (kBlockK, dvp)     converted values, zero padded
    A* st;       // (kBlockK, kBlockQ) S^T, then P^T
    A* acc;      // (kBlockQ, dvp)     unnormalised output
    A* m;        // (kBlockQ)          running max per query
    A* l;        // (kBlockQ)          running sum per query
    A* alpha;    // (kBlockQ)          rescale factor of the current tile
    A* m_safe;   // (kBlockQ)          m, or 0 where m = -inf (so exp(-inf - m) = 0)
    A* lse;      // (kBlockQ)
    int32_t* lo;  // (kBlockQ)         visible keys of each row, relative to the tile
    int32_t* hi;  // (kBlockQ)
    KeyRange* range;  // (kBlockQ)     visible keys of each row, absolute
    int64_t* diag;    // (kBlockQ)     ALiBi: each row's diagonal i + off (visibility.h)
    A* slope;         // (kBlockQ)     ALiBi: each row's slope
    A* alibi_rel;     // (kBlockQ)     ALiBi: diag - j0 of the current tile
    // AMX path only (amx.h; null otherwise), bf16 bits: Q^T and V in the VNNI pair layout,
    // a zero-padded 16-key group of K, P in A-tile blocks; one 16 x 16 fp32 tile.
    uint16_t* amx_q = nullptr;
    uint16_t* amx_k = nullptr;
    uint16_t* amx_v = nullptr;
    uint16_t* amx_p = nullptr;
    float* amx_c = nullptr;
};

// What of a (nq rows x nk keys) block starting at key j0 can be seen.
struct TileBlock {
    bool any;     // some (row, key) pair passes causal / window / key_lengths and the mask
    bool inside;  // every row sees every key through causal / window / key_lengths
    bool masked;  // the bool mask hides some but not all pairs: check it per element
    int64_t c0, c1;  // query columns worth computing: rows that see some key of the
                     // block, widened to whole vectors (causal diagonals skip the rest)
};

// The geometry of one call, shared (read-only) by every thread's tasks.
struct TileDims {
    int64_t dq = 0;     // q head dim
    int64_t dk = 0;     // k head dim
    int64_t da = 0;     // additive score width
    int64_t dap = 0;    // da rounded up to the vector width
    int64_t dkp = 0;    // dk rounded up to the vector width (general / additive)
    int64_t dvp = 0;    // head_dim_v rounded up to the vector width
    // Buffer extents: the block sizes, or less for small problems (a tiny call must not
    // allocate, and page-fault, a full tile's scratch).
    int64_t bq = kBlockQ;
    int64_t bk = kBlockK;
    bool amx = false;  // bf16 tasks take the AMX micro-kernels (amx.h)

    template <typename A>
    int64_t scratch_bytes() const {
        const int64_t a = sizeof(A), pad = 64;
        const int64_t qp = max_of(dkp, dap);
        int64_t n = 0;
        n += round_up(dk * bq * a, pad) + round_up(bq * qp * a, pad) +
             round_up(bq * dq * a, pad);
        n += round_up(bk * dk * a, pad) + round_up(bk * dap * a, pad) +
             round_up(bk * dvp * a, pad);
        n += round_up(bk * bq * a, pad) + round_up(bq * dvp * a, pad);
        n += 5 * round_up(bq * a, pad) + 2 * round_up(bq * 4, pad) +
             round_up(bq * static_cast<int64_t>(sizeof(KeyRange)), pad);
        n += round_up(bq * 8, pad) + 2 * round_up(bq * a, pad);  // diag, slope, alibi_rel
        if (amx) n += amx_scratch_bytes(dk, dvp, bq, bk);
        return n + pad;
    }

    template <typename A>
    TileBuffers<A> carve(Scratch& sc) const {
        TileBuffers<A> buf;
        buf.qt = sc.take<A>(dk * bq);
        buf.q_proj = sc.take<A>(bq * max_of(dkp, dap));
        buf.q_raw = sc.take<A>(bq * dq);
        buf.k_rows = sc.take<A>(bk * dk);
        buf.k_proj = sc.take<A>(bk * dap);
        buf.v_rows = sc.take<A>(bk * dvp);
        buf.st = sc.take<A>(bk * bq);
        buf.acc = sc.take<A>(bq * dvp);
        buf.m = sc.take<A>(bq);
        buf.l = sc.take<A>(bq);
        buf.alpha = sc.take<A>(bq);
        buf.m_safe = sc.take<A>(bq);
        buf.lse = sc.take<A>(bq);
        buf.lo = sc.take<int32_t>(bq);
        buf.hi = sc.take<int32_t>(bq);
        buf.range = sc.take<KeyRange>(bq);
        buf.diag = sc.take<int64_t>(bq);
        buf.slope = sc.take<A>(bq);
        buf.alibi_rel = sc.take<A>(bq);
        if (amx) {
            const int64_t dk32 = round_up(dk, 32), bk32 = round_up(bk, 32);
            const int64_t bq16 = round_up(bq, 16);
            buf.amx_q = sc.take<uint16_t>(dk32 * bq16);
            buf.amx_k = sc.take<uint16_t>(16 * dk32);
            buf.amx_v = sc.take<uint16_t>(bk32 * round_up(dvp, 32));
            buf.amx_p = sc.take<uint16_t>(bq16 * bk32);
            buf.amx_c = sc.take<float>(16 * 16);
        }
        return buf;
    }
};

}  // namespace MHA_CPU_NS
}  // namespace mha
