// Storage types (f16, bf16) and their conversions to and from accum_t: load_row / store_row.
// Part of the CPU kernel compiled once per instruction set (see attention_cpu_isa.cpp):
// include only from there, inside namespace mha::MHA_CPU_NS, no STL templates.
#pragma once

#include "cpu/kernel/config.h"

namespace mha {
namespace MHA_CPU_NS {

// ------------------------------------------------------------------------------------------
// Storage types and conversion to accum_t.

struct f16 {
    uint16_t bits;
};
struct bf16 {
    uint16_t bits;
};

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1f) {  // inf / nan
        bits = sign | 0x7f800000u | (mant << 13);
    } else if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else {  // subnormal half: normalise
            int e = -1;
            do {
                ++e;
                mant <<= 1;
            } while ((mant & 0x400u) == 0);
            bits = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((mant & 0x3ffu) << 13);
        }
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
#endif
}

inline uint16_t float_to_half(float f) {
#if defined(__F16C__)
    return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
    const uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) {  // inf or nan (keep nan quiet)
        return sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u);
    }
    if (ax >= 0x477ff000u) return sign | 0x7c00u;  // rounds to >= 65520: overflow to inf
    if (ax < 0x38800000u) {                         // below the smallest normal half
        if (ax < 0x33000000u) return sign;          // rounds to zero
        const uint32_t e = ax >> 23;
        const uint32_t m = (ax & 0x7fffffu) | 0x800000u;
        const uint32_t shift = 126 - e;  // 14..24
        uint32_t h = m >> shift;
        const uint32_t rem = m & ((1u << shift) - 1);
        const uint32_t half = 1u << (shift - 1);
        if (rem > half || (rem == half && (h & 1u))) ++h;
        return static_cast<uint16_t>(sign | h);
    }
    uint32_t h = ((ax >> 13) - (112u << 10));  // rebias exponent 127 -> 15
    const uint32_t rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // round to nearest even
    return static_cast<uint16_t>(sign | h);
#endif
}

inline float bf16_to_float(uint16_t h) {
    const uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

inline uint16_t float_to_bf16(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
    x += 0x7fffu + ((x >> 16) & 1u);  // round to nearest even
    return static_cast<uint16_t>(x >> 16);
}

// dst[d] = A(src[d]) * mul for d < n.
template <typename A>
inline void load_row(const float* src, A* dst, int64_t n, A mul) {
    for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<A>(src[d]) * mul;
}
template <typename A>
inline void load_row(const double* src, A* dst, int64_t n, A mul) {
    for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<A>(src[d] * mul);
}
template <typename A>
inline void load_row(const f16* src, A* dst, int64_t n, A mul) {
    int64_t d = 0;
#if defined(__AVX512F__)
    const __m512 m16 = _mm512_set1_ps(mul);
    for (; d + 16 <= n; d += 16) {
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + d));
        _mm512_storeu_ps(dst + d, _mm512_mul_ps(_mm512_cvtph_ps(h), m16));
    }
#endif
#if defined(__F16C__)
    const __m256 m = _mm256_set1_ps(mul);
    for (; d + 8 <= n; d += 8) {
        __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + d));
        _mm256_storeu_ps(dst + d, _mm256_mul_ps(_mm256_cvtph_ps(h), m));
    }
#endif
    for (; d < n; ++d) dst[d] = half_to_float(src[d].bits) * mul;
}
template <typename A>
inline void load_row(const bf16* src, A* dst, int64_t n, A mul) {
    int64_t d = 0;
#if defined(__AVX512F__)
    const __m512 m = _mm512_set1_ps(mul);
    for (; d + 16 <= n; d += 16) {  // bf16 -> fp32 is a 16-bit shift
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + d));
        const __m512 f = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        _mm512_storeu_ps(dst + d, _mm512_mul_ps(f, m));
    }
#endif
    for (; d < n; ++d) dst[d] = bf16_to_float(src[d].bits) * mul;
}

// dst[d] = T(src[d] * mul) for d < n.
inline void store_row(const float* src, float* dst, int64_t n, float mul) {
    for (int64_t d = 0; d < n; ++d) dst[d] = src[d] * mul;
}
inline void store_row(const double* src, double* dst, int64_t n, double mul) {
    for (int64_t d = 0; d < n; ++d) dst[d] = src[d] * mul;
}
inline void store_row(const float* src, f16* dst, int64_t n, float mul) {
    int64_t d = 0;
#if defined(__AVX512F__)
    const __m512 m16 = _mm512_set1_ps(mul);
    for (; d + 16 <= n; d += 16) {
        const __m256i h = _mm512_cvtps_ph(_mm512_mul_ps(_mm512_loadu_ps(src + d), m16),
                                          _MM_FROUND_TO_NEAREST_INT);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d), h);
    }
#endif
#if defined(__F16C__)
    const __m256 m = _mm256_set1_ps(mul);
    for (; d + 8 <= n; d += 8) {
        __m128i h = _mm256_cvtps_ph(_mm256_mul_ps(_mm256_loadu_ps(src + d), m),
                                    _MM_FROUND_TO_NEAREST_INT);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + d), h);
    }
#endif
    for (; d < n; ++d) dst[d].bits = float_to_half(src[d] * mul);
}
inline void store_row(const float* src, bf16* dst, int64_t n, float mul) {
    int64_t d = 0;
#if defined(__AVX512F__)
    // float_to_bf16 on 16 lanes: round to nearest even, NaN kept quiet (integer ops, so
    // subnormals round exactly as the scalar code does, unlike VCVTNEPS2BF16).
    const __m512 m = _mm512_set1_ps(mul);
    const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
    for (; d + 16 <= n; d += 16) {
        const __m512i x = _mm512_castps_si512(_mm512_mul_ps(_mm512_loadu_ps(src + d), m));
        const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
        __m512i r = _mm512_srli_epi32(
            _mm512_add_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(0x7fff)), odd), 16);
        const __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(x, abs_mask), inf);
        r = _mm512_mask_mov_epi32(
            r, nan, _mm512_or_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(0x40)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d), _mm512_cvtepi32_epi16(r));
    }
#endif
    for (; d < n; ++d) dst[d].bits = float_to_bf16(src[d] * mul);
}

}  // namespace MHA_CPU_NS
}  // namespace mha
