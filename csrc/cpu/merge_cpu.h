// CPU merge of partial attention results (SPEC 6.1); see merge_params.h for the math.
#pragma once

#include "merge_params.h"

namespace mha {

// One pass over the parts' outputs: each row reads its parts' lse, then streams their output
// rows once. OpenMP over rows for large inputs.
void merge_cpu(const MergeParams& params);

}  // namespace mha
