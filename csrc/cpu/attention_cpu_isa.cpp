// CPU attention kernels: this translation unit is compiled once per instruction set listed in
// CMakeLists.txt (MHA_CPU_ISAS), each time with that set's flags, namespace (MHA_CPU_NS) and
// vector width (MHA_CPU_VEC_BYTES); attention_cpu.cpp's table picks one copy at run time.
//
// Versions:
//   attention_forward_naive    one query row at a time, all Lk scores in a row buffer, a plain
//                              softmax (kernel/naive.h). Documents the math; used as a
//                              cross-check by the tests.
//   attention_forward          tiled ("flash") forward (kernel/tile_loop.h): a (kBlockQ x
//                              head_dim) query tile meets (kBlockK x head_dim) key/value tiles
//                              packed to accum_t; scores and P.V are register-blocked GEMM
//                              micro-kernels (6 rows x 2 vectors for 16 AVX registers, 6 x 4
//                              and 12 x 2 for 32 zmm registers, kernel/micro.h) written with
//                              GCC vector extensions, so the same source becomes SSE2, AVX2+FMA
//                              or AVX-512 code; bf16 in the amx copy runs both products on AMX
//                              tiles (kernel/amx.h); the online softmax (kernel/softmax.h) rescales a
//                              row only when its max grows; tiles hidden by causal / window /
//                              key_lengths / an all-false mask block are skipped
//                              (kernel/masking.h); one-row tasks take the decode row path
//                              (kernel/decode_row.h). OpenMP tasks are (batch, head, query
//                              tile), heaviest first, dynamic. Weights, when asked for, come
//                              from a second pass over the tiles: w = exp(s - lse), so no
//                              Lq x Lk buffer exists otherwise.
//   attention_forward_varlen   packed variable-length batches (kernel/serving.h): the tile
//                              loop over one task list of (sequence, query tile, head).
//   attention_forward_kvcache  KV-cache decoding, contiguous or paged (kernel/serving.h):
//                              grouped-query rows packed per K/V head, key-axis splits
//                              combined by lse; decode (few rows per K/V head) on caches
//                              whose heads are interleaved per key, and attention's blhd
//                              decode, run tasks of key chunks over all heads
//                              (kernel/decode_span.h).
//   merge                      partial results over key shards combined by lse (SPEC 6.1,
//                              kernel/merge.h): one pass over the parts' rows.
//   attention_backward         tiled backward (kernel/backward.h, SPEC 6.4): FlashAttention-2's
//                              algorithm over key blocks, P recomputed from lse.
//
// Conventions: a row with no visible key (max = -inf) gets output 0, weights 0, lse = -inf
// (PyTorch's _safe_softmax, FlashAttention, ggml). A NaN score in a visible position poisons
// its row: output, weights and lse become NaN, never a silent 0.
#include "cpu/attention_cpu.h"
#include "cpu/kernel/backward.h"
#include "cpu/kernel/merge.h"
#include "cpu/kernel/naive.h"
#include "cpu/kernel/serving.h"
#include "cpu/kernel/tile_loop.h"
#include "switch.h"

namespace mha {
namespace MHA_CPU_NS {

void attention_forward(const AttentionParams& p) {
    MHA_DTYPE_SWITCH(p.dtype, f16, bf16, T, A, [&] {
        if (span_fits(p)) {  // blhd decode: tasks over key chunks of all heads
            forward_span<T, A>(p, nullptr);
        } else {
            forward_blocked<T, A>(p);
        }
    });
}

void attention_forward_naive(const AttentionParams& p) {
    MHA_DTYPE_SWITCH(p.dtype, f16, bf16, T, A, [&] { forward_naive<T, A>(p); });
}

void attention_forward_varlen(const VarlenParams& p) {
    MHA_DTYPE_SWITCH(p.dtype, f16, bf16, T, A, [&] { forward_varlen<T, A>(p); });
}

void attention_forward_kvcache(const KvcacheParams& p) {
    MHA_DTYPE_SWITCH(p.dtype, f16, bf16, T, A, [&] { forward_kvcache<T, A>(p); });
}

void attention_backward(const BackwardParams& p) {
    MHA_DTYPE_SWITCH(p.dtype, f16, bf16, T, A, [&] { backward_blocked<T, A>(p); });
}

void merge(const MergeParams& p) {
    MHA_DTYPE_SWITCH(p.dtype, f16, bf16, T, A, [&] { merge_rows<T, A>(p); });
}

void vector_tanh(const float* x, float* y, int64_t n) {
    constexpr int64_t kW = Vec<float>::kWidth;
    int64_t i = 0;
    for (; i + kW <= n; i += kW) vstore(y + i, vtanh(vload(x + i)));
    if (i < n) {  // the tail through one padded vector
        float buf[kW] = {};
        for (int64_t t = i; t < n; ++t) buf[t - i] = x[t];
        vstore(buf, vtanh(vload(buf)));
        for (int64_t t = i; t < n; ++t) y[t] = buf[t - i];
    }
}

}  // namespace MHA_CPU_NS
}  // namespace mha
