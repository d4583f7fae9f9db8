// One validation path for every backend, then the CPU or the CUDA backend. This is the only
// file that knows both backends (and the only #ifdef MHA_EXT_WITH_CUDA).
#include "dispatch.h"

#include <new>
#include <stdexcept>
#include <string>

#include "check.h"
#include "cpu/attention_cpu.h"
#include "cpu/s2_cpu.h"
#include "runtime.h"
#ifdef MHA_EXT_WITH_CUDA
#include "cuda/attention_cuda.h"
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

namespace mha {

void throw_interrupted() { throw interrupted(); }
void throw_bad_alloc() { throw std::bad_alloc(); }

void check_params(const AttentionParams& p) {
    MHA_CHECK(p.batch >= 0 && p.num_heads_q >= 0 && p.num_heads_k >= 0 && p.seqlen_q >= 0 &&
                  p.seqlen_k >= 0 && p.head_dim_v >= 0,
              "attention: sizes must be non-negative");
    MHA_CHECK(p.head_dim >= 1, "q: the head dimension D must be at least 1, got ", p.head_dim);
    MHA_CHECK(p.head_dim_k >= 1, "k: the head dimension must be at least 1, got ", p.head_dim_k);
    if (p.score == Score::kDot) {
        MHA_CHECK(p.head_dim == p.head_dim_k, "k: head dimension ", p.head_dim_k,
                  " must equal q's head dimension ", p.head_dim,
                  " for a dot-product score (use mha_ext.General(W) for different sizes)");
    }
    MHA_CHECK(p.num_heads_k > 0 || p.num_heads_q == 0,
              "k: number of key/value heads must be at least 1, got 0");
    MHA_CHECK(p.num_heads_k == 0 || p.num_heads_q % p.num_heads_k == 0,
              "q/k: the number of query heads (", p.num_heads_q,
              ") must be a multiple of the number of key/value heads (", p.num_heads_k, ")");
    MHA_CHECK(p.window_left >= -1 && p.window_right >= -1,
              "window: (left, right) must each be >= 0, or -1/None for unbounded; got (",
              p.window_left, ", ", p.window_right, ")");
    MHA_CHECK(p.num_threads >= 0, "num_threads: must be positive, got ", p.num_threads);
    if (p.score == Score::kGeneral) {
        MHA_CHECK(p.score_wq != nullptr, "score: General needs its matrix W");
    }
    if (p.score == Score::kAdditive) {
        MHA_CHECK(p.score_dim >= 1 && p.score_wq != nullptr && p.score_wk != nullptr &&
                      p.score_w != nullptr,
                  "score: the additive score needs W_q, W_k and w with at least one unit");
    }
    if (p.key_lengths != nullptr) {
        for (int64_t b = 0; b < p.batch; ++b) {
            const int64_t n = p.key_lengths[b];
            MHA_CHECK(n >= 0 && n <= p.seqlen_k, "key_lengths: entry ", b, " is ", n,
                      ", expected 0 <= key_lengths[b] <= Lk = ", p.seqlen_k);
        }
    }
    const bool work = p.batch > 0 && p.num_heads_q > 0 && p.seqlen_q > 0;
    if (work) {
        MHA_CHECK(p.q != nullptr && p.out != nullptr, "attention: q and out must be given");
        MHA_CHECK(p.seqlen_k == 0 || (p.k != nullptr && p.v != nullptr),
                  "attention: k and v must be given");
    }
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

void s2_branch_sum(const S2Params& params) {
    s2_check_params(params);
    S2Params cpu = params;
    cpu.num_threads = resolve_threads(params.num_threads);
    s2_branch_sum_cpu(cpu);
}

void s2_combine(const S2Params& params) {
    s2_check_params(params);
    S2Params cpu = params;
    cpu.num_threads = resolve_threads(params.num_threads);
    s2_combine_cpu(cpu);
}

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
    info.simd = attention_cpu_simd();
#ifdef _OPENMP
    info.openmp = true;
    info.max_threads = omp_get_max_threads();
#endif
#ifdef MHA_EXT_WITH_CUDA
    info.cuda_built = true;
    info.cuda_archs = MHA_CUDA_ARCHS;
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
