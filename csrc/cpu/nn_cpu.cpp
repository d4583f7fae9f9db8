// The elementwise and row-wise kernels of the Transformer layers (see nn_cpu.h).
//
// Versions: every kernel entry exists three times, picked once at load time by the ifunc
// resolver of GCC's target_clones: x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA) and baseline
// x86-64 (SSE2). The code is one source written on 8-lane double vectors (GCC vector
// extensions), which each clone maps to its own registers (one zmm, two ymm, four xmm); on
// other architectures or compilers it is compiled once, portable. No libm call is made in a
// kernel (libm's erf/exp are scalar and glibc's libmvec would raise the wheel's glibc floor):
// exp and erfc are written here as polynomials and a continued fraction.
//
// Numerics: float32 inputs are widened to double, so the float32 GELU is the correctly
// rounded value of a double computation whose own error is far below float32's half ulp
// (measured by tests/test_nn.py: <= 1 ulp, see the accuracy notes below). Layer norm
// accumulates the mean and the variance in double for both dtypes.
#include "cpu/nn_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "check.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#pragma GCC diagnostic ignored "-Wpsabi"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MHA_NN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define MHA_NN_HAVE_CLONES 1
#else
#define MHA_NN_CLONES
#define MHA_NN_HAVE_CLONES 0
#endif
#define MHA_NN_INLINE inline __attribute__((always_inline))

namespace mha {
namespace nn_detail {

constexpr int kLanes = 8;
using V = double __attribute__((vector_size(64)));    // 8 doubles
using VI = int64_t __attribute__((vector_size(64)));  // comparison masks / exponent bits
using VF = float __attribute__((vector_size(32)));    // 8 floats

MHA_NN_INLINE V splat(double c) { return V{} + c; }
MHA_NN_INLINE V sel(VI m, V a, V b) { return m ? a : b; }
MHA_NN_INLINE bool any(VI m) {
    int64_t r = 0;
    for (int l = 0; l < kLanes; ++l) r |= m[l];
    return r != 0;
}
MHA_NN_INLINE bool all(VI m) {
    int64_t r = -1;
    for (int l = 0; l < kLanes; ++l) r &= m[l];
    return r != 0;
}

MHA_NN_INLINE V load(const double* p) {
    V v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
MHA_NN_INLINE V load(const float* p) {
    VF f;
    std::memcpy(&f, p, sizeof f);
    return __builtin_convertvector(f, V);
}
MHA_NN_INLINE void store(double* p, V v) { std::memcpy(p, &v, sizeof v); }
MHA_NN_INLINE void store(float* p, V v) {
    VF f = __builtin_convertvector(v, VF);
    std::memcpy(p, &f, sizeof f);
}
// The last n < 8 elements of a row, through a zero-padded lane buffer.
template <typename T>
MHA_NN_INLINE V load_part(const T* p, int64_t n) {
    T buf[kLanes] = {};
    for (int64_t l = 0; l < n; ++l) buf[l] = p[l];
    return load(buf);
}
template <typename T>
MHA_NN_INLINE void store_part(T* p, V v, int64_t n) {
    T buf[kLanes];
    store(buf, v);
    for (int64_t l = 0; l < n; ++l) p[l] = buf[l];
}

// exp(x) for x <= 709: Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, a degree-13 Taylor
// polynomial (truncation error 4e-18 relative), then 2^n through the exponent bits. Below
// -708.39 (where exp leaves the normal range) it returns 0; NaN stays NaN.
MHA_NN_INLINE V exp_v(V x) {
    constexpr double kLog2e = 1.4426950408889634074;
    constexpr double kLn2Hi = 6.93147180369123816490e-01;  // 32 significant bits: n*hi exact
    constexpr double kLn2Lo = 1.90821492927058770002e-10;
    constexpr double kMagic = 6755399441055744.0;  // 1.5 * 2^52: adding it rounds to an int
    constexpr double kLow = -708.39;
    const VI under = x < kLow;
    V xc = sel(under, splat(0.0), x);
    xc = sel(xc > 709.0, splat(709.0), xc);
    const V t = xc * kLog2e + kMagic;
    const V n = t - kMagic;
    const V r = (xc - n * kLn2Hi) - n * kLn2Lo;
    // 1/k! for k = 13 .. 0
    constexpr double kC[] = {1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0,
                             1.0 / 3628800.0,    1.0 / 362880.0,    1.0 / 40320.0,
                             1.0 / 5040.0,       1.0 / 720.0,       1.0 / 120.0,
                             1.0 / 24.0,         1.0 / 6.0,         0.5,
                             1.0,                1.0};
    // Even and odd powers as two interleaved Horner chains in r^2.
    const V r2 = r * r;
    V pe = splat(kC[1]), po = splat(kC[0]);  // r^12 and r^13
#pragma GCC unroll 8
    for (int k = 3; k < 14; k += 2) {
        pe = pe * r2 + kC[k];
        po = po * r2 + kC[k - 1];
    }
    const V p = pe + r * po;
    VI bits_t, bits_m;
    const V magic = splat(kMagic);
    std::memcpy(&bits_t, &t, sizeof t);
    std::memcpy(&bits_m, &magic, sizeof magic);
    const VI e = (bits_t - bits_m + 1023) << 52;  // 2^n, n in [-1022, 1023]
    V scale;
    std::memcpy(&scale, &e, sizeof e);
    return sel(under, splat(0.0), p * scale);
}

// erfc(a) for a >= 0 (NaN stays NaN), with a relative error that stays small in the tail:
//   a < 2.5: erfc = 1 - erf, erf(a) = 2/sqrt(pi) exp(-a^2) sum_n (2a^2)^n a / (1*3*...*(2n+1))
//            (all terms positive, no cancellation; 41 terms reach double rounding at 2.5);
//   a >= 2.5: erfc = exp(-a^2) / (sqrt(pi) K), K = a + (1/2)/(a + (2/2)/(a + ... + 15/a)),
//            the Laplace continued fraction at depth 30 from its convergents A_30 / B_30.
// Measured against math.erfc (tests/test_nn.py): |erfc - ref| <= 2e-16 for a < 2.5 (so the
// relative error of the small values 1 - erf there is <= 4e-13 at a = 2.5) and relative
// error <= 1e-14 beyond.
struct SeriesCoefs {
    double c[41];
    constexpr SeriesCoefs() : c() {
        double d = 1.0;  // 1 * 3 * ... * (2n+1)
        for (int n = 0; n <= 40; ++n) {
            d *= (2 * n + 1);
            c[40 - n] = 1.0 / d;  // highest power first, for Horner
        }
    }
};
constexpr SeriesCoefs kSeries{};

// erf(a) by the series (used where a < 2.5) and erfc(a) by the continued fraction (a >= 2.5).
struct ErfParts {
    V erf_near, erfc_far;
};
MHA_NN_INLINE ErfParts erf_parts(V a) {
    constexpr double kTwoOverSqrtPi = 1.1283791670955125739;
    constexpr double kSqrtPi = 1.7724538509055160273;
    a = sel(a > 27.0, splat(27.0), a);  // erfc(27) underflows double: the result is 0 anyway
    const V a2 = a * a;
    const V e = exp_v(-a2);
    // Each side is skipped when no lane needs it (most activations are near 0, so the
    // continued fraction usually is).
    const VI near = a < 2.5;
    ErfParts r{splat(0.0), splat(0.0)};
    if (any(near)) {
        const V t = a2 + a2;
        // sum_k d_k t^k (d_k = c[40 - k]) as four interleaved Horner chains in w = t^4, so
        // the FMA latency of one long chain does not bound the throughput.
        const V t2 = t * t;
        const V w = t2 * t2;
        V p0 = splat(kSeries.c[0]), p1 = splat(0.0), p2 = splat(0.0), p3 = splat(0.0);
#pragma GCC unroll 16
        for (int m = 9; m >= 0; --m) {  // powers 4m + j, j = 0..3; d_40 is p0's top
            p0 = p0 * w + kSeries.c[40 - 4 * m];
            p1 = p1 * w + kSeries.c[40 - (4 * m + 1)];
            p2 = p2 * w + kSeries.c[40 - (4 * m + 2)];
            p3 = p3 * w + kSeries.c[40 - (4 * m + 3)];
        }
        const V s = (p0 + t * p1) + t2 * (p2 + t * p3);
        r.erf_near = kTwoOverSqrtPi * e * a * s;
    }
    if (!all(near)) {
        V a_prev = splat(1.0), a_cur = a, b_prev = splat(0.0), b_cur = splat(1.0);
#pragma GCC unroll 32
        for (int m = 1; m <= 30; ++m) {
            const double bm = 0.5 * m;
            const V an = a * a_cur + bm * a_prev;
            const V bn = a * b_cur + bm * b_prev;
            a_prev = a_cur;
            a_cur = an;
            b_prev = b_cur;
            b_cur = bn;
        }
        r.erfc_far = e * b_cur / (kSqrtPi * a_cur);
    }
    return r;
}

MHA_NN_INLINE V erfc_v(V a) {
    const ErfParts r = erf_parts(a);
    return sel(a < 2.5, 1.0 - r.erf_near, r.erfc_far);
}

// erf(x), odd; erf(+-inf) = +-1, NaN stays NaN.
MHA_NN_INLINE V erf_v(V x) {
    const V a = sel(x < 0.0, -x, x);
    const ErfParts r = erf_parts(a);
    const V y = sel(a < 2.5, r.erf_near, 1.0 - r.erfc_far);
    return sel(x < 0.0, -y, y);
}

// x * Phi(x), Phi(x) = erfc(-x/sqrt 2) / 2 taken from the side that keeps relative precision.
// gelu(-inf) = 0 (Phi = 0 exactly there), gelu(+inf) = +inf, NaN stays NaN.
MHA_NN_INLINE V gelu_v(V x) {
    constexpr double kRsqrt2 = 0.70710678118654752440;
    const V z = x * kRsqrt2;
    const V c = erfc_v(sel(z < 0.0, -z, z));
    const V phi = sel(x < 0.0, 0.5 * c, 1.0 - 0.5 * c);
    return sel(phi == 0.0, splat(0.0), x * phi);
}

// The GELU of a float32 input: the same x * Phi(x) in double, with a cheaper erfc that is
// accurate to what a float32 result needs (the double series above is kept for float64).
//   erfc(a) = t exp(-a^2 + g(t)),  t = 2 / (2 + a),  a in [0, 10.6]
// (the Chebyshev form of Numerical Recipes' erfccheb). g is a degree-19 Chebyshev series in
// u = (2t - 1.15) / 0.85 (t in [0.15, 1]), fitted at 80 nodes with mpmath at 40 digits and
// written here in powers of u (the coefficients decay fast enough that the power form loses
// nothing measurable), evaluated by Estrin's scheme so that its FMAs are not one serial
// chain. Measured against mpmath's erfc on 20,001 points of [0, 10.6]: relative error
// <= 2.4e-14, i.e. 4e-7 of a float32 half ulp, so the float32 result is the correctly
// rounded value except within 4e-7 ulp of a rounding midpoint (tests/test_nn.py checks
// <= 1 ulp on 50,000 points; measured 0.5). Beyond a = 10.6 (x < -14.99) x Phi(x) is below
// float32's smallest subnormal: the result is 0.
constexpr double kErfcPoly[20] = {
    -0.56999496063079169,    0.58103486808375715,     0.018217779904836043,
    -0.031170806575952177,   -0.0015328681355869273,  0.0041319204509850695,
    -0.00023405089013146582, -0.00065332656191986044, 0.0001611135027517934,
    8.7424177821787075e-05,  -5.1067559889659575e-05, -4.1324922558959662e-06,
    1.1163483307043654e-05,  -2.3134914408980326e-06, -1.5831883544588238e-06,
    8.9723948723872866e-07,  9.0633357689027818e-08,  -1.7010944608333214e-07,
    6.8463118615071724e-09,  1.5313164993369558e-08,
};

MHA_NN_INLINE V gelu_f32_v(V x) {
    constexpr double kRsqrt2 = 0.70710678118654752440;
    constexpr double kTMin = 0.15, kACut = 10.6;
    const V z = x * kRsqrt2;
    V a = sel(z < 0.0, -z, z);
    const VI far = a > kACut;  // false for NaN, which stays NaN below
    a = sel(far, splat(kACut), a);
    const V t = 2.0 / (2.0 + a);
    const V u = (2.0 * t - (1.0 + kTMin)) * (1.0 / (1.0 - kTMin));
    const V u2 = u * u, u4 = u2 * u2, u8 = u4 * u4, u16 = u8 * u8;
    const double* c = kErfcPoly;
    V q[10];
#pragma GCC unroll 10
    for (int i = 0; i < 10; ++i) q[i] = c[2 * i] + u * c[2 * i + 1];
    const V r0 = q[0] + u2 * q[1], r1 = q[2] + u2 * q[3], r2 = q[4] + u2 * q[5],
            r3 = q[6] + u2 * q[7], r4 = q[8] + u2 * q[9];
    const V g = ((r0 + u4 * r1) + u8 * (r2 + u4 * r3)) + u16 * r4;
    const V e = t * exp_v(g - a * a);  // erfc(|z|)
    V phi = sel(x < 0.0, 0.5 * e, 1.0 - 0.5 * e);
    phi = sel(far, sel(x < 0.0, splat(0.0), splat(1.0)), phi);
    return sel(phi == 0.0, splat(0.0), x * phi);
}

// x/2 (1 + tanh u), u = sqrt(2/pi) (x + 0.044715 x^3), written as x / (1 + exp(-2u)), which
// has no cancellation on either side. gelu_tanh(-inf) = 0, +inf stays, NaN stays (NaN > c is
// false).
MHA_NN_INLINE V gelu_tanh_v(V x) {
    constexpr double kSqrt2OverPi = 0.79788456080286535588;
    const V u = kSqrt2OverPi * (x + 0.044715 * x * x * x);
    const V m2u = -2.0 * u;
    const V y = x / (1.0 + exp_v(m2u));
    // Where exp(-2u) leaves double's range the value is below 1e-300 (and -inf gives 0).
    return sel(m2u > 708.0, splat(0.0), y);
}

MHA_NN_INLINE V relu_v(V x) { return sel(x < 0.0, splat(0.0), x); }

// T is the element type of the output: a float32 GELU takes the float32-accurate erfc.
template <typename T, Activation A>
MHA_NN_INLINE V act_v(V x) {
    if constexpr (A == Activation::kRelu) return relu_v(x);
    if constexpr (A == Activation::kGelu && std::is_same_v<T, float>) return gelu_f32_v(x);
    if constexpr (A == Activation::kGelu) return gelu_v(x);
    if constexpr (A == Activation::kGeluTanh) return gelu_tanh_v(x);
    if constexpr (A == Activation::kErf) return erf_v(x);
    return x;
}

// One block of the bias + activation: row i, columns [c0, c1). The bias is added in T (as a
// GEMM epilogue would), the activation is evaluated in double.
template <typename T, Activation A>
MHA_NN_INLINE void bias_act_block(const BiasActParams& p, int64_t i, int64_t c0, int64_t c1) {
    const T* x = static_cast<const T*>(p.x) + i * p.x_stride;
    const T* bias = static_cast<const T*>(p.bias);
    T* out = static_cast<T*>(p.out) + i * p.out_stride;
    int64_t j = c0;
    using TV = std::conditional_t<std::is_same_v<T, float>, VF, V>;
    for (; j + kLanes <= c1; j += kLanes) {
        TV t;
        std::memcpy(&t, x + j, sizeof t);
        if (bias) {
            TV bv;
            std::memcpy(&bv, bias + j, sizeof bv);
            t += bv;  // in T, as a GEMM epilogue would
        }
        if constexpr (A == Activation::kNone) {
            std::memcpy(out + j, &t, sizeof t);
        } else if constexpr (std::is_same_v<T, float>) {
            store(out + j, act_v<T, A>(__builtin_convertvector(t, V)));
        } else {
            store(out + j, act_v<T, A>(t));
        }
    }
    if (j < c1) {
        const int64_t n = c1 - j;
        T tmp[kLanes] = {};
        for (int64_t l = 0; l < n; ++l) tmp[l] = bias ? T(x[j + l] + bias[j + l]) : x[j + l];
        store_part(out + j, act_v<T, A>(load(tmp)), n);
    }
}

template <typename T>
MHA_NN_INLINE void bias_act_range(const BiasActParams& p, int64_t i, int64_t c0, int64_t c1) {
    switch (p.act) {
        case Activation::kNone: return bias_act_block<T, Activation::kNone>(p, i, c0, c1);
        case Activation::kRelu: return bias_act_block<T, Activation::kRelu>(p, i, c0, c1);
        case Activation::kGelu: return bias_act_block<T, Activation::kGelu>(p, i, c0, c1);
        case Activation::kGeluTanh:
            return bias_act_block<T, Activation::kGeluTanh>(p, i, c0, c1);
        case Activation::kErf: return bias_act_block<T, Activation::kErf>(p, i, c0, c1);
    }
}

// Layer norm of one row (see AddNormParams).
template <typename T>
MHA_NN_INLINE void add_norm_row(const AddNormParams& p, int64_t i) {
    const int64_t n = p.cols;
    const T* x = static_cast<const T*>(p.x) + i * p.x_stride;
    const T* y = p.y ? static_cast<const T*>(p.y) + i * p.y_stride : nullptr;
    const T* yb = static_cast<const T*>(p.y_bias);
    T* s = p.sum_out ? static_cast<T*>(p.sum_out) + i * p.sum_stride
                     : static_cast<T*>(p.out) + i * p.out_stride;
    // s = x + (y + y_bias), rounded to T like the unfused PyTorch ops (the adds run in T's own
    // vector type), summed in double.
    using TV = std::conditional_t<std::is_same_v<T, float>, VF, V>;
    auto ld = [](const T* q) {
        TV v;
        std::memcpy(&v, q, sizeof v);
        return v;
    };
    V acc = splat(0.0);
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes) {
        TV v = ld(x + j);
        if (y) {
            TV w = ld(y + j);
            if (yb) w += ld(yb + j);
            v += w;
        } else if (yb) {
            v += ld(yb + j);
        }
        std::memcpy(s + j, &v, sizeof v);
        if constexpr (std::is_same_v<T, float>) {
            acc += __builtin_convertvector(v, V);
        } else {
            acc += v;
        }
    }
    for (; j < n; ++j) {
        T v = y ? (yb ? T(y[j] + yb[j]) : y[j]) : (yb ? yb[j] : T(0));
        s[j] = (y || yb) ? T(x[j] + v) : x[j];
        acc[0] += static_cast<double>(s[j]);
    }
    if (!p.out) return;
    double total = 0.0;
    for (int l = 0; l < kLanes; ++l) total += acc[l];
    const double mean = total / static_cast<double>(n);
    V acc2 = splat(0.0);
    j = 0;
    for (; j + kLanes <= n; j += kLanes) {
        const V d = load(s + j) - mean;
        acc2 += d * d;
    }
    if (j < n) {
        const VI valid = VI{0, 1, 2, 3, 4, 5, 6, 7} < (n - j);
        const V d = sel(valid, load_part(s + j, n - j) - mean, splat(0.0));
        acc2 += d * d;
    }
    double sq = 0.0;
    for (int l = 0; l < kLanes; ++l) sq += acc2[l];
    const double rstd = 1.0 / std::sqrt(sq / static_cast<double>(n) + p.eps);
    const T* w = static_cast<const T*>(p.weight);
    const T* b = static_cast<const T*>(p.bias);
    T* out = static_cast<T*>(p.out) + i * p.out_stride;
    j = 0;
    for (; j + kLanes <= n; j += kLanes) {
        V v = (load(s + j) - mean) * rstd;
        if (w) v *= load(w + j);
        if (b) v += load(b + j);
        store(out + j, v);
    }
    if (j < n) {
        const int64_t r = n - j;
        V v = (load_part(s + j, r) - mean) * rstd;
        if (w) v *= load_part(w + j, r);
        if (b) v += load_part(b + j, r);
        store_part(out + j, v, r);
    }
}

// The cloned entry points: one per dtype, each a block of work of the OpenMP drivers below.
MHA_NN_CLONES void bias_act_f32(const BiasActParams& p, int64_t i, int64_t c0, int64_t c1) {
    bias_act_range<float>(p, i, c0, c1);
}
MHA_NN_CLONES void bias_act_f64(const BiasActParams& p, int64_t i, int64_t c0, int64_t c1) {
    bias_act_range<double>(p, i, c0, c1);
}
MHA_NN_CLONES void add_norm_f32(const AddNormParams& p, int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) add_norm_row<float>(p, i);
}
MHA_NN_CLONES void add_norm_f64(const AddNormParams& p, int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) add_norm_row<double>(p, i);
}

int threads_for(int requested, int64_t work, int64_t serial_below) {
#ifdef _OPENMP
    if (work < serial_below) return 1;
    return requested > 0 ? requested : omp_get_max_threads();
#else
    return 1;
#endif
}

}  // namespace nn_detail

using namespace nn_detail;

void bias_act_cpu(const BiasActParams& p) {
    MHA_CHECK(p.rows >= 0 && p.cols >= 0, "x: negative size");
    MHA_CHECK(p.num_threads >= 0, "num_threads: expected a positive int, got ", p.num_threads);
    if (p.rows == 0 || p.cols == 0) return;
    MHA_CHECK(p.x && p.out, "x: no data");
    // Blocks of up to 2048 columns, so one long row is split across threads too.
    constexpr int64_t kBlock = 2048;
    const int64_t per_row = (p.cols + kBlock - 1) / kBlock;
    const int64_t blocks = p.rows * per_row;
    const bool costly = p.act != Activation::kNone && p.act != Activation::kRelu;
    const int threads = threads_for(p.num_threads, p.rows * p.cols, costly ? 8192 : 131072);
    auto* fn = p.dtype == NnDtype::kFloat64 ? &bias_act_f64 : &bias_act_f32;
    // Dynamic chunks, not a static split: right after one of NumPy's BLAS calls, OpenBLAS's
    // worker threads keep spinning on a core for a while (its THREAD_TIMEOUT); with a static
    // split the thread sharing that core set the pace (measured: GELU after a GEMM 1.6x
    // slower than alone on 2 cores). A chunk is >= 16 K elements, so the scheduling cost is
    // nothing beside the work.
    const int64_t chunk = std::max<int64_t>(1, (int64_t{1} << 14) / std::min(p.cols, kBlock));
#pragma omp parallel for schedule(dynamic, chunk) num_threads(threads) if (threads > 1)
    for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t i = blk / per_row;
        const int64_t c0 = (blk % per_row) * kBlock;
        const int64_t c1 = c0 + kBlock < p.cols ? c0 + kBlock : p.cols;
        fn(p, i, c0, c1);
    }
}

void add_norm_cpu(const AddNormParams& p) {
    MHA_CHECK(p.rows >= 0 && p.cols >= 0, "x: negative size");
    MHA_CHECK(p.num_threads >= 0, "num_threads: expected a positive int, got ", p.num_threads);
    MHA_CHECK(p.eps >= 0 && std::isfinite(p.eps), "eps: expected a finite value >= 0, got ",
              p.eps);
    MHA_CHECK(p.sum_out || p.out, "out: nothing to write");
    if (p.rows == 0 || p.cols == 0) return;
    const int threads = threads_for(p.num_threads, p.rows * p.cols, 65536);
    auto* fn = p.dtype == NnDtype::kFloat64 ? &add_norm_f64 : &add_norm_f32;
    // Rows in contiguous runs of 16 (one cache-friendly block each).
    constexpr int64_t kRows = 16;
    const int64_t blocks = (p.rows + kRows - 1) / kRows;
    // Dynamic, for the reason given in bias_act_cpu (OpenBLAS threads spinning after a GEMM).
#pragma omp parallel for schedule(dynamic, 4) num_threads(threads) if (threads > 1)
    for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t i0 = blk * kRows;
        fn(p, i0, i0 + kRows < p.rows ? i0 + kRows : p.rows);
    }
}

const char* nn_simd_cpu() {
#if MHA_NN_HAVE_CLONES
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) return "x86-64-v4";
    if (__builtin_cpu_supports("x86-64-v3")) return "x86-64-v3";
    return "x86-64";
#else
    return "portable";
#endif
}

}  // namespace mha
