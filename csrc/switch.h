// Runtime -> constexpr switches (after FlashAttention's static_switch.h). Every place that
// turns a runtime value into a template argument goes through one of these, so the supported
// set (dtypes, head dims, flags) is written once:
//
//   MHA_BOOL_SWITCH(cond, kName, [&] { f<kName>(); });
//   MHA_DTYPE_SWITCH(dtype, HalfT, BF16T, T, A, [&] { f<T, A>(); });
//       T: the storage type (HalfT / BF16T name the backend's 16-bit types), A: accum_t
//   MHA_HALF_DTYPE_SWITCH(dtype, HalfT, BF16T, T, [&] { f<T>(); });   fp16 / bf16 only
//   MHA_TC_HEAD_DIM_SWITCH(d, kHeadDim, [&] { f<kHeadDim>(); });   tensor-core head dims
//
// The body is a lambda called in each branch, so its return type is the switch's.
#pragma once

#include "params.h"

#define MHA_BOOL_SWITCH(cond, kName, ...)        \
    [&] {                                        \
        if (cond) {                              \
            constexpr bool kName = true;         \
            return __VA_ARGS__();                \
        } else {                                 \
            constexpr bool kName = false;        \
            return __VA_ARGS__();                \
        }                                        \
    }()

// float32 -> (float, float), float64 -> (double, double), float16 -> (HalfT, float),
// bfloat16 -> (BF16T, float). check_params() has refused any other code.
#define MHA_DTYPE_SWITCH(dtype, HalfT, BF16T, T, A, ...) \
    [&] {                                                \
        switch (dtype) {                                 \
            case ::mha::DType::kFloat64: {               \
                using T = double;                        \
                using A = double;                        \
                return __VA_ARGS__();                    \
            }                                            \
            case ::mha::DType::kFloat16: {               \
                using T = HalfT;                         \
                using A = float;                         \
                return __VA_ARGS__();                    \
            }                                            \
            case ::mha::DType::kBFloat16: {              \
                using T = BF16T;                         \
                using A = float;                         \
                return __VA_ARGS__();                    \
            }                                            \
            case ::mha::DType::kFloat32:                 \
            default: {                                   \
                using T = float;                         \
                using A = float;                         \
                return __VA_ARGS__();                    \
            }                                            \
        }                                                \
    }()

// The 16-bit dtypes only (kernels that exist for fp16/bf16 alone, e.g. on tensor cores):
// float16 -> HalfT, anything else -> BF16T (callers have already sent wider types elsewhere).
#define MHA_HALF_DTYPE_SWITCH(dtype, HalfT, BF16T, T, ...) \
    [&] {                                                  \
        if ((dtype) == ::mha::DType::kFloat16) {           \
            using T = HalfT;                               \
            return __VA_ARGS__();                          \
        } else {                                           \
            using T = BF16T;                               \
            return __VA_ARGS__();                          \
        }                                                  \
    }()

// The head dims the tensor-core CUDA kernel is instantiated for: max(D, Dv) is padded up to
// the next entry (kTcMaxHeadDim = 256 is the last).
#define MHA_TC_HEAD_DIM_SWITCH(d, kHeadDim, ...) \
    [&] {                                        \
        if ((d) <= 64) {                         \
            constexpr int kHeadDim = 64;         \
            return __VA_ARGS__();                \
        } else if ((d) <= 96) {                  \
            constexpr int kHeadDim = 96;         \
            return __VA_ARGS__();                \
        } else if ((d) <= 128) {                 \
            constexpr int kHeadDim = 128;        \
            return __VA_ARGS__();                \
        } else {                                 \
            constexpr int kHeadDim = 256;        \
            return __VA_ARGS__();                \
        }                                        \
    }()
