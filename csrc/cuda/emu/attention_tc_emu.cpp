// The tensor-core kernel and its launcher, compiled for the host emulation.
#include "cuda/attention_tc.cu"
