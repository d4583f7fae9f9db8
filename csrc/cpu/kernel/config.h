// What every room of the CPU kernel sees: the standard headers it may use, the intrinsics of
// the instruction set it is compiled for, OpenMP (or a one-thread stand-in) and the knobs
// CMake sets per instruction set:
//   MHA_CPU_NS         the namespace of this copy of the kernel (cpu_generic, cpu_avx2, ...)
//   MHA_CPU_VEC_BYTES  bytes of one vec_t (vec.h): 32 for generic (two SSE registers) and
//                      avx2 (one AVX register); 64 for avx512 and amx (one zmm register)
//
// The kernel is compiled once per instruction set, each copy inside its own namespace, so the
// copies never share a symbol. It must not instantiate STL templates (std::vector, std::min,
// ...): a weak symbol compiled for AVX2 could be picked by the linker for the baseline path.
#pragma once

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
#include "params.h"

#ifndef MHA_CPU_NS
#error "MHA_CPU_NS names this copy of the CPU kernel: CMake defines it per instruction set"
#endif
#ifndef MHA_CPU_VEC_BYTES
#error "MHA_CPU_VEC_BYTES (the vector width in bytes) is defined per instruction set by CMake"
#endif
