// BackwardParams: the attention backward call (SPEC 6.4), an AttentionParams that also holds
// the forward's results and the gradients (FlashAttention's Flash_bwd_params : Flash_fwd_params).
//
// The AttentionParams part describes the forward call exactly as attention() fills it (q, k, v,
// masks, score, threads); its `out` is the forward's output, read only here, and its `lse` the
// forward's log-sum-exp (accum_t, C-contiguous (batch, num_heads_q, seqlen_q)); both are
// required. Index order and strides as in params.h:
//   dout (batch, num_heads_q, seqlen_q, head_dim_v)   the gradient of the loss w.r.t. out
//   dq   (batch, num_heads_q, seqlen_q, head_dim)     written, in the input dtype
//   dk   (batch, num_heads_k, seqlen_k, head_dim_k)   summed over the query heads of a group
//   dv   (batch, num_heads_k, seqlen_k, head_dim_v)
//   dbias (batch, num_heads_q, seqlen_q, seqlen_k)    accum_t, optional, zeroed by the caller;
//        zero strides are the broadcast axes of bias: the kernel sums over them
//   dscore_wq / dscore_wk / dscore_w                  accum_t, C-contiguous, the shapes of
//        score_wq / score_wk / score_w; written (not accumulated) for General / Additive
#pragma once

#include <cstdint>

#include "params.h"

namespace mha {

struct BackwardParams : AttentionParams {
    const void* dout = nullptr;
    int64_t dout_stride_batch = 0, dout_stride_head = 0, dout_stride_seq = 0;

    void* dq = nullptr;
    void* dk = nullptr;
    void* dv = nullptr;
    int64_t dq_stride_batch = 0, dq_stride_head = 0, dq_stride_seq = 0;
    int64_t dk_stride_batch = 0, dk_stride_head = 0, dk_stride_seq = 0;
    int64_t dv_stride_batch = 0, dv_stride_head = 0, dv_stride_seq = 0;

    void* dbias = nullptr;
    int64_t dbias_stride_batch = 0, dbias_stride_head = 0, dbias_stride_q = 0,
            dbias_stride_k = 0;

    void* dscore_wq = nullptr;
    void* dscore_wk = nullptr;
    void* dscore_w = nullptr;
};

// check_params() on the forward part, then what the backward adds: out, lse, dout and the
// gradients given; score gradients for a parametrised score; dbias only with a bias; the CPU
// only (the CUDA backward is not built). Defined in params.cpp.
void check_backward_params(const BackwardParams& params);

}  // namespace mha
