// check_params(): every value invariant of AttentionParams, with one wording. The binding
// checks only what needs the Python objects (types, dtypes, ranks, shapes that are not in the
// struct, broadcastability); the native benchmark harness fills the struct by hand. Both reach
// this function through attention_forward(), so no backend sees an unchecked struct.
#include "params.h"

#include "backward_params.h"
#include "merge_params.h"

#include <cmath>

#include "check.h"

namespace mha {

const char* dtype_name(DType dtype) {
    switch (dtype) {
        case DType::kFloat32: return "float32";
        case DType::kFloat64: return "float64";
        case DType::kFloat16: return "float16";
        case DType::kBFloat16: return "bfloat16";
    }
    return "unknown";
}

void check_params(const AttentionParams& p) {
    MHA_CHECK(p.dtype == DType::kFloat32 || p.dtype == DType::kFloat64 ||
                  p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16,
              "dtype: unknown dtype code ", static_cast<int>(p.dtype));
    MHA_CHECK(p.batch >= 0 && p.num_heads_q >= 0 && p.num_heads_k >= 0 && p.seqlen_q >= 0 &&
                  p.seqlen_k >= 0 && p.head_dim_v >= 0,
              "attention: sizes must be non-negative");
    MHA_CHECK(p.head_dim >= 1, "q: the head dimension D must be at least 1, got ", p.head_dim);
    MHA_CHECK(p.head_dim_k >= 1, "k: the head dimension Dk must be at least 1, got ",
              p.head_dim_k);
    if (p.score == Score::kDot) {
        MHA_CHECK(p.head_dim == p.head_dim_k, "k: head dimension (", p.head_dim_k,
                  ") must equal q's (", p.head_dim,
                  ") for a dot-product score (use mha_ext.General(W) for different sizes)");
    }
    MHA_CHECK(p.num_heads_k > 0 || p.num_heads_q == 0,
              "k: number of key/value heads must be at least 1, got 0");
    MHA_CHECK(p.num_heads_k == 0 || p.num_heads_q % p.num_heads_k == 0,
              "q, k: the number of query heads (", p.num_heads_q,
              ") must be a multiple of the number of key/value heads (", p.num_heads_k, ")");
    MHA_CHECK(p.causal == Causal::kNone || p.causal == Causal::kBottomRight ||
                  p.causal == Causal::kTopLeft,
              "causal: expected False, True, 'bottom_right' or 'top_left' (code ",
              static_cast<int>(p.causal), ")");
    MHA_CHECK(p.device == Device::kCpu || p.device == Device::kCuda,
              "device: expected 'cpu', 'cuda' or 'auto' (code ", static_cast<int>(p.device), ")");
    MHA_CHECK(p.window_left >= -1 && p.window_right >= -1,
              "window: expected (left, right) with each >= 0, or -1/None for unbounded; got (",
              p.window_left, ", ", p.window_right, ")");
    MHA_CHECK(std::isfinite(p.scale), "scale: must be finite, got ", p.scale);
    // Logits are accumulated in float32 for fp32/fp16/bf16 inputs: past 2^64 every non-tiny
    // logit overflows to inf and rows turn to NaN. Refuse rather than guess.
    MHA_CHECK(dtype_accumulates_in_double(p.dtype) || std::fabs(p.scale) <= 1.8446744073709552e19,
              "scale: |", p.scale, "| > 2^64 overflows the float32 logits of ",
              dtype_name(p.dtype), " inputs; use float64 inputs for such scales");
    MHA_CHECK(p.num_threads >= 0 && p.num_threads <= kMaxThreads,
              "num_threads: " MHA_NUM_THREADS_RULE ", got ", p.num_threads);
    switch (p.score) {
        case Score::kDot:
            break;
        case Score::kGeneral:
            MHA_CHECK(p.score_wq != nullptr, "score: General needs its matrix W");
            break;
        case Score::kAdditive:
            MHA_CHECK(p.score_dim >= 1, "w: expected a vector of shape (A,) with A >= 1, got A = ",
                      p.score_dim);
            MHA_CHECK(p.score_wq != nullptr && p.score_wk != nullptr && p.score_w != nullptr,
                      "score: the additive score needs W_q, W_k and w");
            break;
        default:
            MHA_CHECK(false, "score: unknown score function code ", static_cast<int>(p.score));
    }
    if (p.key_lengths != nullptr) {
        for (int64_t b = 0; b < p.batch; ++b) {
            const int64_t n = p.key_lengths[b];
            MHA_CHECK(n >= 0 && n <= p.seqlen_k, "key_lengths: entry ", b, " is ", n,
                      ", expected 0 <= key_lengths[b] <= Lk = ", p.seqlen_k);
        }
    }
    const bool work = p.batch > 0 && p.num_heads_q > 0 && p.seqlen_q > 0;
    if (work) {
        MHA_CHECK(p.q != nullptr && p.out != nullptr, "attention: q and out must be given");
        MHA_CHECK(p.seqlen_k == 0 || (p.k != nullptr && p.v != nullptr),
                  "attention: k and v must be given");
    }
}

void check_backward_params(const BackwardParams& p) {
    check_params(p);
    MHA_CHECK(p.device == Device::kCpu,
              "device: the backward pass runs on the CPU only (device='cpu')");
    MHA_CHECK(p.weights == nullptr, "attention_backward: weights are not an output here");
    const bool work = p.batch > 0 && p.num_heads_q > 0;
    if (work) {
        MHA_CHECK(p.dk != nullptr && p.dv != nullptr, "attention_backward: dk and dv must be given");
    }
    if (work && p.seqlen_q > 0) {
        MHA_CHECK(p.dout != nullptr && p.lse != nullptr && p.dq != nullptr,
                  "attention_backward: dout, out, lse and dq must be given");
        MHA_CHECK(p.score == Score::kDot || p.dscore_wq != nullptr,
                  "score: the gradient of the score's W (W_q) must be given");
        MHA_CHECK(p.score != Score::kAdditive || (p.dscore_wk != nullptr && p.dscore_w != nullptr),
                  "score: the additive score's gradients dW_k and dw must be given");
    }
    MHA_CHECK(p.dbias == nullptr || p.bias != nullptr, "return_dbias: needs a bias");
}

void check_merge_params(const MergeParams& p) {
    MHA_CHECK(p.dtype == DType::kFloat32 || p.dtype == DType::kFloat64 ||
                  p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16,
              "dtype: unknown dtype code ", static_cast<int>(p.dtype));
    MHA_CHECK(p.num_parts >= 1, "outs: expected at least one partial output, got ", p.num_parts);
    MHA_CHECK(p.batch >= 0 && p.num_heads >= 0 && p.seqlen >= 0 && p.head_dim >= 0,
              "merge: sizes must be non-negative");
    MHA_CHECK(p.lse_double == (p.dtype == DType::kFloat64),
              "lses: must be float64 for float64 outputs and float32 otherwise");
    MHA_CHECK(p.num_threads >= 0 && p.num_threads <= kMaxThreads,
              "num_threads: " MHA_NUM_THREADS_RULE ", got ", p.num_threads);
    const bool work = p.batch > 0 && p.num_heads > 0 && p.seqlen > 0;
    if (work) {
        MHA_CHECK(p.outs != nullptr && p.lses != nullptr && p.out_strides != nullptr &&
                      p.lse_strides != nullptr && p.out != nullptr,
                  "merge: the parts and the output must be given");
        for (int64_t i = 0; i < p.num_parts; ++i) {
            MHA_CHECK(p.lses[i] != nullptr && (p.head_dim == 0 || p.outs[i] != nullptr),
                      "merge: part ", i, " has no data");
        }
    }
}

}  // namespace mha
