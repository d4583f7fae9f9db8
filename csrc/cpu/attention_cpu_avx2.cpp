// The CPU kernels compiled for the AVX2 + FMA + F16C instruction set (entered only after a
// run-time CPUID check).
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <new>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#else
inline int omp_get_max_threads() { return 1; }
inline int omp_get_thread_num() { return 0; }
#endif

#include "check.h"
#include "cpu/attention_cpu.h"

#define MHA_CPU_NS cpu_avx2
#include "cpu/attention_cpu_impl.inc"
