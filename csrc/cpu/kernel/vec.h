// Vectors of MHA_CPU_VEC_BYTES bytes of accum_t (GCC vector extensions), their loads and
// stores, and the vectorised exp / tanh.
// Part of the CPU kernel compiled once per instruction set (see attention_cpu_isa.cpp):
// include only from there, inside namespace mha::MHA_CPU_NS, no STL templates.
#pragma once

#include "cpu/kernel/config.h"

namespace mha {
namespace MHA_CPU_NS {

// ------------------------------------------------------------------------------------------
// Vectors: MHA_CPU_VEC_BYTES bytes of accum_t: 32 (8 floats / 4 doubles), which GCC lowers to
// one AVX register in the AVX2 build and to two SSE registers in the baseline build, or 64
// (16 floats / 8 doubles, one zmm register) in the avx512 and amx builds.

template <typename A>
struct Vec;
template <>
struct Vec<float> {
    typedef float type __attribute__((vector_size(MHA_CPU_VEC_BYTES), aligned(4)));
    typedef int32_t itype __attribute__((vector_size(MHA_CPU_VEC_BYTES), aligned(4)));
    static constexpr int kWidth = MHA_CPU_VEC_BYTES / 4;
};
template <>
struct Vec<double> {
    typedef double type __attribute__((vector_size(MHA_CPU_VEC_BYTES), aligned(8)));
    typedef int64_t itype __attribute__((vector_size(MHA_CPU_VEC_BYTES), aligned(8)));
    static constexpr int kWidth = MHA_CPU_VEC_BYTES / 8;
};

template <typename A>
using vec_t = typename Vec<A>::type;

template <typename A>
inline vec_t<A> vload(const A* p) {
    return *reinterpret_cast<const vec_t<A>*>(p);
}
template <typename A>
inline void vstore(A* p, vec_t<A> v) {
    *reinterpret_cast<vec_t<A>*>(p) = v;
}
template <typename A>
inline vec_t<A> vbroadcast(A x) {
    return vec_t<A>{} + x;
}

// ------------------------------------------------------------------------------------------
// Vectorised exp and tanh.

// exp(x) for float vectors: Cody-Waite range reduction and the Cephes expf polynomial
// (about 1 ulp on the reduced range). exp(-inf) = 0, exp(nan) = nan, large x saturates.
inline vec_t<float> vexp(vec_t<float> x) {
    using V = vec_t<float>;
    using VI = Vec<float>::itype;
    const V lo = vbroadcast(-87.33654f);
    const V hi = vbroadcast(88.37626f);
    const VI underflow = x < lo;
    V xc = x < lo ? lo : x;
    xc = xc > hi ? hi : xc;
    const V magic = vbroadcast(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
    const V r = xc * 1.44269504088896341f + magic;
    const V n = r - magic;
    V f = xc - n * 0.693359375f;
    f = f - n * -2.12194440e-4f;
    V p = vbroadcast(1.9875691500e-4f);
    p = p * f + 1.3981999507e-3f;
    p = p * f + 8.3334519073e-3f;
    p = p * f + 4.1665795894e-2f;
    p = p * f + 1.6666665459e-1f;
    p = p * f + 5.0000001201e-1f;
    p = p * (f * f) + f + 1.0f;
    const VI ni = (VI)r - (VI)magic;
    const VI pow2 = (ni + 127) << 23;
    V y = p * (V)pow2;
    return (V)((VI)y & ~underflow);
}

// num / den, den in [1, 2e3] (vtanh's denominator). AVX-512: the 14-bit reciprocal and one
// Newton step (about 1 ulp; exact for den = 1) instead of vdivps, which issues once per ~5
// cycles; elsewhere the division.
inline vec_t<float> vdiv_tanh(vec_t<float> num, vec_t<float> den) {
#if defined(__AVX512F__) && MHA_CPU_VEC_BYTES == 64
    const __m512 d = (__m512)den;
    __m512 r = _mm512_rcp14_ps(d);
    r = _mm512_fmadd_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(1.0f)), r);
    return num * (vec_t<float>)r;
#else
    return num / den;
#endif
}

// tanh(x) = x P(x^2) / Q(x^2) on x clamped to [-9, 9] (tanh(9) is 1 to 3e-8), P of degree 5
// and Q of degree 4 in x^2: a minimax fit of tanh(x) / x on [0, 9] in relative error
// (4e-9 in float64; about 5 ulp in float32 with the coefficients rounded, tiny x exact),
// then clamped to [-1, 1]. No exp, no cancellation near 0; NaN passes (every comparison is
// false for it), +-inf gives +-1, -0 stays -0. 9 FMAs, a reciprocal and 6 min/max.
inline vec_t<float> vtanh(vec_t<float> x) {
    using V = vec_t<float>;
    V xc = x > 9.0f ? vbroadcast(9.0f) : x;
    xc = xc < -9.0f ? vbroadcast(-9.0f) : xc;
    const V t = xc * xc;
    V p = vbroadcast(-1.262063197e-11f);
    p = p * t + 3.115200542e-08f;
    p = p * t + 2.824456533e-05f;
    p = p * t + 3.880113130e-03f;
    p = p * t + 1.368932873e-01f;
    p = p * t + 1.0f;
    V q = vbroadcast(1.303892077e-06f);
    q = q * t + 3.959386377e-04f;
    q = q * t + 2.728899755e-02f;
    q = q * t + 4.702266157e-01f;
    q = q * t + 1.0f;
    V y = vdiv_tanh(xc * p, q);
    y = y > 1.0f ? vbroadcast(1.0f) : y;
    return y < -1.0f ? vbroadcast(-1.0f) : y;
}

// float64 runs lane by lane through libm: it is the accuracy path, not the fast path.
inline vec_t<double> vexp(vec_t<double> x) {
    vec_t<double> r;
    for (int w = 0; w < Vec<double>::kWidth; ++w) r[w] = std::exp(x[w]);
    return r;
}
inline vec_t<double> vtanh(vec_t<double> x) {
    vec_t<double> r;
    for (int w = 0; w < Vec<double>::kWidth; ++w) r[w] = std::tanh(x[w]);
    return r;
}

// sum_a w[a] * tanh(x[a] + y[a]) over a < n (n a multiple of the vector width).
template <typename A>
inline A additive_dot(const A* x, const A* y, const A* w, int64_t n) {
    using V = vec_t<A>;
    V acc{};
    for (int64_t a = 0; a < n; a += Vec<A>::kWidth) {
        acc += vload(w + a) * vtanh(vload(x + a) + vload(y + a));
    }
    A total = 0;
    for (int i = 0; i < Vec<A>::kWidth; ++i) total += acc[i];
    return total;
}

}  // namespace MHA_CPU_NS
}  // namespace mha
