// One validation path for every backend, then the CPU or the CUDA backend. This is the only
// file that knows both backends (and the only #ifdef MHA_EXT_WITH_CUDA).
#include "dispatch.h"

#include <cstdio>
#include <new>
#include <stdexcept>
#include <string>

#include "check.h"
#include "cpu/attention_cpu.h"
#include "cpu/merge_cpu.h"
#include "cpu/nn_cpu.h"
#ifdef MHA_EXT_WITH_CUDA
#include "cuda/attention_cuda.h"
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

namespace mha {

void throw_interrupted() { throw interrupted(); }
void throw_bad_alloc(long long bytes) { throw out_of_memory(bytes); }

out_of_memory::out_of_memory(long long bytes) {
    std::snprintf(message_, sizeof(message_),
                  "attention: out of memory allocating %lld bytes of kernel scratch "
                  "(the inputs and output were allocated; try smaller batches or fewer threads)",
                  bytes);
}

void attention_forward(const AttentionParams& params) {
    check_params(params);
    if (params.device == Device::kCuda && !cuda_available()) {
#ifdef MHA_EXT_WITH_CUDA
        throw std::runtime_error(
            "device='cuda': no usable CUDA device (no GPU visible or no driver); "
            "mha_ext.cuda_available() is False");
#else
        throw std::runtime_error(
            "device='cuda': this build of mha_ext has no CUDA backend (it was built "
            "without a CUDA compiler or with MHA_EXT_CUDA=OFF)");
#endif
    }
    if (params.batch == 0 || params.num_heads_q == 0 || params.seqlen_q == 0) return;
    // Dv = 0: the output is empty; only lse and weights need the scores.
    if (params.head_dim_v == 0 && params.lse == nullptr && params.weights == nullptr) return;
    switch (params.device) {
        case Device::kCpu:
            if (params.naive) {
                attention_forward_cpu_naive(params);
            } else {
                attention_forward_cpu(params);
            }
            return;
        case Device::kCuda:
#ifdef MHA_EXT_WITH_CUDA
            attention_forward_cuda(params);
            return;
#else
            break;  // unreachable: rejected above
#endif
    }
    throw std::invalid_argument("device: unknown device");
}

void merge_forward(const MergeParams& params) {
    check_merge_params(params);
    if (params.batch == 0 || params.num_heads == 0 || params.seqlen == 0) return;
    merge_cpu(params);
}

void bias_act(const BiasActParams& params) { bias_act_cpu(params); }
void add_norm(const AddNormParams& params) { add_norm_cpu(params); }
const char* nn_simd() { return nn_simd_cpu(); }

bool cuda_available() {
#ifdef MHA_EXT_WITH_CUDA
    return cuda_device_available();
#else
    return false;
#endif
}

double cuda_last_kernel_ms() {
#ifdef MHA_EXT_WITH_CUDA
    return attention_cuda_last_kernel_ms();
#else
    return 0.0;
#endif
}

double cuda_last_copy_ms() {
#ifdef MHA_EXT_WITH_CUDA
    return attention_cuda_last_copy_ms();
#else
    return 0.0;
#endif
}

BuildInfo build_info() {
    BuildInfo info;
    const CpuSimd& simd = attention_cpu_simd();
    info.simd = simd.selected;
    info.simd_error = simd.error;
    info.simd_supported = simd.supported;
#ifdef _OPENMP
    info.openmp = true;
    info.max_threads = omp_get_max_threads();
#endif
#ifdef MHA_EXT_WITH_CUDA
    info.cuda_built = true;
    info.cuda_archs = MHA_CUDA_ARCHS;
#endif
#ifdef MHA_CUDA_EMULATED
    info.cuda_emulated = true;
#endif
#if defined(__clang__)
    info.compiler = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
    info.compiler = std::string("gcc ") + __VERSION__;
#else
    info.compiler = "unknown";
#endif
    return info;
}

}  // namespace mha
