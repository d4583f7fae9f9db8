// CPU merge of partial attention results (SPEC 6.1); see merge_params.h for the math.
#pragma once

#include "merge_params.h"

namespace mha {

// One pass over the parts' outputs (cpu/kernel/merge.h): per block of rows the weights come
// from the lse arrays alone, then each row streams its parts' rows once. OpenMP over
// contiguous row blocks for large inputs; the instruction-set path of attention_cpu.cpp.
void merge_cpu(const MergeParams& params);

}  // namespace mha
