// check_params(): every value invariant of AttentionParams, with one wording. The binding
// checks only what needs the Python objects (types, dtypes, ranks, shapes that are not in the
// struct, broadcastability); the native benchmark harness fills the struct by hand. Both reach
// this function through attention_forward(), so no backend sees an unchecked struct.
#include "params.h"

#include "backward_params.h"
#include "merge_params.h"

#include <cmath>
#include <limits>

#include "check.h"

namespace mha {
namespace {

constexpr double kFloat32LogitScale = 1.8446744073709552e19;  // 2^64

// max |x| over a float64 tensor of sizes n (axes 0..3) and element strides s (axis 3: 1).
double max_abs(const void* base, const int64_t (&n)[4], const int64_t (&s)[4]) {
    const double* x = static_cast<const double*>(base);
    double m = 0;
    for (int64_t a = 0; a < n[0]; ++a) {
        for (int64_t b = 0; b < n[1]; ++b) {
            for (int64_t c = 0; c < n[2]; ++c) {
                const double* row = x + a * s[0] + b * s[1] + c * s[2];
                for (int64_t d = 0; d < n[3]; ++d) m = std::fmax(m, std::fabs(row[d]));
            }
        }
    }
    return m;
}

// An upper bound of |score| / |scale| over every (query, key) pair, before the bias.
double score_bound(const AttentionParams& p) {
    const double q = max_abs(p.q, {p.batch, p.num_heads_q, p.seqlen_q, p.head_dim},
                             {p.q_stride_batch, p.q_stride_head, p.q_stride_seq, 1});
    const double k = max_abs(p.k, {p.batch, p.num_heads_k, p.seqlen_k, p.head_dim_k},
                             {p.k_stride_batch, p.k_stride_head, p.k_stride_seq, 1});
    switch (p.score) {
        case Score::kGeneral: {
            const double w = max_abs(p.score_wq, {1, 1, p.head_dim, p.head_dim_k},
                                     {0, 0, p.head_dim_k, 1});
            return static_cast<double>(p.head_dim) * p.head_dim_k * q * w * k;
        }
        case Score::kAdditive:  // |w . tanh(...)| <= sum |w|
            return static_cast<double>(p.score_dim) *
                   max_abs(p.score_w, {1, 1, 1, p.score_dim}, {0, 0, 0, 1});
        default:
            return static_cast<double>(p.head_dim) * q * k;
    }
}

}  // namespace

const char* dtype_name(DType dtype) {
    switch (dtype) {
        case DType::kFloat32: return "float32";
        case DType::kFloat64: return "float64";
        case DType::kFloat16: return "float16";
        case DType::kBFloat16: return "bfloat16";
    }
    return "unknown";
}

void check_num_threads(int num_threads) {
    MHA_CHECK(num_threads >= 0 && num_threads <= kMaxThreads,
              "num_threads: " MHA_NUM_THREADS_RULE ", got ", num_threads);
}

void check_params(const AttentionParams& p) {
    MHA_CHECK(p.dtype == DType::kFloat32 || p.dtype == DType::kFloat64 ||
                  p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16,
              "dtype: unknown dtype code ", static_cast<int>(p.dtype));
    MHA_CHECK(p.batch >= 0 && p.num_heads_q >= 0 && p.num_heads_k >= 0 && p.seqlen_q >= 0 &&
                  p.seqlen_k >= 0 && p.head_dim_v >= 0,
              "attention: sizes must be non-negative");
    MHA_CHECK(p.head_dim >= 1, "q: the head dimension D must be at least 1, got ", p.head_dim);
    if (p.score == Score::kDot) {
        MHA_CHECK(p.head_dim == p.head_dim_k, "k: head dimension (", p.head_dim_k,
                  ") must equal q's (", p.head_dim,
                  ") for a dot-product score (use mha_ext.General(W) for different sizes)");
    }
    MHA_CHECK(p.head_dim_k >= 1, "k: the head dimension Dk must be at least 1, got ",
              p.head_dim_k);
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
    MHA_CHECK(dtype_accumulates_in_double(p.dtype) || std::fabs(p.scale) <= kFloat32LogitScale,
              "scale: |", p.scale, "| > 2^64 overflows the float32 logits of ",
              dtype_name(p.dtype), " inputs; use float64 inputs for such scales");
    check_num_threads(p.num_threads);
    MHA_CHECK(p.softcap == 0 || (std::isfinite(p.softcap) && p.softcap > 0),
              "softcap: expected a finite float > 0 (or None), got ", p.softcap);
    MHA_CHECK(p.lse_stride_head >= 0, "lse: negative row stride ", p.lse_stride_head);
    if (p.alibi_slopes != nullptr) {
        const int64_t nb = p.alibi_stride_batch == 0 ? 1 : p.batch;
        for (int64_t b = 0; b < nb; ++b) {
            for (int64_t h = 0; h < p.num_heads_q; ++h) {
                const int64_t x = b * p.alibi_stride_batch + h;
                const double slope =
                    dtype_accumulates_in_double(p.dtype)
                        ? static_cast<const double*>(p.alibi_slopes)[x]
                        : static_cast<double>(static_cast<const float*>(p.alibi_slopes)[x]);
                MHA_CHECK(std::isfinite(slope), "alibi_slopes: entry (", b, ", ", h,
                          ") is ", slope, ", expected a finite slope");
            }
        }
    }
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
    // float64 logits: a scale beyond 2^64 is accepted only while no score can overflow to inf
    // (an overflowed score would turn its row to NaN). The bound reads q and k once, on this
    // rare path only: |scale| * D * max|q| * max|k| (dot; General and Additive likewise).
    if (work && p.seqlen_k > 0 && dtype_accumulates_in_double(p.dtype) &&
        std::fabs(p.scale) > kFloat32LogitScale) {
        const double bound = std::fabs(p.scale) * score_bound(p);
        MHA_CHECK(bound <= std::numeric_limits<double>::max(), "scale: |", p.scale,
                  "| makes the float64 scores of these inputs overflow (|scale| * D * max|q| * "
                  "max|k| = ", bound, " > 1.8e308), which would give NaN rows; use a smaller "
                  "scale or rescale q / k");
    }
}

// cu_seqlens: starts at 0, never decreases, ends at the total; the longest step is `longest`.
static void check_cu_seqlens(const int64_t* cu, int64_t n, int64_t total, int64_t longest,
                             const char* name, const char* total_name) {
    MHA_CHECK(cu != nullptr, name, ": missing");
    MHA_CHECK(cu[0] == 0, name, ": must start at 0, got ", name, "[0] = ", cu[0]);
    int64_t most = 0;
    for (int64_t b = 0; b < n; ++b) {
        MHA_CHECK(cu[b + 1] >= cu[b], name, ": must not decrease, got ", name, "[", b, "] = ",
                  cu[b], " > ", name, "[", b + 1, "] = ", cu[b + 1]);
        MHA_CHECK(cu[b + 1] <= total, name, ": entry ", b + 1, " is ", cu[b + 1], ", past ",
                  total_name, " = ", total);
        if (cu[b + 1] - cu[b] > most) most = cu[b + 1] - cu[b];
    }
    MHA_CHECK(cu[n] == total, name, ": must end at ", total_name, " = ", total, ", got ", name,
              "[", n, "] = ", cu[n]);
    MHA_CHECK(most == longest, name, ": the longest sequence is ", most, ", the params say ",
              longest);
}

void check_varlen_params(const VarlenParams& p) {
    check_params(p);
    MHA_CHECK(p.mask == nullptr && p.bias == nullptr && p.key_lengths == nullptr &&
                  p.weights == nullptr,
              "attention_varlen: mask, bias, key_lengths and weights are not supported");
    MHA_CHECK(p.total_q >= 0 && p.total_k >= 0, "attention_varlen: negative totals");
    MHA_CHECK(p.lse == nullptr || p.lse_stride_head == p.total_q,
              "attention_varlen: lse rows must be (Hq, total_q)");
    check_cu_seqlens(p.cu_seqlens_q, p.batch, p.total_q, p.seqlen_q, "cu_seqlens_q",
                     "total_q (q.shape[0])");
    check_cu_seqlens(p.cu_seqlens_k, p.batch, p.total_k, p.seqlen_k, "cu_seqlens_k",
                     "total_k (k.shape[0])");
}

void check_kvcache_params(const KvcacheParams& p) {
    MHA_CHECK(p.key_lengths != nullptr || p.batch == 0, "cache_seqlens: missing");
    for (int64_t b = 0; b < p.batch; ++b) {
        const int64_t n = p.key_lengths[b];
        MHA_CHECK(n >= 0 && n <= p.seqlen_k, "cache_seqlens: entry ", b, " is ", n,
                  ", expected 0 <= cache_seqlens[b] <= ", p.seqlen_k,
                  p.block_table != nullptr ? " (max_blocks * block_size: the block table's row)"
                                           : " (the cache's Lmax)");
    }
    check_params(p);
    MHA_CHECK(p.mask == nullptr && p.bias == nullptr && p.weights == nullptr,
              "attention_kvcache: mask, bias and weights are not supported");
    MHA_CHECK(p.num_splits >= 0, "num_splits: expected None or an int >= 1, got ",
              p.num_splits);
    if (p.block_table == nullptr) return;
    MHA_CHECK(p.block_size >= 1, "k_cache: block_size must be at least 1, got ", p.block_size);
    MHA_CHECK(p.num_blocks >= 0 && p.max_blocks >= 0 && p.block_table_stride >= p.max_blocks,
              "block_table: bad geometry");
    MHA_CHECK(p.seqlen_k == p.max_blocks * p.block_size,
              "attention_kvcache: seqlen_k must be max_blocks * block_size");
    for (int64_t b = 0; b < p.batch; ++b) {
        // key_lengths <= seqlen_k was checked by check_params: the used blocks are in the row.
        const int64_t used = (p.key_lengths[b] + p.block_size - 1) / p.block_size;
        for (int64_t x = 0; x < used; ++x) {
            const int64_t id = p.block_table[b * p.block_table_stride + x];
            MHA_CHECK(id >= 0 && id < p.num_blocks, "block_table: entry (", b, ", ", x, ") is ",
                      id, ", expected a block id in [0, num_blocks = ", p.num_blocks,
                      ") (sequence ", b, " holds ", p.key_lengths[b], " keys)");
        }
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
    check_num_threads(p.num_threads);
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
