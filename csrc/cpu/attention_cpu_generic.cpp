// The CPU kernels compiled for the baseline instruction set: runs on any CPU the package installs on.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <new>

#ifdef _OPENMP
#include <omp.h>
#else
inline int omp_get_max_threads() { return 1; }
inline int omp_get_thread_num() { return 0; }
#endif

#include "check.h"
#include "cpu/attention_cpu.h"

#define MHA_CPU_NS cpu_generic
#include "cpu/attention_cpu_impl.inc"
