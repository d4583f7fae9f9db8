// pybind11 module mha_ext._core: converts NumPy arrays into one AttentionParams, releases the
// GIL, calls the dispatcher and returns new arrays. Only what needs the Python objects is
// checked here (types, dtypes, ranks, shapes the struct does not hold, broadcastability);
// every value invariant lives in check_params() (params.h). No numerics.
//
// Layout: helpers (shapes, dtypes, strides) -> the argument table MHA_ATTENTION_ARGS ->
// the fillers fill_qkv / fill_score / fill_masks / fill_out / fill_extras that every entry
// point reuses -> attention() -> the fast-call entry point -> S2 -> the module.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "bindings_util.h"
#include "check.h"
#include "dispatch.h"
#include "params.h"
#include "s2/s2.h"

namespace py = pybind11;

namespace mha {
namespace {

// Ctrl-C: the kernel polls this between tiles from the calling thread. At most every 20 ms it
// takes the GIL and lets Python run its signal handlers; a KeyboardInterrupt (or any error
// they raise) stops the call. Only the main thread receives signals, so only calls made
// from it install the hook.
struct InterruptPoll {
    std::chrono::steady_clock::time_point last = std::chrono::steady_clock::now();
};

int poll_python_signals(void* ctx) {
    auto* poll = static_cast<InterruptPoll*>(ctx);
    const auto now = std::chrono::steady_clock::now();
    if (now - poll->last < std::chrono::milliseconds(20)) return 0;
    poll->last = now;
    py::gil_scoped_acquire gil;
    return PyErr_CheckSignals() != 0 ? 1 : 0;
}

unsigned long main_thread_ident() {
    static const unsigned long ident =
        py::module_::import("threading").attr("main_thread")().attr("ident").cast<unsigned long>();
    return ident;
}

// "(2, 3)", "(5,)", "()": a shape as NumPy prints it.
std::string shape_str(const std::vector<int64_t>& shape) {
    std::string s = "(";
    for (size_t i = 0; i < shape.size(); ++i) {
        s += std::to_string(shape[i]);
        if (shape.size() == 1 || i + 1 < shape.size()) s += shape.size() == 1 ? "," : ", ";
    }
    return s + ")";
}

std::string shape_str(const py::array& a) {
    return shape_str(std::vector<int64_t>(a.shape(), a.shape() + a.ndim()));
}

std::string dtype_name(const py::array& a) { return py::str(a.dtype().attr("name")); }

bool is_bfloat16(const py::dtype& dt) {
    return dt.itemsize() == 2 && dt.kind() == 'V' && py::str(dt.attr("name")).cast<std::string>() == "bfloat16";
}

// The attention dtype of an array, or false when it has none.
bool classify(const py::array& a, DType* out) {
    const py::dtype dt = a.dtype();
    const char kind = dt.kind();
    if (kind == 'f') {
        switch (dt.itemsize()) {
            case 4: *out = DType::kFloat32; return true;
            case 8: *out = DType::kFloat64; return true;
            case 2: *out = DType::kFloat16; return true;
            default: return false;
        }
    }
    if (is_bfloat16(dt)) {
        *out = DType::kBFloat16;
        return true;
    }
    return false;
}

// True when the dtype's bytes are in this machine's order ('=' native, '|' not applicable).
bool native_order(const py::dtype& dt) {
    const char order = dt.byteorder();
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    return order != '<';
#else
    return order != '>';
#endif
}

// The array in native byte order (a converted copy when it is not), so the kernels never
// read swapped bytes.
py::array native_byte_order(py::array a) {
    if (native_order(a.dtype())) return a;
    return a.attr("astype")(a.dtype().attr("newbyteorder")("="));
}

// A view whose data is aligned, whose last axis is contiguous and whose strides are whole
// elements; else a C copy (the kernels load elements as their type: UB when misaligned).
py::array fast_path_view(py::array a) {
    const py::ssize_t item = a.itemsize();
    bool ok = (a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_) != 0 &&
              (a.ndim() == 0 || a.shape(a.ndim() - 1) <= 1 || a.strides(a.ndim() - 1) == item);
    for (py::ssize_t i = 0; ok && i < a.ndim(); ++i) ok = a.strides(i) % item == 0;
    if (ok) return a;
    // A fresh C-ordered copy: new NumPy buffers are aligned (ascontiguousarray would hand a
    // contiguous but misaligned array back unchanged).
    return a.attr("copy")();
}

// Stride of an axis in elements (0 for a size-1 axis). `item` is a.itemsize(), which costs a
// lookup of NumPy's API table each time: callers read it once per array.
int64_t elem_stride(const py::array& a, py::ssize_t axis, py::ssize_t item) {
    return a.shape(axis) <= 1 ? 0 : static_cast<int64_t>(a.strides(axis) / item);
}

// An absent optional array. pybind11's default py::array() allocates an empty float64 array
// (with two heap vectors for its shape); a tiny call used to build nine of them.
py::array no_array() { return py::reinterpret_steal<py::array>(py::handle()); }

using binding::parse_num_threads;

// [lo, hi) byte range spanned by an array.
void byte_extent(const py::array& a, uintptr_t* lo, uintptr_t* hi) {
    uintptr_t start = reinterpret_cast<uintptr_t>(a.data());
    intptr_t low = 0, high = a.itemsize();
    for (py::ssize_t i = 0; i < a.ndim(); ++i) {
        if (a.shape(i) == 0) {
            *lo = *hi = start;
            return;
        }
        const intptr_t span = static_cast<intptr_t>(a.strides(i)) * (a.shape(i) - 1);
        (span < 0 ? low : high) += span;
    }
    *lo = start + low;
    *hi = start + high;
}

bool overlaps(const py::array& a, const py::array& b) {
    uintptr_t alo, ahi, blo, bhi;
    byte_extent(a, &alo, &ahi);
    byte_extent(b, &blo, &bhi);
    return alo < ahi && blo < bhi && alo < bhi && blo < ahi;
}

// Logical (batch, heads, seq, dim) axes of a q/k/v/out array of rank 2..4 in a layout:
// the numpy axis index of each, or -1 when the axis is implicit (size 1).
struct Axes {
    int b, h, l, d;
};
Axes axes_of(int rank, bool blhd) {
    if (rank == 4) return blhd ? Axes{0, 2, 1, 3} : Axes{0, 1, 2, 3};
    if (rank == 3) return blhd ? Axes{-1, 1, 0, 2} : Axes{-1, 0, 1, 2};
    return Axes{-1, -1, 0, 1};
}

struct Dims4 {
    int64_t b, h, l, d;
    int64_t sb, sh, sl;  // element strides
};
Dims4 dims_of(const py::array& a, const Axes& ax) {
    auto size = [&](int axis) { return axis < 0 ? int64_t{1} : static_cast<int64_t>(a.shape(axis)); };
    const py::ssize_t item = a.itemsize();
    auto stride = [&](int axis) { return axis < 0 ? int64_t{0} : elem_stride(a, axis, item); };
    return {size(ax.b), size(ax.h), size(ax.l), size(ax.d), stride(ax.b), stride(ax.h),
            stride(ax.l)};
}

// Shape of a result in the caller's rank and layout, into dims[0 .. rank) (no heap).
void shape_into(int rank, bool blhd, int64_t b, int64_t h, int64_t l, int64_t d, int64_t* dims) {
    // Rank 2 is (L, D) in either layout.
    const int64_t bhld[4] = {b, h, l, d}, blhd_[4] = {b, l, h, d};
    const int64_t* src = (blhd && rank > 2 ? blhd_ : bhld) + (4 - rank);
    for (int i = 0; i < rank; ++i) dims[i] = src[i];
}

std::vector<int64_t> shape_of(int rank, bool blhd, int64_t b, int64_t h, int64_t l, int64_t d) {
    int64_t dims[4];
    shape_into(rank, blhd, b, h, l, d, dims);
    return std::vector<int64_t>(dims, dims + rank);
}

// A new C-ordered array of `dt`, shape dims[0 .. nd): NumPy's constructor called directly,
// without the shape and stride vectors pybind11's py::array(dtype, shape) builds (about 500
// instructions of a ~2 us tiny call).
py::array new_c_array(const py::dtype& dt, int nd, const int64_t* dims) {
    const auto& api = py::detail::npy_api::get();
    Py_intptr_t shape[4];
    for (int i = 0; i < nd; ++i) shape[i] = static_cast<Py_intptr_t>(dims[i]);
    PyObject* o = api.PyArray_NewFromDescr_(api.PyArray_Type_, dt.inc_ref().ptr(), nd, shape,
                                            nullptr, nullptr, 0, nullptr);  // steals dt
    if (o == nullptr) throw py::error_already_set();
    return py::reinterpret_steal<py::array>(o);
}

// Broadcast strides (elements) of a mask/bias against target (B, Hq, Lq, Lk), in that order.
void broadcast_strides(const py::array& a, const char* name, const int64_t target[4],
                       int64_t strides[4]) {
    const int nd = static_cast<int>(a.ndim());
    bool ok = nd <= 4;
    for (int i = 0; ok && i < nd; ++i) {
        const int t = 4 - nd + i;
        const int64_t n = a.shape(i);
        ok = n == target[t] || n == 1;
    }
    if (!ok) {
        // A (B, Lk) padding mask (Keras, Hugging Face) lines up with (Lq, Lk) instead.
        const bool padding = nd == 2 && a.shape(0) == target[0] && a.shape(1) == target[3];
        throw std::invalid_argument(detail::concat(
            name, ": shape ", shape_str(a), " is not broadcastable to (B, Hq, Lq, Lk) = ",
            shape_str(std::vector<int64_t>(target, target + 4)),
            padding ? detail::concat("; for a (B, Lk) padding ", name, " pass ", name,
                                     "[:, None, None, :]")
                    : std::string()));
    }
    const py::ssize_t item = a.itemsize();
    for (int t = 0; t < 4; ++t) {
        const int i = t - (4 - nd);
        strides[t] = (i < 0 || a.shape(i) == 1) ? 0 : static_cast<int64_t>(a.strides(i) / item);
    }
}

// A float parameter array converted to the accumulation type (float or double), C-contiguous.
py::array as_accum(const py::handle& obj, bool dbl, const char* name) {
    py::array a = py::array::ensure(obj);
    if (!a) throw type_error(detail::concat(name, ": expected a NumPy array"));
    const char kind = a.dtype().kind();
    const bool numeric = kind == 'f' || kind == 'i' || kind == 'u' || is_bfloat16(a.dtype());
    MHA_CHECK_TYPE(numeric, name, ": expected a real floating-point array, got dtype ",
                   dtype_name(a));
    py::array r = dbl ? py::array(py::array_t<double, py::array::c_style | py::array::forcecast>::ensure(a))
                      : py::array(py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(a));
    return fast_path_view(r);
}

// ------------------------------------------------------------------------------------------
// The Python -> C++ protocol of _core.attention, written once. The fast-call entry point maps
// positional and keyword arguments through this list; _core.ATTENTION_ARGS exports it;
// mha_ext._attention passes them positionally in this order and checks that order against
// ATTENTION_ARGS at import; _core.pyi lists them in this order (tests/test_native_params.py
// checks it). Absent arguments take the defaults of AttentionArgs' readers. Append new
// arguments at the end (they may then be passed by keyword).
#define MHA_ATTENTION_ARGS(X)                                                                \
    X(q) X(k) X(v) X(mask) X(bias) X(causal) X(window_left) X(window_right) X(key_lengths)  \
    X(scale) X(score) X(score_wq) X(score_wk) X(score_w) X(return_weights) X(return_lse)    \
    X(blhd) X(device) X(num_threads) X(out) X(naive) X(alibi_slopes) X(softcap)

enum ArgSlot : int {
#define MHA_ARG_SLOT(name) kArg_##name,
    MHA_ATTENTION_ARGS(MHA_ARG_SLOT)
#undef MHA_ARG_SLOT
    kNumArgs
};

constexpr const char* kArgNames[kNumArgs] = {
#define MHA_ARG_NAME(name) #name,
    MHA_ATTENTION_ARGS(MHA_ARG_NAME)
#undef MHA_ARG_NAME
};

// Score kinds as the Python layer passes them (_core.Score): the kernel's Score plus the
// default-scale rule (scaled dot: 1/sqrt(D), every other kind: 1).
enum class ScoreKind : int { kScaledDot = 0, kDot = 1, kGeneral = 2, kAdditive = 3 };

// The decoded arguments of one call (borrowed references into the caller's argument array).
struct AttentionArgs {
    PyObject* slot[kNumArgs] = {};  // nullptr: not passed

    py::handle obj(ArgSlot s) const { return slot[s] != nullptr ? slot[s] : Py_None; }
    bool given(ArgSlot s) const { return slot[s] != nullptr && slot[s] != Py_None; }

    py::array array(ArgSlot s) const {
        PyObject* o = slot[s];
        if (o == nullptr) throw type_error(detail::concat(kArgNames[s], ": missing"));
        if (py::isinstance<py::array>(o)) {  // skip NumPy's conversion machinery
            return py::reinterpret_borrow<py::array>(o);
        }
        py::array a = py::array::ensure(o);
        if (!a) {
            PyErr_Clear();
            throw type_error(detail::concat(kArgNames[s], ": expected a NumPy array, got ",
                                            Py_TYPE(o)->tp_name));
        }
        return a;
    }
    // An enum code: out-of-range values become -1, which check_params() refuses.
    int32_t code(ArgSlot s, int32_t fallback) const {
        const long long x = integer(s, fallback);
        return x >= INT32_MIN && x <= INT32_MAX ? static_cast<int32_t>(x) : -1;
    }
    long long integer(ArgSlot s, long long fallback) const {
        if (slot[s] == nullptr) return fallback;
        const long long x = PyLong_AsLongLong(slot[s]);
        if (x == -1 && PyErr_Occurred()) {
            PyErr_Clear();
            if (s == kArg_window_left || s == kArg_window_right) {  // the pair mha_ext takes
                throw type_error(detail::concat(
                    "window: ", s == kArg_window_left ? "left" : "right",
                    " must be an int that fits 64 bits (None or -1: unbounded)"));
            }
            throw type_error(detail::concat(kArgNames[s], ": expected an int"));
        }
        return x;
    }
    bool flag(ArgSlot s) const { return slot[s] != nullptr && PyObject_IsTrue(slot[s]) == 1; }
};

// ------------------------------------------------------------------------------------------
// Fillers: each fills one part of AttentionParams from Python objects, checking only what
// needs them (types, dtypes, ranks, shapes that the struct does not hold, broadcastability).
// Every value invariant is check_params()'s. A new entry point reuses these.

// Arrays a call reads, kept alive (and converted where needed) until the kernel is done.
struct Inputs {
    py::array q = no_array(), k = no_array(), v = no_array();
    py::array wq = no_array(), wk = no_array(), wv = no_array();
    py::array mask = no_array(), bias = no_array(), alibi = no_array();
    py::array key_lengths = no_array();  // the caller's array (for the overlap check of out)
    // key_lengths decide which memory the kernel reads: the kernel reads this private copy,
    // made before check_params() looks at it, so another thread writing the caller's array
    // while the GIL is released can't move the bounds after they were checked.
    std::vector<int64_t> key_lengths_copy;
};

// The q/k/v geometry in the caller's rank and layout.
struct QkvShape {
    int rank = 4;
    bool blhd = false;
    Axes ax{};
    Dims4 Q{}, K{}, V{};
};

// dtypes (one float dtype, native byte order), ranks, the shapes q/k/v must share, pointers
// and strides.
QkvShape fill_qkv(AttentionParams& p, Inputs& in, py::array q, py::array k, py::array v,
                  bool blhd) {
    q = native_byte_order(q);
    k = native_byte_order(k);
    v = native_byte_order(v);
    DType dq_type, dk_type, dv_type;
    const bool q_ok = classify(q, &dq_type), k_ok = classify(k, &dk_type),
               v_ok = classify(v, &dv_type);
    MHA_CHECK_TYPE(q_ok && k_ok && v_ok && dq_type == dk_type && dq_type == dv_type,
                   "q, k, v must share one floating dtype (float32, float64, float16 or "
                   "bfloat16); got q ",
                   dtype_name(q), ", k ", dtype_name(k), ", v ", dtype_name(v));
    p.dtype = dq_type;

    QkvShape s;
    s.blhd = blhd;
    s.rank = static_cast<int>(q.ndim());
    const int rank = s.rank;
    const char* lay = blhd ? "(B, L, H, D)" : "(B, H, L, D)";
    MHA_CHECK(rank >= 2 && rank <= 4, "q: expected 2, 3 or 4 dimensions (", lay,
              " or fewer leading axes), got shape ", shape_str(q));
    MHA_CHECK(k.ndim() == rank, "k: expected ", rank, " dimensions like q ", shape_str(q),
              ", got shape ", shape_str(k), " (q, k and v must all have the same rank)");
    MHA_CHECK(v.ndim() == rank, "v: expected ", rank, " dimensions like q ", shape_str(q),
              ", got shape ", shape_str(v), " (q, k and v must all have the same rank)");
    in.q = fast_path_view(q);
    in.k = fast_path_view(k);
    in.v = fast_path_view(v);
    s.ax = axes_of(rank, blhd);
    s.Q = dims_of(in.q, s.ax);
    s.K = dims_of(in.k, s.ax);
    s.V = dims_of(in.v, s.ax);
    const Dims4 &Q = s.Q, &K = s.K, &V = s.V;
    MHA_CHECK(K.b == Q.b && V.b == Q.b, "k, v: batch size must match q's (", Q.b,
              "); got k ", shape_str(k), ", v ", shape_str(v), " for q ", shape_str(q),
              " in layout ", lay);
    MHA_CHECK(V.h == K.h, "v: number of heads (", V.h, ") must match k's (", K.h, "); got k ",
              shape_str(k), ", v ", shape_str(v), " in layout ", lay);
    MHA_CHECK(V.l == K.l, "v: sequence length (", V.l, ") must match k's (", K.l,
              "); got k ", shape_str(k), ", v ", shape_str(v), " in layout ", lay);

    p.batch = Q.b;
    p.num_heads_q = Q.h;
    p.num_heads_k = K.h;
    p.seqlen_q = Q.l;
    p.seqlen_k = K.l;
    p.head_dim = Q.d;
    p.head_dim_k = K.d;
    p.head_dim_v = V.d;
    p.q = in.q.data();
    p.k = in.k.data();
    p.v = in.v.data();
    p.q_stride_batch = Q.sb, p.q_stride_head = Q.sh, p.q_stride_seq = Q.sl;
    p.k_stride_batch = K.sb, p.k_stride_head = K.sh, p.k_stride_seq = K.sl;
    p.v_stride_batch = V.sb, p.v_stride_head = V.sh, p.v_stride_seq = V.sl;
    return s;
}

// The score function's parameters (as accum_t arrays) and the scale (None -> its default).
void fill_score(AttentionParams& p, Inputs& in, const QkvShape& s, long long kind,
                py::handle wq, py::handle wk, py::handle w, py::handle scale) {
    const bool dbl = dtype_accumulates_in_double(p.dtype);
    const int64_t D = s.Q.d, Dk = s.K.d;
    switch (static_cast<ScoreKind>(kind)) {
        case ScoreKind::kScaledDot:
        case ScoreKind::kDot:
            p.score = Score::kDot;
            break;
        case ScoreKind::kGeneral:
            p.score = Score::kGeneral;
            in.wq = as_accum(wq, dbl, "General.W");
            MHA_CHECK(in.wq.ndim() == 2 && in.wq.shape(0) == D && in.wq.shape(1) == Dk,
                      "General.W: expected shape (D, Dk) = (", D, ", ", Dk, "), got ",
                      shape_str(in.wq));
            p.score_wq = in.wq.data();
            break;
        case ScoreKind::kAdditive: {
            p.score = Score::kAdditive;
            in.wq = as_accum(wq, dbl, "W_q");
            in.wk = as_accum(wk, dbl, "W_k");
            in.wv = as_accum(w, dbl, "w");
            MHA_CHECK(in.wv.ndim() == 1, "w: expected a vector of shape (A,) with A >= 1, got ",
                      shape_str(in.wv));
            const int64_t na = in.wv.shape(0);
            MHA_CHECK(in.wq.ndim() == 2 && in.wq.shape(0) == D && in.wq.shape(1) == na,
                      "W_q: expected shape (D, A) = (", D, ", ", na, "), got ", shape_str(in.wq));
            MHA_CHECK(in.wk.ndim() == 2 && in.wk.shape(0) == Dk && in.wk.shape(1) == na,
                      "W_k: expected shape (Dk, A) = (", Dk, ", ", na, "), got ",
                      shape_str(in.wk));
            p.score_dim = na;
            p.score_wq = in.wq.data();
            p.score_wk = in.wk.data();
            p.score_w = in.wv.data();
            break;
        }
        default:
            throw std::invalid_argument(detail::concat("score: unknown score kind ", kind));
    }
    if (scale.is_none()) {
        p.scale = static_cast<ScoreKind>(kind) == ScoreKind::kScaledDot
                      ? 1.0 / std::sqrt(static_cast<double>(D))
                      : 1.0;
    } else {
        try {
            p.scale = scale.cast<double>();
        } catch (const py::cast_error&) {
            throw type_error(detail::concat(
                "scale: expected a float or None, got ",
                std::string(py::str(py::type::of(scale).attr("__name__")))));
        }
    }
}

// The bool mask and the float bias (broadcast through zero strides to (B, Hq, Lq, Lk)) and a
// snapshot of key_lengths.
void fill_masks(AttentionParams& p, Inputs& in, const QkvShape& s, py::handle mask,
                py::handle bias, py::handle key_lengths) {
    const bool dbl = dtype_accumulates_in_double(p.dtype);
    const int64_t target[4] = {s.Q.b, s.Q.h, s.Q.l, s.K.l};
    if (!mask.is_none()) {
        in.mask = py::array::ensure(mask);
        MHA_CHECK_TYPE(in.mask && in.mask.dtype().kind() == 'b',
                       "mask: expected a bool array (True = may attend), got dtype ",
                       in.mask ? dtype_name(in.mask) : std::string("object"),
                       ". For an additive float mask (0 / -inf) pass it as bias=...; for a 0/1 "
                       "mask where 1 means 'hidden' (the TensorFlow tutorial convention) pass "
                       "mask=(m == 0)");
        int64_t st[4];
        broadcast_strides(in.mask, "mask", target, st);
        p.mask = static_cast<const uint8_t*>(in.mask.data());
        p.mask_stride_batch = st[0], p.mask_stride_head = st[1], p.mask_stride_q = st[2],
        p.mask_stride_k = st[3];
    }
    if (!bias.is_none()) {
        py::array raw = py::array::ensure(bias);
        MHA_CHECK_TYPE(raw && (raw.dtype().kind() == 'f' || raw.dtype().kind() == 'i' ||
                               raw.dtype().kind() == 'u' || is_bfloat16(raw.dtype())),
                       "bias: expected a float array added to the scores, got dtype ",
                       raw ? dtype_name(raw) : std::string("object"),
                       raw && raw.dtype().kind() == 'b' ? " (use mask= for a bool mask)" : "");
        const bool same = raw.dtype().kind() == 'f' && raw.itemsize() == (dbl ? 8 : 4) &&
                          native_order(raw.dtype());
        in.bias = same ? fast_path_view(raw) : as_accum(raw, dbl, "bias");
        int64_t st[4];
        broadcast_strides(in.bias, "bias", target, st);
        p.bias = in.bias.data();
        p.bias_stride_batch = st[0], p.bias_stride_head = st[1], p.bias_stride_q = st[2],
        p.bias_stride_k = st[3];
    }
    if (!key_lengths.is_none()) {
        py::array raw = py::array::ensure(key_lengths);
        MHA_CHECK_TYPE(raw && (raw.dtype().kind() == 'i' || raw.dtype().kind() == 'u'),
                       "key_lengths: expected an integer array of shape (B,), got dtype ",
                       raw ? dtype_name(raw) : std::string("object"));
        MHA_CHECK(raw.ndim() == 1 && raw.shape(0) == s.Q.b,
                  "key_lengths: expected shape (B,) = (", s.Q.b, ",), got ", shape_str(raw));
        // uint64 values above INT64_MAX do not convert to int64 (they would wrap).
        if (raw.dtype().kind() == 'u' && raw.itemsize() == 8) {
            const py::array_t<uint64_t> u =
                py::array_t<uint64_t, py::array::forcecast>::ensure(raw);
            for (py::ssize_t b = 0; b < u.shape(0); ++b) {
                MHA_CHECK(u.at(b) <= static_cast<uint64_t>(INT64_MAX), "key_lengths: entry ", b,
                          " is ", u.at(b), ", expected 0 <= key_lengths[b] <= Lk = ", s.K.l);
            }
        }
        const py::array conv =
            py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(raw);
        const int64_t* src = static_cast<const int64_t*>(conv.data());
        in.key_lengths_copy.assign(src, src + s.Q.b);
        in.key_lengths = raw;
        p.key_lengths = in.key_lengths_copy.data();
    }
}

// ALiBi slopes (Hq,) or (B, Hq) as accum_t, and the softcap (None -> 0, off).
void fill_alibi_softcap(AttentionParams& p, Inputs& in, const QkvShape& s, py::handle alibi,
                        py::handle softcap) {
    if (!alibi.is_none()) {
        py::array raw = py::array::ensure(alibi);
        MHA_CHECK_TYPE(raw && (raw.dtype().kind() == 'f' || raw.dtype().kind() == 'i' ||
                               raw.dtype().kind() == 'u' || is_bfloat16(raw.dtype())),
                       "alibi_slopes: expected a float array of shape (Hq,) or (B, Hq), got "
                       "dtype ",
                       raw ? dtype_name(raw) : std::string("object"));
        const int64_t B = s.Q.b, H = s.Q.h;
        const bool one = raw.ndim() == 1 && raw.shape(0) == H;
        const bool per_batch = raw.ndim() == 2 && raw.shape(0) == B && raw.shape(1) == H;
        MHA_CHECK(one || per_batch, "alibi_slopes: expected shape (Hq,) = (", H,
                  ",) or (B, Hq) = (", B, ", ", H, "), got ", shape_str(raw));
        in.alibi = as_accum(raw, dtype_accumulates_in_double(p.dtype), "alibi_slopes");
        p.alibi_slopes = in.alibi.data();
        p.alibi_stride_batch = per_batch && B > 1 ? H : 0;
    }
    if (!softcap.is_none()) {
        double cap;
        try {
            MHA_CHECK_TYPE(!PyBool_Check(softcap.ptr()), "softcap: expected a float > 0 or None");
            cap = softcap.cast<double>();
        } catch (const py::cast_error&) {
            throw type_error(detail::concat(
                "softcap: expected a float > 0 or None, got ",
                std::string(py::str(py::type::of(softcap).attr("__name__")))));
        }
        // 0 would read as "off" in the struct: refuse it here, in check_params' words.
        MHA_CHECK(cap != 0, "softcap: expected a finite float > 0 (or None), got ", cap);
        p.softcap = cap;
    }
}

// The output array: new, or the caller's `out` (checked: dtype, shape, layout, no overlap).
py::array fill_out(AttentionParams& p, const Inputs& in, const QkvShape& s, py::handle out) {
    int64_t out_shape[4];
    shape_into(s.rank, s.blhd, s.Q.b, s.Q.h, s.Q.l, s.V.d, out_shape);
    py::array result = no_array();
    if (out.is_none()) {
        result = new_c_array(in.q.dtype(), s.rank, out_shape);
    } else {
        MHA_CHECK_TYPE(py::isinstance<py::array>(out), "out: expected a NumPy array or None");
        result = py::reinterpret_borrow<py::array>(out);
        const py::dtype want = in.q.dtype();
        const py::dtype got = result.dtype();
        if (!(got.is(want) || got.equal(want))) {
            // Same type in the other byte order: say so (both are named "float32").
            const bool swapped = got.kind() == want.kind() && got.itemsize() == want.itemsize() &&
                                 !native_order(got);
            if (swapped) {
                throw type_error(detail::concat(
                    "out: expected dtype ", dtype_name(in.q), " in native byte order, got a "
                    "byte-swapped ", dtype_name(result), " ('",
                    std::string(py::str(got.attr("str"))),
                    "'); the kernel writes native-order values, so pass e.g. np.empty(shape, "
                    "np.", dtype_name(in.q), ")"));
            }
            throw type_error(detail::concat("out: expected dtype ", dtype_name(in.q), ", got ",
                                            dtype_name(result)));
        }
        bool shape_ok = result.ndim() == s.rank;
        for (int i = 0; shape_ok && i < s.rank; ++i) shape_ok = result.shape(i) == out_shape[i];
        MHA_CHECK(shape_ok, "out: expected shape ",
                  shape_str(std::vector<int64_t>(out_shape, out_shape + s.rank)), ", got ",
                  shape_str(result));
        MHA_CHECK(result.flags() & py::array::c_style, "out: must be C-contiguous");
        MHA_CHECK(result.writeable(), "out: must be writeable");
        MHA_CHECK(!overlaps(result, in.q) && !overlaps(result, in.k) && !overlaps(result, in.v),
                  "out: must not share memory with q, k or v");
        for (const py::array* a :
             {&in.mask, &in.bias, &in.key_lengths, &in.wq, &in.wk, &in.wv, &in.alibi}) {
            MHA_CHECK(!*a || !overlaps(result, *a),
                      "out: must not share memory with mask, bias, key_lengths or score weights");
        }
    }
    const Dims4 O = dims_of(result, s.ax);
    p.out = result.mutable_data();
    // Size-1 axes get stride 0: with one row per axis it is never used.
    p.out_stride_batch = O.sb, p.out_stride_head = O.sh, p.out_stride_seq = O.sl;
    return result;
}

// The optional weights (B, Hq, Lq, Lk) and lse (B, Hq, Lq), in accum_t, dropping the leading
// axes the inputs lack.
void fill_extras(AttentionParams& p, const QkvShape& s, bool return_weights, bool return_lse,
                 py::array* weights, py::array* lse) {
    if (!return_weights && !return_lse) return;
    const py::dtype acc_dtype = dtype_accumulates_in_double(p.dtype) ? py::dtype::of<double>()
                                                                     : py::dtype::of<float>();
    const std::vector<int64_t> full = {s.Q.b, s.Q.h, s.Q.l, s.K.l};
    const auto first = full.begin() + (4 - s.rank);
    if (return_weights) {
        *weights = py::array(acc_dtype, std::vector<int64_t>(first, full.end()));
        p.weights = weights->mutable_data();
    }
    if (return_lse) {
        *lse = py::array(acc_dtype, std::vector<int64_t>(first, full.end() - 1));
        p.lse = lse->mutable_data();
    }
}

// Runs the dispatcher with the GIL released, polling Ctrl-C on long calls from the main
// thread (> ~1 ms of work). Python errors raised by a signal handler propagate.
void run_released(AttentionParams& p) {
    InterruptPoll poll;
    const double work = 2.0 * static_cast<double>(p.batch) * p.num_heads_q * p.seqlen_q *
                        p.seqlen_k * (p.head_dim_k + p.head_dim_v);
    if (work > 1e7 && PyThread_get_thread_ident() == main_thread_ident()) {
        p.interrupt_check = &poll_python_signals;
        p.interrupt_ctx = &poll;
    }
    bool stopped = false;
    {
        py::gil_scoped_release release;
        try {
            attention_forward(p);
        } catch (const interrupted&) {
            stopped = true;
        }
    }
    if (stopped) {
        if (PyErr_Occurred() != nullptr) throw py::error_already_set();
        throw std::runtime_error("attention: interrupted");
    }
}

py::object attention(const AttentionArgs& a) {
    AttentionParams p{};
    Inputs in;
    const QkvShape s = fill_qkv(p, in, a.array(kArg_q), a.array(kArg_k), a.array(kArg_v),
                                a.flag(kArg_blhd));
    fill_score(p, in, s, a.integer(kArg_score, static_cast<long long>(ScoreKind::kScaledDot)),
               a.obj(kArg_score_wq), a.obj(kArg_score_wk), a.obj(kArg_score_w),
               a.obj(kArg_scale));
    fill_masks(p, in, s, a.obj(kArg_mask), a.obj(kArg_bias), a.obj(kArg_key_lengths));
    fill_alibi_softcap(p, in, s, a.obj(kArg_alibi_slopes), a.obj(kArg_softcap));
    p.causal = static_cast<Causal>(a.code(kArg_causal, static_cast<int32_t>(Causal::kNone)));
    p.window_left = a.integer(kArg_window_left, -1);
    p.window_right = a.integer(kArg_window_right, -1);
    p.device = static_cast<Device>(a.code(kArg_device, static_cast<int32_t>(Device::kCpu)));
    p.num_threads = parse_num_threads(a.obj(kArg_num_threads));
    p.naive = a.flag(kArg_naive);
    py::array result = fill_out(p, in, s, a.obj(kArg_out));
    const bool return_weights = a.flag(kArg_return_weights);
    const bool return_lse = a.flag(kArg_return_lse);
    py::array weights = no_array(), lse = no_array();
    fill_extras(p, s, return_weights, return_lse, &weights, &lse);

    run_released(p);  // check_params(), then the backend

    if (!return_weights && !return_lse) return std::move(result);
    py::tuple t(1 + (return_weights ? 1 : 0) + (return_lse ? 1 : 0));
    size_t i = 0;
    t[i++] = result;
    if (return_weights) t[i++] = weights;
    if (return_lse) t[i++] = lse;
    return std::move(t);
}

// ------------------------------------------------------------------------------------------
// attention_varlen and attention_kvcache (SPEC 6.2, 6.3): the same fillers, plus snapshots of
// the integer arrays that decide which memory the kernel reads (cu_seqlens, cache_seqlens,
// block_table): copied before any check, so another thread writing the caller's array while
// the GIL is released cannot move what was checked.

// A 1-D int32 / int64 array as int64 values (a copy). expected < 0: any length >= 1.
std::vector<int64_t> int_snapshot(py::handle obj, const char* name, const char* what,
                                  int64_t expected) {
    MHA_CHECK_TYPE(!obj.is_none(), name, ": expected an int32 or int64 array ", what);
    py::array raw = py::array::ensure(obj);
    MHA_CHECK_TYPE(raw && raw.dtype().kind() == 'i' &&
                       (raw.itemsize() == 4 || raw.itemsize() == 8),
                   name, ": expected an int32 or int64 array ", what, ", got dtype ",
                   raw ? dtype_name(raw) : std::string(py::str(py::type::of(obj).attr("__name__"))));
    MHA_CHECK(raw.ndim() == 1 && (expected < 0 ? raw.shape(0) >= 1 : raw.shape(0) == expected),
              name, ": expected shape ", what, ", got ", shape_str(raw));
    const py::array conv = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(
        native_byte_order(raw));
    const int64_t* src = static_cast<const int64_t*>(conv.data());
    return std::vector<int64_t>(src, src + raw.shape(0));
}

// Runs `call` with the GIL released, polling Ctrl-C from the main thread on long calls.
template <typename Call>
void run_released_call(AttentionParams& p, double work, const Call& call) {
    InterruptPoll poll;
    if (work > 1e7 && PyThread_get_thread_ident() == main_thread_ident()) {
        p.interrupt_check = &poll_python_signals;
        p.interrupt_ctx = &poll;
    }
    bool stopped = false;
    {
        py::gil_scoped_release release;
        try {
            call();
        } catch (const interrupted&) {
            stopped = true;
        }
    }
    if (stopped) {
        if (PyErr_Occurred() != nullptr) throw py::error_already_set();
        throw std::runtime_error("attention: interrupted");
    }
}

py::array lse_array(const AttentionParams& p, std::vector<int64_t> shape) {
    py::array lse(dtype_accumulates_in_double(p.dtype) ? py::dtype::of<double>()
                                                       : py::dtype::of<float>(),
                  shape);
    return lse;
}

py::object attention_varlen(py::handle q, py::handle k, py::handle v, py::handle cu_q,
                            py::handle cu_k, int causal, int64_t window_left,
                            int64_t window_right, py::handle scale, long long score,
                            py::handle wq, py::handle wk, py::handle w, py::handle alibi,
                            py::handle softcap, bool return_lse, int device,
                            py::handle num_threads, py::handle out) {
    // Snapshots first: nothing below reads the caller's cu_seqlens again.
    std::vector<int64_t> cq = int_snapshot(cu_q, "cu_seqlens_q", "(B + 1,)", -1);
    std::vector<int64_t> ck = int_snapshot(cu_k, "cu_seqlens_k", "(B + 1,)", -1);
    MHA_CHECK(ck.size() == cq.size(), "cu_seqlens_k: expected shape (B + 1,) = (", cq.size(),
              ",) like cu_seqlens_q, got (", ck.size(), ",)");
    py::array qa = py::array::ensure(q), ka = py::array::ensure(k), va = py::array::ensure(v);
    MHA_CHECK_TYPE(qa && ka && va, "q, k, v: expected NumPy arrays");
    MHA_CHECK(qa.ndim() == 3, "q: expected 3 dimensions (total_q, Hq, D), got shape ",
              shape_str(qa));
    MHA_CHECK(ka.ndim() == 3, "k: expected 3 dimensions (total_k, Hk, D), got shape ",
              shape_str(ka));
    MHA_CHECK(va.ndim() == 3, "v: expected 3 dimensions (total_k, Hk, Dv), got shape ",
              shape_str(va));
    VarlenParams p{};
    Inputs in;
    QkvShape s = fill_qkv(p, in, qa, ka, va, /*blhd=*/true);
    const int64_t nseq = static_cast<int64_t>(cq.size()) - 1;
    fill_score(p, in, s, score, wq, wk, w, scale);
    QkvShape per_seq = s;  // ALiBi's (B, Hq) counts sequences
    per_seq.Q.b = nseq;
    fill_alibi_softcap(p, in, per_seq, alibi, softcap);
    p.causal = static_cast<Causal>(causal);
    p.window_left = window_left;
    p.window_right = window_right;
    p.device = static_cast<Device>(device);
    p.num_threads = parse_num_threads(num_threads);
    py::array result = fill_out(p, in, s, out);
    p.total_q = s.Q.l;
    p.total_k = s.K.l;
    int64_t longest_q = 0, longest_k = 0;
    for (int64_t b = 0; b < nseq; ++b) {
        longest_q = std::max(longest_q, cq[b + 1] - cq[b]);
        longest_k = std::max(longest_k, ck[b + 1] - ck[b]);
    }
    p.batch = nseq;
    p.seqlen_q = longest_q;
    p.seqlen_k = longest_k;
    p.q_stride_batch = p.k_stride_batch = p.v_stride_batch = p.out_stride_batch = 0;
    p.cu_seqlens_q = cq.data();
    p.cu_seqlens_k = ck.data();
    py::array lse = no_array();
    if (return_lse) {
        lse = lse_array(p, {s.Q.h, s.Q.l});
        p.lse = lse.mutable_data();
        p.lse_stride_head = s.Q.l;
    }
    double work = 0;
    for (int64_t b = 0; b < nseq; ++b) {
        work += 2.0 * static_cast<double>(cq[b + 1] - cq[b]) * static_cast<double>(ck[b + 1] - ck[b]);
    }
    work *= static_cast<double>(p.num_heads_q) * (p.head_dim_k + p.head_dim_v);
    run_released_call(p, work, [&] { attention_varlen_forward(p); });
    if (!return_lse) return std::move(result);
    return py::make_tuple(result, lse);
}

py::object attention_kvcache(py::handle q, py::handle k_cache, py::handle v_cache,
                             py::handle cache_seqlens, py::handle block_table, int causal,
                             int64_t window_left, int64_t window_right, py::handle scale,
                             py::handle alibi, py::handle softcap, bool return_lse,
                             py::handle num_splits, int device, py::handle num_threads) {
    py::array qa = py::array::ensure(q), ka = py::array::ensure(k_cache),
              va = py::array::ensure(v_cache);
    MHA_CHECK_TYPE(qa && ka && va, "q, k_cache, v_cache: expected NumPy arrays");
    MHA_CHECK(qa.ndim() == 4, "q: expected 4 dimensions (B, Lq, Hq, D), got shape ",
              shape_str(qa));
    const bool paged = !block_table.is_none();
    const char* kshape = paged ? "(num_blocks, block_size, Hk, D)" : "(B, Lmax, Hk, D)";
    MHA_CHECK(ka.ndim() == 4, "k_cache: expected 4 dimensions ", kshape, ", got shape ",
              shape_str(ka));
    MHA_CHECK(va.ndim() == 4, "v_cache: expected 4 dimensions ", kshape, ", got shape ",
              shape_str(va));
    const int64_t B = qa.shape(0);
    std::vector<int64_t> seqlens = int_snapshot(cache_seqlens, "cache_seqlens", "(B,)", B);
    std::vector<int32_t> table;
    int64_t max_blocks = 0;
    if (paged) {  // the snapshot comes before any check
        py::array raw = py::array::ensure(block_table);
        MHA_CHECK_TYPE(raw && raw.dtype().kind() == 'i' && raw.itemsize() == 4,
                       "block_table: expected an int32 array (B, max_blocks), got dtype ",
                       raw ? dtype_name(raw) : std::string("object"));
        MHA_CHECK(raw.ndim() == 2 && raw.shape(0) == B,
                  "block_table: expected shape (B, max_blocks) with B = ", B, ", got ",
                  shape_str(raw));
        const py::array conv =
            py::array_t<int32_t, py::array::c_style | py::array::forcecast>::ensure(
                native_byte_order(raw));
        const int32_t* src = static_cast<const int32_t*>(conv.data());
        table.assign(src, src + raw.size());
        max_blocks = raw.shape(1);
    }
    KvcacheParams p{};
    Inputs in;
    QkvShape s;
    if (!paged) {
        s = fill_qkv(p, in, qa, ka, va, /*blhd=*/true);
    } else {
        s = fill_qkv(p, in, qa, qa, qa, /*blhd=*/true);  // q's geometry; the pools below
        py::array kn = native_byte_order(ka), vn = native_byte_order(va);
        DType kt, vt;
        MHA_CHECK_TYPE(classify(kn, &kt) && classify(vn, &vt) && kt == p.dtype && vt == p.dtype,
                       "q, k_cache, v_cache must share one floating dtype; got q ",
                       dtype_name(qa), ", k_cache ", dtype_name(ka), ", v_cache ",
                       dtype_name(va));
        for (int ax = 0; ax < 3; ++ax) {
            MHA_CHECK(vn.shape(ax) == kn.shape(ax), "v_cache: shape ", shape_str(vn),
                      " must match k_cache's ", shape_str(kn), " but for the last axis");
        }
        in.k = fast_path_view(kn);
        in.v = fast_path_view(vn);
        const py::ssize_t item = in.k.itemsize();
        p.k = in.k.data();
        p.v = in.v.data();
        p.num_heads_k = in.k.shape(2);
        p.head_dim_k = in.k.shape(3);
        p.head_dim_v = in.v.shape(3);
        p.k_stride_block = elem_stride(in.k, 0, item);
        p.k_stride_seq = elem_stride(in.k, 1, item);
        p.k_stride_head = elem_stride(in.k, 2, item);
        p.v_stride_block = elem_stride(in.v, 0, item);
        p.v_stride_seq = elem_stride(in.v, 1, item);
        p.v_stride_head = elem_stride(in.v, 2, item);
        p.k_stride_batch = p.v_stride_batch = 0;
        p.num_blocks = in.k.shape(0);
        p.block_size = in.k.shape(1);
        p.max_blocks = max_blocks;
        p.block_table_stride = max_blocks;
        p.block_table = table.data();
        p.seqlen_k = max_blocks * p.block_size;
        s.K.h = p.num_heads_k, s.K.d = p.head_dim_k, s.K.l = p.seqlen_k;
        s.V.h = p.num_heads_k, s.V.d = p.head_dim_v, s.V.l = p.seqlen_k;
    }
    fill_score(p, in, s, static_cast<long long>(ScoreKind::kScaledDot), py::none(), py::none(),
               py::none(), scale);
    fill_alibi_softcap(p, in, s, alibi, softcap);
    in.key_lengths_copy = std::move(seqlens);
    p.key_lengths = in.key_lengths_copy.data();
    p.causal = static_cast<Causal>(causal);
    p.window_left = window_left;
    p.window_right = window_right;
    p.device = static_cast<Device>(device);
    p.num_threads = parse_num_threads(num_threads);
    if (!num_splits.is_none()) {
        MHA_CHECK_TYPE(!PyBool_Check(num_splits.ptr()) && PyLong_Check(num_splits.ptr()),
                       "num_splits: expected None or an int >= 1");
        const long long n = num_splits.cast<long long>();
        MHA_CHECK(n >= 1, "num_splits: expected None or an int >= 1, got ", n);
        p.num_splits = n;
    }
    py::array result = fill_out(p, in, s, py::none());
    py::array lse = no_array();
    if (return_lse) {
        lse = lse_array(p, {s.Q.b, s.Q.h, s.Q.l});
        p.lse = lse.mutable_data();
    }
    double work = 0;
    for (int64_t b = 0; b < B; ++b) work += static_cast<double>(p.key_lengths[b]);
    work *= 2.0 * static_cast<double>(p.num_heads_q) * p.seqlen_q * (p.head_dim_k + p.head_dim_v);
    run_released_call(p, work, [&] { attention_kvcache_forward(p); });
    if (!return_lse) return std::move(result);
    return py::make_tuple(result, lse);
}

// ------------------------------------------------------------------------------------------
// attention_backward (SPEC 6.4): the forward's fillers, then out / lse / dout checked against
// the q/k/v geometry (a mismatch is an error, never garbage), then the gradients.

// `out` or `dout`: the forward output's shape (caller's rank and layout) and q's dtype.
py::array forward_shaped(const Inputs& in, const QkvShape& s, py::handle obj, const char* name) {
    py::array a = py::array::ensure(obj);
    MHA_CHECK_TYPE(a, name, ": expected a NumPy array");
    a = native_byte_order(a);
    MHA_CHECK_TYPE(a.dtype().equal(in.q.dtype()), name, ": expected dtype ", dtype_name(in.q),
                   " like q, got ", dtype_name(a));
    const std::vector<int64_t> want = shape_of(s.rank, s.blhd, s.Q.b, s.Q.h, s.Q.l, s.V.d);
    const std::vector<int64_t> got(a.shape(), a.shape() + a.ndim());
    MHA_CHECK(got == want, name, ": expected shape ", shape_str(want),
              " (the forward output of these q, k, v), got ", shape_str(a));
    return fast_path_view(a);
}

// A new gradient array shaped like `like` (caller's rank and layout, q's dtype).
py::array grad_like(const py::array& like, const QkvShape& s, const Dims4& d) {
    return py::array(like.dtype(), shape_of(s.rank, s.blhd, d.b, d.h, d.l, d.d));
}

void run_backward_released(BackwardParams& p) {
    InterruptPoll poll;
    const double work = 4.0 * static_cast<double>(p.batch) * p.num_heads_q * p.seqlen_q *
                        p.seqlen_k * (p.head_dim_k + p.head_dim_v);
    if (work > 1e7 && PyThread_get_thread_ident() == main_thread_ident()) {
        p.interrupt_check = &poll_python_signals;
        p.interrupt_ctx = &poll;
    }
    bool stopped = false;
    {
        py::gil_scoped_release release;
        try {
            attention_backward(p);
        } catch (const interrupted&) {
            stopped = true;
        }
    }
    if (stopped) {
        if (PyErr_Occurred() != nullptr) throw py::error_already_set();
        throw std::runtime_error("attention_backward: interrupted");
    }
}

// -> (dq, dk, dv, dscore, dbias): dscore a tuple of parameter gradients (General: (dW,),
// additive: (dW_q, dW_k, dw)) or None, dbias an array or None.
py::tuple attention_backward_py(py::object dout, py::object q, py::object k, py::object v,
                                py::object out, py::object lse, py::object mask,
                                py::object bias, int causal, long long window_left,
                                long long window_right, py::object key_lengths,
                                py::object scale, long long score, py::object score_wq,
                                py::object score_wk, py::object score_w, py::object alibi,
                                py::object softcap, bool blhd, int device,
                                py::object num_threads, bool return_dbias) {
    BackwardParams p{};
    Inputs in;
    auto as_array = [](py::object o, const char* name) {
        py::array a = py::array::ensure(o);
        if (!a) {
            PyErr_Clear();
            throw type_error(detail::concat(name, ": expected a NumPy array"));
        }
        return a;
    };
    const QkvShape s = fill_qkv(p, in, as_array(q, "q"), as_array(k, "k"), as_array(v, "v"), blhd);
    fill_score(p, in, s, score, score_wq, score_wk, score_w, scale);
    fill_masks(p, in, s, mask, bias, key_lengths);
    fill_alibi_softcap(p, in, s, alibi, softcap);
    p.causal = static_cast<Causal>(causal);
    p.window_left = window_left;
    p.window_right = window_right;
    p.device = static_cast<Device>(device);
    p.num_threads = parse_num_threads(num_threads);

    const py::array o = forward_shaped(in, s, out, "out");
    const py::array g = forward_shaped(in, s, dout, "dout");
    const Dims4 O = dims_of(o, s.ax), G = dims_of(g, s.ax);
    p.out = const_cast<void*>(o.data());  // read only: the forward's output
    p.out_stride_batch = O.sb, p.out_stride_head = O.sh, p.out_stride_seq = O.sl;
    p.dout = g.data();
    p.dout_stride_batch = G.sb, p.dout_stride_head = G.sh, p.dout_stride_seq = G.sl;

    const bool dbl = dtype_accumulates_in_double(p.dtype);
    {
        py::array raw = py::array::ensure(lse);
        MHA_CHECK_TYPE(raw && raw.dtype().kind() == 'f', "lse: expected a float array, got ",
                       raw ? dtype_name(raw) : std::string("a non-array"));
        const std::vector<int64_t> full = {s.Q.b, s.Q.h, s.Q.l};
        const std::vector<int64_t> want(full.begin() + (4 - s.rank), full.end());
        const std::vector<int64_t> got(raw.shape(), raw.shape() + raw.ndim());
        MHA_CHECK(got == want, "lse: expected shape ", shape_str(want),
                  " (the forward's lse of these q, k, v), got ", shape_str(raw));
        py::array conv = as_accum(raw, dbl, "lse");
        conv = py::array::ensure(conv, py::array::c_style);
        p.lse = const_cast<void*>(conv.data());
        lse = conv;  // keep alive
    }

    py::array dq = grad_like(in.q, s, s.Q), dk = grad_like(in.k, s, s.K),
              dv = grad_like(in.v, s, s.V);
    const Dims4 DQ = dims_of(dq, s.ax), DK = dims_of(dk, s.ax), DV = dims_of(dv, s.ax);
    p.dq = dq.mutable_data();
    p.dk = dk.mutable_data();
    p.dv = dv.mutable_data();
    p.dq_stride_batch = DQ.sb, p.dq_stride_head = DQ.sh, p.dq_stride_seq = DQ.sl;
    p.dk_stride_batch = DK.sb, p.dk_stride_head = DK.sh, p.dk_stride_seq = DK.sl;
    p.dv_stride_batch = DV.sb, p.dv_stride_head = DV.sh, p.dv_stride_seq = DV.sl;

    const py::dtype acc_dtype = dbl ? py::dtype::of<double>() : py::dtype::of<float>();
    py::object dbias_obj = py::none();
    if (return_dbias) {
        MHA_CHECK(in.bias, "return_dbias: True needs a bias (there is nothing to differentiate)");
        const std::vector<int64_t> shape(in.bias.shape(), in.bias.shape() + in.bias.ndim());
        py::array dbias = py::array::ensure(py::module_::import("numpy").attr("zeros")(
            py::tuple(py::cast(shape)), acc_dtype));
        const int64_t target[4] = {s.Q.b, s.Q.h, s.Q.l, s.K.l};
        int64_t st[4];
        broadcast_strides(dbias, "bias", target, st);
        p.dbias = dbias.mutable_data();
        p.dbias_stride_batch = st[0], p.dbias_stride_head = st[1], p.dbias_stride_q = st[2],
        p.dbias_stride_k = st[3];
        dbias_obj = dbias;
    }
    py::object dscore = py::none();
    if (p.score == Score::kGeneral) {
        py::array dw(acc_dtype, std::vector<int64_t>{s.Q.d, s.K.d});
        p.dscore_wq = dw.mutable_data();
        dscore = py::make_tuple(dw);
    } else if (p.score == Score::kAdditive) {
        py::array dwq(acc_dtype, std::vector<int64_t>{s.Q.d, p.score_dim});
        py::array dwk(acc_dtype, std::vector<int64_t>{s.K.d, p.score_dim});
        py::array dw(acc_dtype, std::vector<int64_t>{p.score_dim});
        p.dscore_wq = dwq.mutable_data();
        p.dscore_wk = dwk.mutable_data();
        p.dscore_w = dw.mutable_data();
        dscore = py::make_tuple(dwq, dwk, dw);
    }

    run_backward_released(p);  // check_backward_params(), then the CPU kernel
    return py::make_tuple(dq, dk, dv, dscore, dbias_obj);
}

// attention() as a METH_FASTCALL | METH_KEYWORDS function: the arguments arrive as a C array,
// so a tiny call skips pybind11's generic dispatcher (an argument vector and one caster per
// argument, about a microsecond for 21 arguments). Keywords are matched against
// MHA_ATTENTION_ARGS once per call site: CPython passes the same kwnames tuple (a constant of
// the caller's code object) every time, so its slot map is cached. C++ exceptions are mapped
// as pybind11 maps them.
PyObject* g_arg_names[kNumArgs] = {};  // interned names of MHA_ATTENTION_ARGS

struct KwnamesCache {
    PyObject* kwnames = nullptr;  // a strong reference to the tuple the map belongs to
    int8_t slot[kNumArgs] = {};
};
KwnamesCache g_kw_cache;  // guarded by the GIL

int arg_slot(PyObject* name) {
    for (int i = 0; i < kNumArgs; ++i) {
        if (name == g_arg_names[i]) return i;
    }
    for (int i = 0; i < kNumArgs; ++i) {  // a name that is not interned
        if (PyUnicode_Compare(name, g_arg_names[i]) == 0) return i;
    }
    if (PyErr_Occurred()) PyErr_Clear();
    return -1;
}

const int8_t* kw_slots(PyObject* kwnames) {
    const Py_ssize_t nkw = PyTuple_GET_SIZE(kwnames);
    if (kwnames == g_kw_cache.kwnames) return g_kw_cache.slot;
    if (nkw > kNumArgs) throw type_error("_core.attention: too many keyword arguments");
    int8_t slot[kNumArgs];
    for (Py_ssize_t i = 0; i < nkw; ++i) {
        PyObject* name = PyTuple_GET_ITEM(kwnames, i);
        const int s = arg_slot(name);
        if (s < 0) {
            throw type_error(detail::concat("_core.attention: unexpected keyword argument '",
                                            std::string(py::str(name)), "'"));
        }
        slot[i] = static_cast<int8_t>(s);
    }
    Py_XDECREF(g_kw_cache.kwnames);
    Py_INCREF(kwnames);
    g_kw_cache.kwnames = kwnames;
    std::memcpy(g_kw_cache.slot, slot, sizeof(slot));
    return g_kw_cache.slot;
}

PyObject* attention_fastcall(PyObject*, PyObject* const* args, size_t nargsf,
                             PyObject* kwnames) {
    try {
        const Py_ssize_t npos = PyVectorcall_NARGS(nargsf);
        if (npos > kNumArgs) {
            throw type_error(detail::concat("_core.attention: at most ", int(kNumArgs),
                                            " arguments, got ", npos));
        }
        AttentionArgs a;
        for (Py_ssize_t i = 0; i < npos; ++i) a.slot[i] = args[i];
        if (kwnames != nullptr) {
            const Py_ssize_t nkw = PyTuple_GET_SIZE(kwnames);
            const int8_t* slot = kw_slots(kwnames);
            for (Py_ssize_t i = 0; i < nkw; ++i) {
                if (a.slot[slot[i]] != nullptr) {
                    throw type_error(detail::concat("_core.attention: argument '",
                                                    kArgNames[slot[i]], "' given twice"));
                }
                a.slot[slot[i]] = args[npos + i];
            }
        }
        return attention(a).release().ptr();
    } catch (py::error_already_set& e) {
        e.restore();
    } catch (const type_error& e) {
        PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const std::invalid_argument& e) {
        PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const out_of_memory& e) {
        PyErr_SetString(PyExc_MemoryError, e.what());
    } catch (const std::bad_alloc&) {
        PyErr_SetString(PyExc_MemoryError, "attention: out of memory");
    } catch (const std::exception& e) {
        PyErr_SetString(PyExc_RuntimeError, e.what());
    }
    return nullptr;
}

PyMethodDef attention_def = {
    "attention", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&attention_fastcall)),
    METH_FASTCALL | METH_KEYWORDS,
    "attention(q, k, v, *, <the names in _core.ATTENTION_ARGS>): the raw binding behind "
    "mha_ext.attention. Arguments after q, k, v may be given by position (in ATTENTION_ARGS "
    "order) or by keyword; absent ones take their defaults (None, False, codes 0, window -1)."};

// A valid small AttentionParams with `overrides` (field name -> value) applied, run through
// check_params(): lets tests show each invariant being enforced at the C++ level.
void check_params_for_test(const py::dict& overrides) {
    static float buffer[4096] = {};
    AttentionParams p{};
    p.batch = 2, p.num_heads_q = 4, p.num_heads_k = 2, p.seqlen_q = 3, p.seqlen_k = 5;
    p.head_dim = p.head_dim_k = p.head_dim_v = 8;
    p.q = p.k = p.v = buffer;
    p.out = buffer;
    std::vector<int64_t> key_lengths;
    const struct {
        const char* name;
        int64_t AttentionParams::*field;
    } sizes[] = {{"batch", &AttentionParams::batch},
                 {"num_heads_q", &AttentionParams::num_heads_q},
                 {"num_heads_k", &AttentionParams::num_heads_k},
                 {"seqlen_q", &AttentionParams::seqlen_q},
                 {"seqlen_k", &AttentionParams::seqlen_k},
                 {"head_dim", &AttentionParams::head_dim},
                 {"head_dim_k", &AttentionParams::head_dim_k},
                 {"head_dim_v", &AttentionParams::head_dim_v},
                 {"window_left", &AttentionParams::window_left},
                 {"window_right", &AttentionParams::window_right},
                 {"score_dim", &AttentionParams::score_dim}};
    for (const auto& item : overrides) {
        const std::string name = py::str(item.first);
        const py::handle value = item.second;
        bool done = false;
        for (const auto& f : sizes) {
            if (name == f.name) {
                p.*(f.field) = value.cast<int64_t>();
                done = true;
            }
        }
        if (done) continue;
        if (name == "dtype") {
            p.dtype = static_cast<DType>(value.cast<int32_t>());
        } else if (name == "causal") {
            p.causal = static_cast<Causal>(value.cast<int32_t>());
        } else if (name == "device") {
            p.device = static_cast<Device>(value.cast<int32_t>());
        } else if (name == "score") {
            p.score = static_cast<Score>(value.cast<int32_t>());
        } else if (name == "score_weights") {  // give (True) or drop (False) W_q, W_k, w
            const bool on = value.cast<bool>();
            p.score_wq = p.score_wk = p.score_w = on ? buffer : nullptr;
        } else if (name == "scale") {
            p.scale = value.cast<double>();
        } else if (name == "num_threads") {
            p.num_threads = value.cast<int>();
        } else if (name == "key_lengths") {
            key_lengths = value.cast<std::vector<int64_t>>();
            p.key_lengths = key_lengths.data();
        } else if (name == "q") {  // drop a pointer
            p.q = nullptr;
        } else if (name == "out") {
            p.out = nullptr;
        } else {
            throw type_error("_check_params: unknown field '" + name + "'");
        }
    }
    check_params(p);
}

// S2Attention's two native passes (csrc/s2/s2_cpu.h) on x (B, H, W, 3C), float32/float64:
// logits None -> the branch/pixel sums (B, C); logits (B, 3C) -> the softmax-weighted
// combination of the shifted branches (B, H, W, C). Both return a new array; x is only read.
py::array s2_attention(py::array x, py::object logits, py::object num_threads) {
    S2Params p{};
    DType dt;
    MHA_CHECK_TYPE(classify(x, &dt) && (dt == DType::kFloat32 || dt == DType::kFloat64),
                   "x: expected a float32 or float64 array, got dtype ", dtype_name(x));
    MHA_CHECK(x.ndim() == 4, "x: expected 4 dimensions (B, H, W, 3*C), got shape ", shape_str(x));
    MHA_CHECK(x.shape(3) >= 3 && x.shape(3) % 3 == 0,
              "x: the last axis must hold 3*C channels with C >= 1, got shape ", shape_str(x));
    x = fast_path_view(x);
    p.dtype = dt;
    p.x = x.data();
    p.batch = x.shape(0);
    p.height = x.shape(1);
    p.width = x.shape(2);
    p.channels = x.shape(3) / 3;
    const py::ssize_t item = x.itemsize();
    p.x_stride_batch = elem_stride(x, 0, item);
    p.x_stride_h = elem_stride(x, 1, item);
    p.x_stride_w = elem_stride(x, 2, item);
    p.num_threads = parse_num_threads(num_threads);
    const int64_t B = p.batch, C = p.channels;
    if (logits.is_none()) {
        py::array sums(x.dtype(), std::vector<int64_t>{B, C});
        p.sums = sums.mutable_data();
        {
            py::gil_scoped_release release;
            s2_branch_sum(p);
        }
        return sums;
    }
    py::array l = py::array::ensure(logits);
    MHA_CHECK_TYPE(l && l.dtype().equal(x.dtype()), "logits: expected dtype ", dtype_name(x),
                   " like x, got ", l ? dtype_name(l) : std::string("object"));
    MHA_CHECK(l.ndim() == 2 && l.shape(0) == B && l.shape(1) == 3 * C,
              "logits: expected shape (B, 3*C) = (", B, ", ", 3 * C, "), got ", shape_str(l));
    l = py::array::ensure(l, py::array::c_style);
    p.logits = l.data();
    py::array result(x.dtype(), std::vector<int64_t>{B, p.height, p.width, C});
    p.out = result.mutable_data();
    {
        py::gil_scoped_release release;
        s2_combine(p);
    }
    return result;
}

// attention() as a METH_FASTCALL function: the arguments arrive as a C array, so a tiny call
// skips pybind11's generic dispatcher (an argument vector and one caster per argument, about
// a microsecond for 21 arguments). C++ exceptions are mapped as pybind11 maps them.
constexpr Py_ssize_t kAttentionArgs = 21;

// merge(outs, lses, blhd, num_threads, out) -> (out, lse): partial results over disjoint key shards
// combined by their lse (SPEC 6.1). Shapes: every out_p has out's shape (rank 2..4, layout
// `blhd`), every lse_p the (B, H, L) shape in the caller's rank.
// A new C-contiguous result array. Large ones (>= 8 MB) are 2 MB-aligned with transparent huge
// pages asked for (Linux madvise), so writing them the first time takes one page fault per
// 2 MB instead of one per 4 KB: for a 64 MB merge that fault time was as long as the merge.
// The memory is freed with the array (a capsule owns it); numpy's allocation otherwise.
py::array new_result(const py::dtype& dt, const std::vector<int64_t>& shape) {
#if defined(__linux__)
    constexpr size_t kHuge = size_t{2} << 20;
    size_t bytes = static_cast<size_t>(dt.itemsize());
    for (int64_t s : shape) bytes *= static_cast<size_t>(s);
    if (bytes >= 4 * kHuge) {
        const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
        void* mem = std::aligned_alloc(kHuge, rounded);
        if (mem != nullptr) {
            madvise(mem, rounded, MADV_HUGEPAGE);  // advice only: failure keeps 4 KB pages
            py::capsule owner(mem, [](void* m) { std::free(m); });
            return py::array(dt, shape, mem, owner);
        }
    }
#endif
    return py::array(dt, shape);
}

py::tuple merge(py::sequence outs, py::sequence lses, bool blhd, py::object num_threads,
                py::object out) {
    const int threads = parse_num_threads(num_threads);
    const py::ssize_t n = static_cast<py::ssize_t>(py::len(outs));
    MHA_CHECK(n >= 1, "outs: expected at least one partial output, got none");
    MHA_CHECK(static_cast<py::ssize_t>(py::len(lses)) == n, "lses: expected ", n,
              " lse arrays (one per part of outs), got ", py::len(lses));
    std::vector<py::array> out_arr, lse_arr;
    out_arr.reserve(n);
    lse_arr.reserve(n);
    DType dtype = DType::kFloat32;
    py::dtype dt0;
    std::vector<int64_t> shape0;
    for (py::ssize_t p = 0; p < n; ++p) {
        const std::string name = detail::concat("outs[", p, "]");
        py::array a = py::array::ensure(outs[p]);
        MHA_CHECK_TYPE(a, name, ": expected a NumPy array");
        DType dt;
        MHA_CHECK_TYPE(classify(a, &dt), name,
                       ": expected float32, float64, float16 or bfloat16, got dtype ",
                       dtype_name(a));
        std::vector<int64_t> shape(a.shape(), a.shape() + a.ndim());
        if (p == 0) {
            MHA_CHECK(a.ndim() >= 2 && a.ndim() <= 4, name,
                      ": expected 2, 3 or 4 dimensions, got shape ", shape_str(a));
            dtype = dt;
            dt0 = a.dtype();
            shape0 = shape;
        } else {
            MHA_CHECK_TYPE(dt == dtype, name, ": dtype ", dtype_name(a),
                           " differs from outs[0]'s ", py::str(dt0.attr("name")).cast<std::string>());
            MHA_CHECK(shape == shape0, name, ": shape ", shape_str(a), " differs from outs[0]'s ",
                      shape_str(shape0), " (every part holds the same query rows)");
        }
        out_arr.push_back(fast_path_view(native_byte_order(a)));
    }
    const int rank = static_cast<int>(shape0.size());
    const Axes ax = axes_of(rank, blhd);
    const Dims4 d = dims_of(out_arr[0], ax);
    // lse shape in the caller's rank: (B, H, L), (H, L) or (L,).
    std::vector<int64_t> lse_shape{d.b, d.h, d.l};
    lse_shape.erase(lse_shape.begin(), lse_shape.begin() + (4 - rank));
    const bool dbl = dtype == DType::kFloat64;
    for (py::ssize_t p = 0; p < n; ++p) {
        const std::string name = detail::concat("lses[", p, "]");
        py::array raw = py::array::ensure(lses[p]);
        MHA_CHECK_TYPE(raw && raw.dtype().kind() == 'f', name,
                       ": expected a float array, got ", raw ? dtype_name(raw) : "a non-array");
        std::vector<int64_t> shape(raw.shape(), raw.shape() + raw.ndim());
        MHA_CHECK(shape == lse_shape, name, ": expected shape ", shape_str(lse_shape),
                  " (the lse of outs[", p, "]), got ", shape_str(raw));
        lse_arr.push_back(as_accum(raw, dbl, name.c_str()));
    }
    std::vector<const void*> out_ptrs(n), lse_ptrs(n);
    std::vector<int64_t> out_strides(3 * n), lse_strides(3 * n);
    for (py::ssize_t p = 0; p < n; ++p) {
        const Dims4 dp = dims_of(out_arr[p], ax);
        out_ptrs[p] = out_arr[p].data();
        out_strides[3 * p] = dp.sb;
        out_strides[3 * p + 1] = dp.sh;
        out_strides[3 * p + 2] = dp.sl;
        const py::array& l = lse_arr[p];
        const py::ssize_t item = l.itemsize();
        lse_ptrs[p] = l.data();
        // C-contiguous (B, H, L) in the caller's rank: implicit axes have stride 0.
        int64_t s[3] = {0, 0, 0};
        for (int t = 0; t < rank - 1; ++t) s[3 - (rank - 1) + t] = elem_stride(l, t, item);
        lse_strides[3 * p] = s[0];
        lse_strides[3 * p + 1] = s[1];
        lse_strides[3 * p + 2] = s[2];
    }
    py::array result = no_array();
    if (out.is_none()) {
        result = new_result(dt0, shape0);
    } else {
        // The caller's output (a buffer reused across calls writes to pages already mapped).
        MHA_CHECK_TYPE(py::isinstance<py::array>(out), "out: expected a NumPy array or None");
        result = py::reinterpret_borrow<py::array>(out);
        const py::dtype got = result.dtype();
        MHA_CHECK_TYPE(got.is(dt0) || got.equal(dt0), "out: expected dtype ",
                       dtype_name(out_arr[0]), " (that of outs) in native byte order, got ",
                       dtype_name(result));
        const std::vector<int64_t> shape(result.shape(), result.shape() + result.ndim());
        MHA_CHECK(shape == shape0, "out: expected shape ", shape_str(shape0), ", got ",
                  shape_str(result));
        MHA_CHECK(result.flags() & py::array::c_style, "out: must be C-contiguous");
        MHA_CHECK(result.writeable(), "out: must be writeable");
        for (py::ssize_t p = 0; p < n; ++p) {
            MHA_CHECK(!overlaps(result, out_arr[p]) && !overlaps(result, lse_arr[p]),
                      "out: must not share memory with outs[", p, "] or lses[", p, "]");
        }
    }
    py::array lse(py::dtype(dbl ? "float64" : "float32"), lse_shape);
    const Dims4 dr = dims_of(result, ax);
    MergeParams mp;
    mp.dtype = dtype;
    mp.lse_double = dbl;
    mp.num_parts = n;
    mp.outs = out_ptrs.data();
    mp.lses = lse_ptrs.data();
    mp.out_strides = out_strides.data();
    mp.lse_strides = lse_strides.data();
    mp.batch = d.b;
    mp.num_heads = d.h;
    mp.seqlen = d.l;
    mp.head_dim = d.d;
    mp.out = result.mutable_data();
    mp.out_stride_batch = dr.sb;
    mp.out_stride_head = dr.sh;
    mp.out_stride_seq = dr.sl;
    mp.lse = lse.mutable_data();
    mp.num_threads = threads;
    {
        py::gil_scoped_release release;
        merge_forward(mp);
    }
    return py::make_tuple(result, lse);
}

}  // namespace
}  // namespace mha

void register_nn(py::module_& m);  // bindings_nn.cpp

PYBIND11_MODULE(_core, m) {
    m.doc() = "mha_ext native core (see mha_ext.attention for the documented API)";
    mha::main_thread_ident();  // cache it while importing
    // mha::type_error -> TypeError; std::invalid_argument -> ValueError (pybind11's default).
    py::register_exception_translator([](std::exception_ptr ptr) {
        try {
            if (ptr) std::rethrow_exception(ptr);
        } catch (const mha::type_error& e) {
            PyErr_SetString(PyExc_TypeError, e.what());
        }
    });

    // The codes of the Python -> C++ protocol, as IntEnums (int subclasses: reading one costs
    // what reading an int does). The values are params.h's enums and the binding's ScoreKind.
    const py::object int_enum = py::module_::import("enum").attr("IntEnum");
    auto add_enum = [&](const char* name, std::initializer_list<std::pair<const char*, int>> items) {
        py::list members;
        for (const auto& it : items) members.append(py::make_tuple(it.first, it.second));
        m.add_object(name, int_enum(name, members, py::arg("module") = "mha_ext._core"));
    };
    using mha::Causal;
    using mha::Device;
    using mha::ScoreKind;
    add_enum("Causal", {{"NONE", static_cast<int>(Causal::kNone)},
                        {"BOTTOM_RIGHT", static_cast<int>(Causal::kBottomRight)},
                        {"TOP_LEFT", static_cast<int>(Causal::kTopLeft)}});
    add_enum("Device", {{"CPU", static_cast<int>(Device::kCpu)},
                        {"CUDA", static_cast<int>(Device::kCuda)}});
    add_enum("Score", {{"SCALED_DOT", static_cast<int>(ScoreKind::kScaledDot)},
                       {"DOT", static_cast<int>(ScoreKind::kDot)},
                       {"GENERAL", static_cast<int>(ScoreKind::kGeneral)},
                       {"ADDITIVE", static_cast<int>(ScoreKind::kAdditive)}});

    py::list arg_names;
    for (int i = 0; i < mha::kNumArgs; ++i) {
        mha::g_arg_names[i] = PyUnicode_InternFromString(mha::kArgNames[i]);  // immortal here
        arg_names.append(py::reinterpret_borrow<py::str>(mha::g_arg_names[i]));
    }
    m.attr("ATTENTION_ARGS") = py::tuple(arg_names);
    m.add_object("attention",
                 py::reinterpret_steal<py::object>(PyCFunction_New(&mha::attention_def, nullptr)));
    m.attr("MAX_THREADS") = mha::kMaxThreads;
    m.def("_check_params", &mha::check_params_for_test, py::arg("overrides"),
          "Tests only: check_params() on a valid small AttentionParams with fields overridden.");

    m.def("_set_simd", &mha::set_cpu_simd, py::arg("name"),
          "Tests and benchmarks only: later CPU calls take this instruction-set path (one of "
          "build_info()['simd_supported']); returns the previous one.");

    m.def(
        "_tanh",
        [](py::array_t<float, py::array::c_style | py::array::forcecast> x) {
            py::array_t<float> y(x.size());
            mha::cpu_vector_tanh(x.data(), y.mutable_data(), static_cast<int64_t>(x.size()));
            return y;
        },
        py::arg("x"),
        "Tests only: the CPU kernel's vectorised float32 tanh (softcap, additive score) of x "
        "(flattened) on the selected instruction-set path.");

    m.def("s2_attention", &mha::s2_attention, py::arg("x"), py::arg("logits") = py::none(),
          py::arg("num_threads") = py::none(),
          "S2Attention's native passes: logits None -> branch sums (B, C); else (B, H, W, C).");

    m.def("attention_varlen", &mha::attention_varlen, py::arg("q"), py::arg("k"), py::arg("v"),
          py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("causal") = 0,
          py::arg("window_left") = -1, py::arg("window_right") = -1,
          py::arg("scale") = py::none(), py::arg("score") = 0, py::arg("score_wq") = py::none(),
          py::arg("score_wk") = py::none(), py::arg("score_w") = py::none(),
          py::arg("alibi_slopes") = py::none(), py::arg("softcap") = py::none(),
          py::arg("return_lse") = false, py::arg("device") = 0,
          py::arg("num_threads") = py::none(), py::arg("out") = py::none(),
          "Packed variable-length attention (SPEC 6.2): out, or (out, lse (Hq, total_q)).");
    m.def("attention_kvcache", &mha::attention_kvcache, py::arg("q"), py::arg("k_cache"),
          py::arg("v_cache"), py::arg("cache_seqlens"), py::arg("block_table") = py::none(),
          py::arg("causal") = 1, py::arg("window_left") = -1, py::arg("window_right") = -1,
          py::arg("scale") = py::none(), py::arg("alibi_slopes") = py::none(),
          py::arg("softcap") = py::none(), py::arg("return_lse") = false,
          py::arg("num_splits") = py::none(), py::arg("device") = 0,
          py::arg("num_threads") = py::none(),
          "KV-cache attention, contiguous or paged (SPEC 6.3): out, or (out, lse (B, Hq, Lq)).");

    m.def("attention_backward", &mha::attention_backward_py, py::arg("dout"), py::arg("q"),
          py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"),
          py::arg("mask") = py::none(), py::arg("bias") = py::none(), py::arg("causal") = 0,
          py::arg("window_left") = -1, py::arg("window_right") = -1,
          py::arg("key_lengths") = py::none(), py::arg("scale") = py::none(),
          py::arg("score") = 0, py::arg("score_wq") = py::none(),
          py::arg("score_wk") = py::none(), py::arg("score_w") = py::none(),
          py::arg("alibi_slopes") = py::none(), py::arg("softcap") = py::none(),
          py::arg("blhd") = false, py::arg("device") = 0, py::arg("num_threads") = py::none(),
          py::arg("return_dbias") = false,
          "The backward pass behind mha_ext.attention_backward: (dq, dk, dv, dscore, dbias).");

    m.def("merge", &mha::merge, py::arg("outs"), py::arg("lses"), py::arg("blhd") = false,
          py::arg("num_threads") = py::none(), py::arg("out") = py::none(),
          "Merge partial attention results over disjoint key shards: (out, lse).");

    m.def("build_info", [] {
        const mha::BuildInfo info = mha::build_info();
        py::dict d;
        d["version"] = MHA_EXT_VERSION;
        d["simd"] = info.simd.empty() ? py::object(py::none()) : py::object(py::str(info.simd));
        if (!info.simd_error.empty()) d["simd_error"] = info.simd_error;
        d["simd_supported"] = info.simd_supported;
        if (!info.simd_note.empty()) d["simd_note"] = info.simd_note;
        d["openmp"] = info.openmp;
        d["max_threads"] = info.max_threads;
        d["cuda_built"] = info.cuda_built;
        d["cuda_emulated"] = info.cuda_emulated;
        py::list archs;
        std::string a = info.cuda_archs;
        size_t pos = 0;
        while (!a.empty()) {
            pos = a.find(';');
            archs.append(a.substr(0, pos));
            if (pos == std::string::npos) break;
            a = a.substr(pos + 1);
        }
        d["cuda_archs"] = archs;
        d["compiler"] = info.compiler;
        return d;
    });
    register_nn(m);
    m.def("cuda_available", &mha::cuda_available);
    m.def("cuda_last_kernel_ms", &mha::cuda_last_kernel_ms,
          "Kernel time (ms) of this thread's last device='cuda' call; 0 without CUDA.");
    m.def("cuda_last_copy_ms", &mha::cuda_last_copy_ms,
          "Host<->device copy time (ms) of this thread's last device='cuda' call.");
}
