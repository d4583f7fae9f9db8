// S2Attention entry points: one validation path (s2_check_params), then the CPU passes.
#include "s2/s2.h"

#include "s2/s2_cpu.h"

namespace mha {

void s2_branch_sum(const S2Params& params) { s2_branch_sum_cpu(params); }

void s2_combine(const S2Params& params) { s2_combine_cpu(params); }

}  // namespace mha
