// CPU backend: blocked (flash) attention with OpenMP, and the naive reference kernel, on the
// instruction set chosen by the table in attention_cpu.cpp.
#pragma once

#include <string>
#include <vector>

#include "backward_params.h"
#include "merge_params.h"
#include "params.h"

namespace mha {

// Blocked kernel on the chosen instruction set (see attention_cpu_simd()). Throws
// std::runtime_error when MHA_EXT_SIMD names a path this build or CPU cannot run.
void attention_forward_cpu(const AttentionParams& params);

// attention_varlen and attention_kvcache (SPEC 6.2, 6.3) on the chosen instruction set.
void attention_forward_varlen_cpu(const VarlenParams& params);
void attention_forward_kvcache_cpu(const KvcacheParams& params);
// Tiled backward (SPEC 6.4) on the chosen instruction set; same errors as the forward.
void attention_backward_cpu(const BackwardParams& params);

// One row at a time, the textbook formula: documents the math, cross-checks the blocked
// kernel. Always the portable (generic) build, so every path is checked against one reference.
void attention_forward_cpu_naive(const AttentionParams& params);

// The instruction-set paths: the one attention_forward_cpu takes (empty with `error` set when
// MHA_EXT_SIMD=<name> asks for one this build or CPU cannot run), and every path this build
// has and this CPU can run, best first.
struct CpuSimd {
    std::string selected;
    std::string error;
    std::vector<std::string> supported;
    std::string note;  // e.g. why a path the CPU has is not used (the OS refused AMX state)
};
const CpuSimd& attention_cpu_simd();

// Merge of partial results (SPEC 6.1, kernel/merge.h) on the chosen instruction set.
void attention_cpu_merge(const MergeParams& params);

// Tests only: y[i] = the kernel's vectorised float tanh (vtanh, kernel/vec.h) of x[i] on the
// chosen instruction set; the softcap and the additive score run on it.
void attention_cpu_tanh(const float* x, float* y, int64_t n);

// Tests and benchmarks only: switch the path of later calls to `name` (one of `supported`;
// std::invalid_argument otherwise) and return the previous one. Not for use while other
// threads are calling the kernel.
std::string attention_cpu_set_simd(const std::string& name);

}  // namespace mha
