// Parameters of the layer kernels (SPEC section 5): bias + activation (exact GELU, tanh
// GELU, ReLU) and layer norm with the residual add fused. Plain structs, no STL/pybind types;
// the binding (bindings_nn.cpp) fills them and calls dispatch.h's entry points. Every kernel
// works on a row-major (rows, cols) block with a row stride in elements, so a view of a packed
// (tokens, features) activation needs no copy.
#pragma once

#include <cstdint>

namespace mha {

enum class NnDtype : int { kFloat32 = 0, kFloat64 = 1 };

// activation(x + bias), elementwise.
enum class Activation : int {
    kNone = 0,      // x + bias
    kRelu = 1,      // max(x, 0); NaN stays NaN
    kGelu = 2,      // x * Phi(x) = x/2 * (1 + erf(x / sqrt 2)), torch's default GELU
    kGeluTanh = 3,  // x/2 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))), GELU(approximate="tanh")
    kErf = 4,       // erf(x) (not an activation: the error function itself, for mha_ext._nn.erf)
};

// out[i, j] = act(x[i, j] + bias[j]); x and out may be the same memory.
struct BiasActParams {
    NnDtype dtype = NnDtype::kFloat32;
    Activation act = Activation::kNone;
    const void* x = nullptr;     // (rows, cols), row stride x_stride
    const void* bias = nullptr;  // (cols,) or nullptr
    void* out = nullptr;         // (rows, cols), row stride out_stride
    int64_t rows = 0, cols = 0;
    int64_t x_stride = 0, out_stride = 0;
    int num_threads = 0;  // 0: OpenMP default
};

// s = x + y + y_bias (y and y_bias optional), then
//   sum_out = s            (when sum_out is set: the pre-norm residual stream),
//   out = (s - mean) / sqrt(var + eps) * weight + bias   (when out is set),
// with mean and the biased variance over each row. weight/bias nullptr mean 1 and 0.
// Accumulation is in double for both dtypes. sum_out and out may alias x or y.
struct AddNormParams {
    NnDtype dtype = NnDtype::kFloat32;
    const void* x = nullptr;       // (rows, cols), row stride x_stride
    const void* y = nullptr;       // (rows, cols), row stride y_stride, or nullptr
    const void* y_bias = nullptr;  // (cols,) or nullptr
    const void* weight = nullptr;  // (cols,) or nullptr
    const void* bias = nullptr;    // (cols,) or nullptr
    void* sum_out = nullptr;       // (rows, cols), row stride sum_stride, or nullptr
    void* out = nullptr;           // (rows, cols), row stride out_stride, or nullptr
    int64_t rows = 0, cols = 0;
    int64_t x_stride = 0, y_stride = 0, sum_stride = 0, out_stride = 0;
    double eps = 1e-5;
    int num_threads = 0;
};

}  // namespace mha
