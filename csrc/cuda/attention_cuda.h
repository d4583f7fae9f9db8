// CUDA backend: host-side declarations, includable without nvcc.
#pragma once

#include "params.h"

namespace mha {

// True when a CUDA device is visible and the driver works. Never throws.
bool cuda_device_available();

// Runs the forward pass on the current CUDA device. The pointers in params are host memory
// (NumPy arrays): inputs are staged to the device, outputs copied back. Throws
// std::runtime_error for device failures (no GPU, out of memory, launch failure) and
// std::invalid_argument for parameters the CUDA kernels do not support.
void attention_forward_cuda(const AttentionParams& params);

// Timings of the calling thread's last attention_forward_cuda, from CUDA events (ms):
// the kernels alone (projections, attention, split-KV merge, weights), and the host<->device
// copies (inputs in, outputs out). 0 before the first call. For benchmarks.
double attention_cuda_last_kernel_ms();
double attention_cuda_last_copy_ms();

}  // namespace mha
