// MergeParams: combine attention results computed over disjoint key shards (SPEC 6.1).
//
// Part p is (out_p, lse_p): out_p[b, h, i, :] the attention output of query row (b, h, i) over
// shard p's keys, lse_p[b, h, i] the natural log of its softmax denominator (-inf: no key).
// The merged row is
//   lse = log(sum_p exp(lse_p)),  out = sum_p exp(lse_p - lse) * out_p
// which equals attention over the union of the shards. Rows whose parts are all -inf give
// out 0 and lse -inf (the empty-row rule of attention()).
//
// Index order: out_p and out (batch, num_heads, seqlen, head_dim) through element strides
// (the last axis contiguous); lse_p (batch, num_heads, seqlen) through element strides; the
// merged lse C-contiguous. Plain types only, like AttentionParams.
#pragma once

#include <cstdint>

#include "params.h"

namespace mha {

struct MergeParams {
    DType dtype = DType::kFloat32;  // of every out_p and of out
    bool lse_double = false;        // lse_p and lse are double (float64 outputs), else float

    int64_t num_parts = 0;
    const void* const* outs = nullptr;  // num_parts pointers
    const void* const* lses = nullptr;  // num_parts pointers
    // num_parts x 3 element strides (batch, head, seq) of each out_p / lse_p.
    const int64_t* out_strides = nullptr;
    const int64_t* lse_strides = nullptr;

    int64_t batch = 0, num_heads = 0, seqlen = 0, head_dim = 0;

    void* out = nullptr;
    int64_t out_stride_batch = 0, out_stride_head = 0, out_stride_seq = 0;
    void* lse = nullptr;  // (batch, num_heads, seqlen), C-contiguous; nullptr = not wanted

    int num_threads = 0;  // <= 0: OpenMP default
};

// Throws std::invalid_argument for inconsistent merge parameters (defined in params.cpp,
// beside check_params); merge_forward() calls it before any work.
void check_merge_params(const MergeParams& params);

}  // namespace mha
