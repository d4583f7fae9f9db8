// AttentionParams: the one plain struct that describes an attention call.
//
// Filled once by the binding (or a native benchmark), checked once by check_params() (every
// value invariant lives there, with one wording), then passed by const reference to a backend.
// A new entry point (backward, varlen, paged) adds a struct that extends this one. It holds no
// STL, pybind11 or CUDA types, so every backend (C++/OpenMP, CUDA) and every tool can include
// it.
//
// Index order. Every tensor is addressed through element strides (int64, may be 0 for
// broadcast axes, may be negative for reversed views), so the same struct serves the "bhld"
// and "blhd" layouts without a copy:
//   q   (batch, num_heads_q, seqlen_q, head_dim)      element [b,h,i,d] at
//        q + b*q_stride_batch + h*q_stride_head + i*q_stride_seq + d
//   k   (batch, num_heads_k, seqlen_k, head_dim_k)    the last axis is always contiguous
//   v   (batch, num_heads_k, seqlen_k, head_dim_v)
//   out (batch, num_heads_q, seqlen_q, head_dim_v)
//   mask    (batch, num_heads_q, seqlen_q, seqlen_k) bool bytes, any strides (0 = broadcast)
//   bias    (batch, num_heads_q, seqlen_q, seqlen_k) accum_t (float or double), any strides
//   weights (batch, num_heads_q, seqlen_q, seqlen_k) accum_t, C-contiguous
//   lse     (batch, num_heads_q, seqlen_q)           accum_t, C-contiguous
// Query head h reads key/value head h / (num_heads_q / num_heads_k) (grouped-query attention).
#pragma once

#include <cstdint>

namespace mha {

// The enum values below are exported to Python by the binding (_core.Causal, _core.Device)
// and are part of the native ABI between _core and the Python layer: append, never renumber.

enum class DType : int32_t { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

enum class Device : int32_t { kCpu = 0, kCuda = 1 };

// kNone: no causal mask. kBottomRight: key j visible to query i iff j <= i + (Lk_b - Lq)
// (FlashAttention >= 2.1, KV-cache decoding). kTopLeft: j <= i (PyTorch is_causal).
enum class Causal : int32_t { kNone = 0, kBottomRight = 1, kTopLeft = 2 };

// The classic score functions (scale defaults are the caller's business):
//   kDot      s = scale * q.k                       (Luong dot, Vaswani scaled dot)
//   kGeneral  s = scale * (q W).k,  W (head_dim, head_dim_k)          (Luong general)
//   kAdditive s = scale * w . tanh(q W_q + k W_k)                     (Bahdanau)
// Concat, s = w . tanh([q; k] W), is the additive form with W_q = W[:D] and W_k = W[D:].
enum class Score : int32_t { kDot = 0, kGeneral = 1, kAdditive = 2 };

struct AttentionParams {
    DType dtype = DType::kFloat32;  // of q, k, v and out
    Device device = Device::kCpu;

    const void* q = nullptr;
    const void* k = nullptr;
    const void* v = nullptr;
    void* out = nullptr;

    int64_t batch = 0;
    int64_t num_heads_q = 0;
    int64_t num_heads_k = 0;
    int64_t seqlen_q = 0;
    int64_t seqlen_k = 0;
    int64_t head_dim = 0;    // of q
    int64_t head_dim_k = 0;  // of k; equals head_dim for the dot score
    int64_t head_dim_v = 0;

    int64_t q_stride_batch = 0, q_stride_head = 0, q_stride_seq = 0;
    int64_t k_stride_batch = 0, k_stride_head = 0, k_stride_seq = 0;
    int64_t v_stride_batch = 0, v_stride_head = 0, v_stride_seq = 0;
    int64_t out_stride_batch = 0, out_stride_head = 0, out_stride_seq = 0;

    // Optional boolean mask, 1 = may attend. nullptr = no mask.
    const uint8_t* mask = nullptr;
    int64_t mask_stride_batch = 0, mask_stride_head = 0, mask_stride_q = 0, mask_stride_k = 0;

    // Optional additive bias in accum_t (float for fp32/fp16/bf16, double for fp64).
    const void* bias = nullptr;
    int64_t bias_stride_batch = 0, bias_stride_head = 0, bias_stride_q = 0, bias_stride_k = 0;

    // Optional (batch,) valid key counts: keys j >= key_lengths[b] are padding, never read.
    const int64_t* key_lengths = nullptr;

    Causal causal = Causal::kNone;
    // Sliding window around the causal diagonal: i + off - left <= j <= i + off + right,
    // off = Lk_b - Lq (top-left alignment: off = 0). -1 = unbounded on that side.
    int64_t window_left = -1;
    int64_t window_right = -1;

    // ALiBi (FlashAttention's): adds -slope * |i + off - j| to the scores (off as for the
    // window), computed in the kernel, never as a bias array. accum_t; the slope of (b, h) is
    // alibi_slopes[b * alibi_stride_batch + h] (stride 0: one (Hq,) vector). nullptr = none.
    const void* alibi_slopes = nullptr;
    int64_t alibi_stride_batch = 0;
    // Softcap (Gemma 2): s = softcap * tanh(s / softcap) after the scale, before bias, ALiBi
    // and masks. 0 = none; else finite and > 0.
    double softcap = 0;

    double scale = 1.0;

    // Score function parameters, C-contiguous accum_t. kGeneral: score_wq (head_dim,
    // head_dim_k). kAdditive: score_wq (head_dim, score_dim), score_wk (head_dim_k, score_dim),
    // score_w (score_dim,).
    Score score = Score::kDot;
    int64_t score_dim = 0;
    const void* score_wq = nullptr;
    const void* score_wk = nullptr;
    const void* score_w = nullptr;

    // Optional outputs (accum_t, C-contiguous). nullptr = not requested.
    void* weights = nullptr;
    void* lse = nullptr;
    // lse (b, h, i) at lse[(b * num_heads_q + h) * lse_stride_head + i]; 0 = seqlen_q (the
    // C-contiguous (B, Hq, Lq)). attention_varlen's (Hq, total_q) lse sets it.
    int64_t lse_stride_head = 0;

    int num_threads = 0;  // 0: OpenMP default (honours OMP_NUM_THREADS); else 1..kMaxThreads

    // Run the naive one-row-at-a-time CPU kernel instead (a cross-check for tests).
    bool naive = false;

    // Optional interrupt hook, polled by the calling thread between tiles. A non-zero return
    // abandons the call: the backend stops starting new tiles and throws mha::interrupted.
    int (*interrupt_check)(void* ctx) = nullptr;
    void* interrupt_ctx = nullptr;
};

// The largest num_threads accepted, and the rule as every error message states it.
constexpr int kMaxThreads = 4096;
#define MHA_NUM_THREADS_RULE "expected None (the OpenMP default) or a thread count from 1 to 4096"
// Throws std::invalid_argument unless 0 <= num_threads <= kMaxThreads (0: the OpenMP
// default): the one check of every entry point (attention, merge, S2, the layer kernels).
void check_num_threads(int num_threads);

// Throws std::invalid_argument (ValueError in Python) for a value that breaks an invariant of
// the struct: negative sizes, D < 1, D != Dk for the dot score, Hk = 0, Hq % Hk, an enum out
// of range, a window below -1, a non-finite scale (or one that overflows float32 logits),
// num_threads outside 0..kMaxThreads, key_lengths outside [0, Lk], missing score parameters
// or pointers. Defined in params.cpp; every native caller (binding, benchmarks) goes through
// it via attention_forward().
void check_params(const AttentionParams& params);

// attention_varlen (SPEC 6.2): packed sequences. The AttentionParams part describes the
// packed arrays as one batch of the longest sequences: batch = number of sequences,
// seqlen_q / seqlen_k = the longest lengths, q (total_q, Hq, D), k / v (total_k, Hk, D) and
// out (total_q, Hq, Dv) through their seq / head strides (the batch strides are unused);
// lse (Hq, total_q) with lse_stride_head = total_q; alibi_slopes (B, Hq) or (Hq,). Sequence b
// is query rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] and key rows likewise; nothing
// attends across sequences and causal / window / ALiBi align per sequence. key_lengths,
// mask, bias and weights are not used.
struct VarlenParams : AttentionParams {
    const int64_t* cu_seqlens_q = nullptr;  // (batch + 1): 0 .. total_q, non-decreasing
    const int64_t* cu_seqlens_k = nullptr;  // (batch + 1): 0 .. total_k, non-decreasing
    int64_t total_q = 0;
    int64_t total_k = 0;
};

// Every invariant of a VarlenParams: the AttentionParams part, then cu_seqlens (start at 0,
// non-decreasing, end at the total, longest lengths = seqlen_q / seqlen_k).
void check_varlen_params(const VarlenParams& params);

// attention_kvcache (SPEC 6.3): q (B, Lq, Hq, D) new tokens against a KV cache. The
// AttentionParams part is the call over the cache with key_lengths = cache_seqlens:
// contiguous caches (B, Lmax, Hk, D) as k / v with seqlen_k = Lmax; paged caches as below.
struct KvcacheParams : AttentionParams {
    // Paged cache: k / v point at pools (num_blocks, block_size, Hk, D) with
    // k_stride_block / k_stride_seq / k_stride_head (the batch strides are unused), and key j
    // of sequence b lives in row j % block_size of block
    // block_table[b * block_table_stride + j / block_size]. seqlen_k = max_blocks *
    // block_size. nullptr = contiguous cache.
    const int32_t* block_table = nullptr;
    int64_t block_table_stride = 0;  // = max_blocks
    int64_t max_blocks = 0;
    int64_t block_size = 0;
    int64_t num_blocks = 0;
    int64_t k_stride_block = 0, v_stride_block = 0;
    // Key-axis splits merged by lse: 0 = the backend chooses, 1 = none, n = at most n.
    int64_t num_splits = 0;
};

// Every invariant of a KvcacheParams: the AttentionParams part (key_lengths = cache_seqlens
// within the cache), block_size >= 1, and every block a sequence uses (those holding its
// first cache_seqlens[b] keys) inside [0, num_blocks): the kernel never reads outside.
void check_kvcache_params(const KvcacheParams& params);

// NumPy's name of a dtype ("float32", "bfloat16", ...), for messages.
const char* dtype_name(DType dtype);

// Size in bytes of one element of a dtype.
inline int64_t dtype_size(DType dtype) {
    switch (dtype) {
        case DType::kFloat64:
            return 8;
        case DType::kFloat32:
            return 4;
        default:
            return 2;
    }
}

// True when the dtype accumulates in double (only float64).
inline bool dtype_accumulates_in_double(DType dtype) { return dtype == DType::kFloat64; }

}  // namespace mha
