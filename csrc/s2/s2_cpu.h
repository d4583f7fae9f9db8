// S2Attention (the S2-MLPv2 block, Yu et al. 2021, arXiv:2108.01072) on the CPU: the two
// spatial shifts and the split attention over K = 3 branches. The projections (Linear
// layers) and the small split-attention MLP run in NumPy; this core does the two passes that
// touch every pixel.
//
// Index order. x is the block's first projection, channels last, three branches side by side:
//   x      (batch, height, width, 3 * channels)  element [b, i, j, k*channels + c] (branch k,
//           channel c) at x + b*x_stride_batch + i*x_stride_h + j*x_stride_w + k*channels + c
//           (the channel axis is contiguous; strides in elements, 0 for size-1 axes)
//   sums   (batch, channels)                      C-contiguous, dtype of x   (pass 1 output)
//   logits (batch, 3 * channels)                  C-contiguous, dtype of x   (pass 2 input,
//           [b, k*channels + c] = logit of branch k for channel c)
//   out    (batch, height, width, channels)       C-contiguous, dtype of x   (pass 2 output)
//
// The shifts. Branch 0 goes through shift1, branch 1 through shift2, branch 2 is unchanged.
// Each shift splits the channels into four quarters at floor(C/4), floor(C/2), floor(3C/4)
// (the reference code's c//4, c//2, c*3//4; C = 6 gives quarters of 1, 2, 1, 2 channels and
// C < 4 leaves some quarters empty) and moves each quarter by one pixel:
//   quarter          0             1             2             3
//   shift1   [i-1, j]      [i+1, j]      [i, j-1]      [i, j+1]
//   shift2   [i, j-1]      [i, j+1]      [i-1, j]      [i+1, j]
// i.e. shifted[i, j] = x[src], with i the row (axis H of the (B, C, H, W) input) and j the
// column (axis W). A pixel whose source lies outside the image keeps its own value (the
// reference leaves the first/last row or column unwritten), which is the source index
// clamped into [0, H-1] x [0, W-1]. The shifts are read through index arithmetic from an
// unmodified x: no pass reads a value that another shift has already moved.
#pragma once

#include <cstdint>

#include "s2/s2_params.h"

namespace mha {

// S2Params (s2_params.h) describes one call; the index order above is its contract.

// Throws std::invalid_argument for inconsistent sizes or a dtype other than float32/float64.
// The pass functions below call it first.
void s2_check_params(const S2Params& params);

// Pass 1: sums[b, c] = sum over branches k and pixels (i, j) of shifted_k[b, i, j, c], the
// input of the split-attention MLP. Accumulated in double (a reduction over 3*H*W values).
void s2_branch_sum_cpu(const S2Params& params);

// Pass 2: bar[b, :, c] = softmax over k of logits[b, k*C + c], then
// out[b, i, j, c] = sum_k bar[b, k, c] * shifted_k[b, i, j, c].
void s2_combine_cpu(const S2Params& params);

}  // namespace mha
