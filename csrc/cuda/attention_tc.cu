// Instantiations and launcher of the tensor-core kernel (fp16/bf16, dot score), kept in their
// own translation unit so that the two CUDA files compile in parallel.
#include <stdexcept>
#include <string>

#include "cuda/attention_kernels.cuh"
#include "switch.h"

namespace mha {
namespace cuda {
namespace {

template <typename T, int kHeadDim, int kWarps, int kBlockN>
void launch(const AttentionParams& p, const TcArgs& args, cudaStream_t stream) {
    constexpr int kBlockM = 16 * kWarps;
    const size_t smem = tc_smem_bytes<T, kHeadDim, kBlockN>();
    auto kernel = attention_tc_kernel<T, kHeadDim, kWarps, kBlockN>;
    const int64_t n_qtiles = (p.seqlen_q + kBlockM - 1) / kBlockM;
    const int64_t blocks = n_qtiles * p.batch * p.num_heads_q;
    if (blocks > 0x7fffffffLL) {
        throw std::invalid_argument(
            "device='cuda': too many query tiles for one launch (batch * heads * "
            "ceil(Lq / 64) must stay below 2^31)");
    }
    cudaError_t err = cudaSuccess;
    if (smem > 48 * 1024) {  // above the default: opt in
        err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   static_cast<int>(smem));
        // The failed call is also the runtime's "last error": clear it, or the next launch
        // (this kernel or another) would report it as its own.
        if (err != cudaSuccess) cudaGetLastError();
    }
    if (err == cudaSuccess) {
        const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(args.num_splits));
        MHA_LAUNCH(grid, kWarps * 32, smem, stream,
                   attention_tc_kernel<T, kHeadDim, kWarps, kBlockN>)(p, args);
        err = cudaGetLastError();
    }
    if (err != cudaSuccess) {
        throw std::runtime_error(std::string("device='cuda': launching the tensor-core "
                                             "attention kernel failed: ") +
                                 cudaGetErrorString(err));
    }
}

}  // namespace

void launch_attention_tc(const AttentionParams& p, const TcArgs& args, cudaStream_t stream) {
    const int64_t d = p.head_dim > p.head_dim_v ? p.head_dim : p.head_dim_v;
    MHA_HALF_DTYPE_SWITCH(p.dtype, __half, __nv_bfloat16, T, [&] {
        MHA_TC_HEAD_DIM_SWITCH(d, kHeadDim, [&] {
            launch<T, kHeadDim, /*kWarps=*/4, tc_block_n(kHeadDim)>(p, args, stream);
        });
    });
}

}  // namespace cuda
}  // namespace mha
