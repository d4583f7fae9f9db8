// S2Attention's native entry points (the S2 wing: s2_params.h, s2_cpu.{h,cpp}). Apart from
// the attention core: it shares only the DType enum and check.h.
#pragma once

#include "s2/s2_params.h"

namespace mha {

// Check the parameters, then pass 1 (shifted branch sums) or pass 2 (softmax over branches and
// the weighted combine), on the CPU.
void s2_branch_sum(const S2Params& params);
void s2_combine(const S2Params& params);

}  // namespace mha
