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
#include "runtime.h"
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
    if (params.device == Device::kCuda &&
        (params.alibi_slopes != nullptr || params.softcap > 0)) {
        throw std::runtime_error(
            "alibi_slopes / softcap: not available on device='cuda' yet; use device='cpu'");
    }
    if (params.batch == 0 || params.num_heads_q == 0 || params.seqlen_q == 0) return;
    // Dv = 0: the output is empty; only lse and weights need the scores.
    if (params.head_dim_v == 0 && params.lse == nullptr && params.weights == nullptr) return;
    AttentionParams cpu = params;  // with a thread count the machine can run (runtime.h)
    if (params.device == Device::kCpu) cpu.num_threads = resolve_threads(params.num_threads);
    switch (params.device) {
        case Device::kCpu:
            if (params.naive) {
                attention_forward_cpu_naive(cpu);
            } else {
                attention_forward_cpu(cpu);
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

namespace {
void require_cpu(Device device, const char* name) {
    if (device != Device::kCpu) {
        throw std::runtime_error(std::string(name) +
                                 ": device='cuda' is not available for this call yet; use "
                                 "device='cpu'");
    }
}
}  // namespace

void attention_varlen_forward(const VarlenParams& params) {
    check_varlen_params(params);
    require_cpu(params.device, "attention_varlen");
    if (params.batch == 0 || params.num_heads_q == 0 || params.total_q == 0) return;
    VarlenParams cpu = params;  // with a thread count the machine can run (runtime.h)
    cpu.num_threads = resolve_threads(params.num_threads);
    attention_forward_varlen_cpu(cpu);
}

void attention_kvcache_forward(const KvcacheParams& params) {
    check_kvcache_params(params);
    require_cpu(params.device, "attention_kvcache");
    if (params.batch == 0 || params.num_heads_q == 0 || params.seqlen_q == 0) return;
    KvcacheParams cpu = params;
    cpu.num_threads = resolve_threads(params.num_threads);
    attention_forward_kvcache_cpu(cpu);
}

void attention_backward(const BackwardParams& params) {
    check_backward_params(params);
    require_cpu(params.device, "attention_backward");
    if (params.batch == 0 || params.num_heads_q == 0) return;
    BackwardParams cpu = params;
    cpu.num_threads = resolve_threads(params.num_threads);
    attention_backward_cpu(cpu);
}

void merge_forward(const MergeParams& params) {
    check_merge_params(params);
    if (params.batch == 0 || params.num_heads == 0 || params.seqlen == 0) return;
    MergeParams cpu = params;  // with a thread count the machine can run (runtime.h)
    cpu.num_threads = resolve_threads(params.num_threads);
    merge_cpu(cpu);
}

void bias_act(const BiasActParams& params) {
    check_num_threads(params.num_threads);
    BiasActParams cpu = params;
    cpu.num_threads = resolve_threads(params.num_threads);
    bias_act_cpu(cpu);
}

void add_norm(const AddNormParams& params) {
    check_num_threads(params.num_threads);
    AddNormParams cpu = params;
    cpu.num_threads = resolve_threads(params.num_threads);
    add_norm_cpu(cpu);
}

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

std::string set_cpu_simd(const std::string& name) { return attention_cpu_set_simd(name); }
void cpu_vector_tanh(const float* x, float* y, int64_t n) { attention_cpu_tanh(x, y, n); }

BuildInfo build_info() {
    BuildInfo info;
    const CpuSimd& simd = attention_cpu_simd();
    info.simd = simd.selected;
    info.simd_error = simd.error;
    info.simd_supported = simd.supported;
    info.simd_note = simd.note;
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
