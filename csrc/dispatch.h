// The backend-neutral entry point: one validation path, then the CPU or CUDA backend.
#pragma once

#include <string>

#include "merge_params.h"
#include "params.h"

namespace mha {

// Throws std::invalid_argument for inconsistent parameters (sizes, strides, window, ...).
void check_params(const AttentionParams& params);

// check_params, then run on params.device. Throws std::runtime_error when that device is not
// available (CUDA not built, no GPU) and for device failures.
void attention_forward(const AttentionParams& params);

// Merge partial results over disjoint key shards (SPEC 6.1): check, then the CPU pass.
void check_merge_params(const MergeParams& params);
void merge_forward(const MergeParams& params);

// S2Attention passes (CPU): check the parameters, then pass 1 (shifted branch sums) or
// pass 2 (softmax over branches and the weighted combine).
void s2_branch_sum(const S2Params& params);
void s2_combine(const S2Params& params);

// Facts about the build and the machine, for build_info().
struct BuildInfo {
    std::string simd;           // SIMD path chosen at run time: "avx2+fma" or "generic"
    bool openmp = false;        // built with OpenMP
    int max_threads = 1;        // OpenMP default thread count
    bool cuda_built = false;    // CUDA backend compiled in
    std::string cuda_archs;     // compiled CUDA architectures, ";"-separated
    std::string compiler;       // C++ compiler id and version
};
BuildInfo build_info();

// CUDA built and at least one device visible (never throws).
bool cuda_available();

// Device time of the calling thread's last CUDA call, in milliseconds: its kernels alone, and
// its host<->device copies (0 without CUDA). Lets benchmarks separate the two.
double cuda_last_kernel_ms();
double cuda_last_copy_ms();

}  // namespace mha
