// The backend-neutral entry point: one validation path, then the CPU or CUDA backend.
#pragma once

#include <string>
#include <vector>

#include "backward_params.h"
#include "merge_params.h"
#include "nn_params.h"
#include "params.h"

namespace mha {

// check_params (params.h), then run on params.device. Throws std::runtime_error when that
// device is not available (CUDA not built, no GPU) and for device failures.
void attention_forward(const AttentionParams& params);

// attention_varlen (SPEC 6.2) and attention_kvcache (6.3): their check, then the CPU kernel
// (no CUDA twin yet: device='cuda' is a std::runtime_error).
void attention_varlen_forward(const VarlenParams& params);
void attention_kvcache_forward(const KvcacheParams& params);
// The backward pass (SPEC 6.4): check_backward_params, then the CPU kernel (the only one).
void attention_backward(const BackwardParams& params);

// Merge partial results over disjoint key shards (SPEC 6.1): check_merge_params, then the
// CPU pass.
void merge_forward(const MergeParams& params);

// The layer kernels (nn_params.h): value checks, then the CPU kernel. nn_simd(): the
// instruction set the kernels' ifunc resolver picked ("avx512f", "avx2", "default").
void bias_act(const BiasActParams& params);
void add_norm(const AddNormParams& params);
const char* nn_simd();
// Tests and benchmarks: later CPU calls take the instruction-set path `name` (one of
// build_info().simd_supported, else std::invalid_argument); returns the previous one.
std::string set_cpu_simd(const std::string& name);
// Tests only: the CPU kernel's vectorised float tanh on the chosen path (attention_cpu_tanh).
void cpu_vector_tanh(const float* x, float* y, int64_t n);

// Facts about the build and the machine, for build_info().
struct BuildInfo {
    std::string simd;           // CPU instruction-set path in use: "amx", "avx512", "avx2", "generic";
                                // empty when MHA_EXT_SIMD names one that cannot run
    std::string simd_error;     // why simd is empty
    std::vector<std::string> simd_supported;  // paths this build has and this CPU runs
    std::string simd_note;      // e.g. the OS refused AMX tile state, so amx is not offered
    bool openmp = false;        // built with OpenMP
    int max_threads = 1;        // OpenMP default thread count
    bool cuda_built = false;    // CUDA backend compiled in
    std::string cuda_archs;     // compiled CUDA architectures, ";"-separated
    bool cuda_emulated = false;  // the CUDA kernels run on the host emulator (csrc/cuda/emu)
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
