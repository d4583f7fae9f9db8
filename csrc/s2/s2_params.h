// S2Params: one S2Attention native pass (the S2-MLPv2 spatial shifts and split attention).
// The index order of x, sums, logits and out is documented in s2/s2_cpu.h. Like
// AttentionParams it holds no STL, pybind11 or CUDA types.
#pragma once

#include <cstdint>

#include "params.h"

namespace mha {

struct S2Params {
    DType dtype = DType::kFloat32;  // of x, sums, logits and out: float32 or float64

    const void* x = nullptr;
    const void* logits = nullptr;  // pass 2 only
    void* sums = nullptr;          // pass 1 only
    void* out = nullptr;           // pass 2 only

    int64_t batch = 0;
    int64_t height = 0;
    int64_t width = 0;
    int64_t channels = 0;  // C: per branch; x has 3*C channels

    int64_t x_stride_batch = 0, x_stride_h = 0, x_stride_w = 0;

    int num_threads = 0;  // 0: OpenMP default (honours OMP_NUM_THREADS); else 1..kMaxThreads
};

}  // namespace mha
