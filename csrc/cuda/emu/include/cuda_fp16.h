// Host emulation (MHA_EXT_CUDA_EMULATOR): the parts of <cuda_fp16.h> the kernels use. __half
// is IEEE binary16; conversions round to nearest even like __float2half_rn.
#pragma once

#include <cstdint>
#include <cstring>

namespace mha_emu {
// binary16 -> binary32 for all 65536 bit patterns (emu_runtime.cpp fills it at load time).
extern const float* const half_to_float_table __attribute__((visibility("hidden")));
}

struct __half {
    uint16_t bits;
    __half() = default;
    __half(float f) {  // NOLINT: implicit like CUDA's
        const _Float16 h = static_cast<_Float16>(f);
        std::memcpy(&bits, &h, 2);
    }
    operator float() const { return ::mha_emu::half_to_float_table[bits]; }  // NOLINT
};
struct __half2 {
    __half x, y;
};
static_assert(sizeof(__half) == 2 && sizeof(__half2) == 4, "half layout");

inline float __half2float(__half h) { return static_cast<float>(h); }
inline __half __float2half_rn(float f) { return __half(f); }
inline __half2 __floats2half2_rn(float lo, float hi) { return __half2{__half(lo), __half(hi)}; }
