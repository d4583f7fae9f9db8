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

// tanh(x) = sign(x) (1 - 2 / (exp(2|x|) + 1)); |x| < 0.0625 uses the odd Taylor series,
// where the subtraction would cancel.
inline vec_t<float> vtanh(vec_t<float> x) {
    using V = vec_t<float>;
    using VI = Vec<float>::itype;
    // The sign bit as an integer broadcast: vbroadcast(-0.0f) would be 0.0f + -0.0f = +0.0f.
    const VI sign_bit = VI{} + static_cast<int32_t>(0x80000000u);
    const VI sign = (VI)x & sign_bit;
    V ax = (V)((VI)x & ~sign_bit);
    ax = ax > 9.0f ? vbroadcast(9.0f) : ax;
    const V e = vexp(ax + ax);
    const V big = 1.0f - 2.0f / (e + 1.0f);
    const V x2 = ax * ax;
    const V small = ax * (1.0f + x2 * (-1.0f / 3 + x2 * (2.0f / 15 + x2 * (-17.0f / 315))));
    const V t = ax < 0.0625f ? small : big;
    const V nan_keep = x != x ? x : t;  // tanh(nan) = nan
    return (V)((VI)nan_keep | sign);
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
