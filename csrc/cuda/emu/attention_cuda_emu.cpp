// The CUDA backend's host side and SIMT kernels, compiled for the host emulation.
#include "cuda/attention_cuda.cu"
