// CPU backend: blocked (flash) attention with OpenMP, and the naive reference kernel.
#pragma once

#include "params.h"

namespace mha {

// Blocked kernel on the best instruction set this CPU has (see attention_cpu_simd()).
void attention_forward_cpu(const AttentionParams& params);

// One row at a time, the textbook formula: documents the math, cross-checks the blocked kernel.
void attention_forward_cpu_naive(const AttentionParams& params);

// "avx2+fma" or "generic": the path attention_forward_cpu takes on this machine. The
// environment variable MHA_EXT_SIMD=generic forces the portable path.
const char* attention_cpu_simd();

// One copy of the kernels per instruction set (attention_cpu_impl.inc).
namespace cpu_generic {
void attention_forward(const AttentionParams& params);
void attention_forward_naive(const AttentionParams& params);
}  // namespace cpu_generic
namespace cpu_avx2 {
void attention_forward(const AttentionParams& params);
void attention_forward_naive(const AttentionParams& params);
}  // namespace cpu_avx2

}  // namespace mha
