// The elementwise and row-wise work around attention in a Transformer layer (SPEC section 5):
// bias + activation (exact GELU, tanh GELU, ReLU) and layer norm with the residual add fused.
//
// The parameter structs are in nn_params.h; dispatch.h's bias_act / add_norm call these.
#pragma once

#include <cstdint>

#include "nn_params.h"

namespace mha {

// Value checks (std::invalid_argument naming the argument), then the kernel.
void bias_act_cpu(const BiasActParams& p);
void add_norm_cpu(const AddNormParams& p);

// Which instruction set the ifunc resolver picked for these kernels ("avx512f", "avx2",
// "default"): the same choice for every kernel of this file.
const char* nn_simd_cpu();

}  // namespace mha
