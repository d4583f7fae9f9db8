// Python entry points of the layer kernels (nn_params.h, through dispatch.h): bias + activation and layer norm
// with the residual add. Converts and forwards only: shapes and dtypes are read from the
// arrays, value checks live in nn_cpu.cpp. The wrappers in mha_ext/_nn.py allocate the outputs.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "bindings_util.h"
#include "check.h"
#include "dispatch.h"

namespace py = pybind11;

namespace mha {
namespace {

// A float32/float64 array viewed as (rows, cols) with unit column stride and one row stride:
// its last axis is contiguous and its leading axes collapse into one.
struct Rows {
    void* data = nullptr;
    int64_t rows = 1, cols = 1, stride = 0;
    NnDtype dtype = NnDtype::kFloat32;
};

NnDtype dtype_of(const py::array& a, const char* name) {
    if (a.dtype().is(py::dtype::of<float>())) return NnDtype::kFloat32;
    if (a.dtype().is(py::dtype::of<double>())) return NnDtype::kFloat64;
    throw type_error(detail::concat(name, ": expected float32 or float64, got dtype ",
                                    std::string(py::str(a.dtype()))));
}

Rows rows_of(const py::array& a, const char* name, bool writable) {
    Rows r;
    r.dtype = dtype_of(a, name);
    const int64_t item = static_cast<int64_t>(a.itemsize());
    const int nd = static_cast<int>(a.ndim());
    MHA_CHECK(nd >= 1, name, ": expected at least one dimension");
    if (writable) MHA_CHECK(a.writeable(), name, ": array is read-only");
    r.cols = a.shape(nd - 1);
    r.rows = 1;
    for (int k = 0; k < nd - 1; ++k) r.rows *= a.shape(k);
    r.data = const_cast<void*>(a.data());
    if (r.rows * r.cols == 0) return r;  // nothing to read or write: strides do not matter
    MHA_CHECK(r.cols <= 1 || a.strides(nd - 1) == item, name,
              ": the last axis must be contiguous");
    r.stride = r.cols;
    if (nd >= 2 && r.rows > 1) {
        // Leading axes must be one uniform run of rows: stride[k] = stride[k+1] * shape[k+1].
        int64_t expect = a.strides(nd - 2);
        MHA_CHECK(expect % item == 0, name, ": misaligned strides");
        r.stride = expect / item;
        for (int k = nd - 3; k >= 0; --k) {
            expect *= a.shape(k + 1);
            MHA_CHECK(a.shape(k) == 1 || a.strides(k) == expect, name,
                      ": the leading axes must collapse into one row axis (make it contiguous)");
        }
        MHA_CHECK(r.stride >= r.cols, name, ": rows overlap");
    }
    r.data = const_cast<void*>(a.data());
    return r;
}

// An optional (cols,) vector of the given dtype.
const void* vector_of(const py::object& o, const char* name, NnDtype dt, int64_t cols) {
    if (o.is_none()) return nullptr;
    MHA_CHECK_TYPE(py::isinstance<py::array>(o), name, ": expected a NumPy array");
    py::array a = py::reinterpret_borrow<py::array>(o);
    MHA_CHECK_TYPE(dtype_of(a, name) == dt, name, ": dtype must match x");
    MHA_CHECK(a.ndim() == 1 && a.shape(0) == cols, name, ": expected shape (", cols, ",)");
    MHA_CHECK(cols <= 1 || a.strides(0) == static_cast<int64_t>(a.itemsize()), name,
              ": must be contiguous");
    return a.data();
}

void same_shape(const py::array& a, const py::array& ref, const char* name, NnDtype dt) {
    MHA_CHECK_TYPE(dtype_of(a, name) == dt, name, ": dtype must match x");
    bool same = a.ndim() == ref.ndim();
    for (int k = 0; same && k < a.ndim(); ++k) same = a.shape(k) == ref.shape(k);
    MHA_CHECK(same, name, ": expected the shape of x");
}

using binding::parse_num_threads;

void py_bias_act(const py::array& x, const py::object& bias, int act, const py::array& out,
              const py::object& num_threads) {
    BiasActParams p{};
    const Rows rx = rows_of(x, "x", false);
    same_shape(out, x, "out", rx.dtype);
    const Rows ro = rows_of(out, "out", true);
    MHA_CHECK(act >= 0 && act <= 4, "activation: unknown code ", act);
    p.dtype = rx.dtype;
    p.act = static_cast<Activation>(act);
    p.x = rx.data;
    p.bias = vector_of(bias, "bias", rx.dtype, rx.cols);
    p.out = ro.data;
    p.rows = rx.rows;
    p.cols = rx.cols;
    p.x_stride = rx.stride;
    p.out_stride = ro.stride;
    p.num_threads = parse_num_threads(num_threads);
    py::gil_scoped_release release;
    mha::bias_act(p);
}

void py_add_norm(const py::array& x, const py::object& y, const py::object& y_bias,
              const py::object& weight, const py::object& bias, double eps,
              const py::object& sum_out, const py::object& out, const py::object& num_threads) {
    AddNormParams p{};
    const Rows rx = rows_of(x, "x", false);
    p.dtype = rx.dtype;
    p.x = rx.data;
    p.x_stride = rx.stride;
    p.rows = rx.rows;
    p.cols = rx.cols;
    if (!y.is_none()) {
        py::array ya = py::reinterpret_borrow<py::array>(y);
        same_shape(ya, x, "y", rx.dtype);
        const Rows ry = rows_of(ya, "y", false);
        p.y = ry.data;
        p.y_stride = ry.stride;
    }
    p.y_bias = vector_of(y_bias, "y_bias", rx.dtype, rx.cols);
    p.weight = vector_of(weight, "weight", rx.dtype, rx.cols);
    p.bias = vector_of(bias, "bias", rx.dtype, rx.cols);
    if (!sum_out.is_none()) {
        py::array sa = py::reinterpret_borrow<py::array>(sum_out);
        same_shape(sa, x, "sum_out", rx.dtype);
        const Rows rs = rows_of(sa, "sum_out", true);
        p.sum_out = rs.data;
        p.sum_stride = rs.stride;
    }
    if (!out.is_none()) {
        py::array oa = py::reinterpret_borrow<py::array>(out);
        same_shape(oa, x, "out", rx.dtype);
        const Rows ro = rows_of(oa, "out", true);
        p.out = ro.data;
        p.out_stride = ro.stride;
    }
    p.eps = eps;
    p.num_threads = parse_num_threads(num_threads);
    py::gil_scoped_release release;
    mha::add_norm(p);
}

}  // namespace
}  // namespace mha

// Called from PYBIND11_MODULE in bindings.cpp.
void register_nn(py::module_& m) {
    using namespace mha;
    m.def("bias_act", &py_bias_act, py::arg("x"), py::arg("bias"), py::arg("activation"),
          py::arg("out"), py::arg("num_threads") = py::none(),
          "out = activation(x + bias) over the last axis (0 none, 1 relu, 2 gelu, 3 gelu_tanh, 4 erf); "
          "out may be x.");
    m.def("add_norm", &py_add_norm, py::arg("x"), py::arg("y"), py::arg("y_bias"),
          py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("sum_out"),
          py::arg("out"), py::arg("num_threads") = py::none(),
          "s = x + (y + y_bias); sum_out = s; out = layer_norm(s) * weight + bias (last axis).");
    m.def("nn_simd", &mha::nn_simd, "Instruction set of the layer kernels' clone in use.");
}
