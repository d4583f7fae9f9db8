// pybind11 module mha_ext._core: converts NumPy arrays into one AttentionParams, releases the
// GIL, calls the dispatcher and returns new arrays. Shape and dtype checks live here (the
// arrays are only visible here); value checks live in check_params(). No numerics.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "check.h"
#include "dispatch.h"
#include "params.h"

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

// Score kinds as the Python layer passes them.
enum ScoreArg : int { kScoreScaledDot = 0, kScoreDot = 1, kScoreGeneral = 2, kScoreAdditive = 3 };

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

// num_threads: None -> 0 (the OpenMP default), else an int in 1..4096 (bools refused).
int parse_num_threads(const py::object& num_threads) {
    if (num_threads.is_none()) return 0;
    MHA_CHECK_TYPE(!PyBool_Check(num_threads.ptr()), "num_threads: expected an int or None, got ",
                   num_threads.cast<bool>() ? "True" : "False");
    int64_t n;
    try {
        n = num_threads.cast<int64_t>();
    } catch (const py::cast_error&) {
        throw type_error("num_threads: expected an int or None");
    }
    MHA_CHECK(n >= 1 && n <= 4096, "num_threads: expected a positive thread count, got ", n);
    return static_cast<int>(n);
}

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

// Shape of a result in the caller's rank and layout.
std::vector<int64_t> shape_of(int rank, bool blhd, int64_t b, int64_t h, int64_t l, int64_t d) {
    if (rank == 4) return blhd ? std::vector<int64_t>{b, l, h, d} : std::vector<int64_t>{b, h, l, d};
    if (rank == 3) return blhd ? std::vector<int64_t>{l, h, d} : std::vector<int64_t>{h, l, d};
    return {l, d};
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
        throw std::invalid_argument(detail::concat(
            name, ": shape ", shape_str(a), " is not broadcastable to (B, Hq, Lq, Lk) = ",
            shape_str(std::vector<int64_t>(target, target + 4))));
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

py::object attention(py::array q, py::array k, py::array v, py::object mask, py::object bias,
                     int causal, int64_t window_left, int64_t window_right,
                     py::object key_lengths, py::object scale, int score,
                     py::object score_wq, py::object score_wk, py::object score_w,
                     bool return_weights, bool return_lse, bool blhd, int device,
                     py::object num_threads, py::object out, bool naive) {
    AttentionParams p{};
    p.naive = naive;

    // dtypes: one float dtype for q, k, v (byte-swapped arrays are converted first).
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
    const bool dbl = dtype_accumulates_in_double(p.dtype);

    // Ranks and shapes.
    const int rank = static_cast<int>(q.ndim());
    MHA_CHECK(rank >= 2 && rank <= 4, "q: expected 2, 3 or 4 dimensions (", blhd ? "(B, L, H, D)" : "(B, H, L, D)",
              " or fewer leading axes), got shape ", shape_str(q));
    MHA_CHECK(k.ndim() == rank, "k: expected ", rank, " dimensions like q ", shape_str(q),
              ", got shape ", shape_str(k));
    MHA_CHECK(v.ndim() == rank, "v: expected ", rank, " dimensions like q ", shape_str(q),
              ", got shape ", shape_str(v));
    q = fast_path_view(q);
    k = fast_path_view(k);
    v = fast_path_view(v);
    const Axes ax = axes_of(rank, blhd);
    const Dims4 Q = dims_of(q, ax), K = dims_of(k, ax), V = dims_of(v, ax);
    const char* lay = blhd ? "(B, L, H, D)" : "(B, H, L, D)";
    MHA_CHECK(K.b == Q.b && V.b == Q.b, "k, v: batch size must match q's (", Q.b,
              "); got k ", shape_str(k), ", v ", shape_str(v), " for q ", shape_str(q),
              " in layout ", lay);
    MHA_CHECK(V.h == K.h, "v: number of heads (", V.h, ") must match k's (", K.h, "); got k ",
              shape_str(k), ", v ", shape_str(v), " in layout ", lay);
    MHA_CHECK(V.l == K.l, "v: sequence length (", V.l, ") must match k's (", K.l,
              "); got k ", shape_str(k), ", v ", shape_str(v), " in layout ", lay);
    MHA_CHECK(K.h > 0 || Q.h == 0, "k: number of key/value heads must be at least 1; got k ",
              shape_str(k), " in layout ", lay);
    MHA_CHECK(K.h == 0 || Q.h % K.h == 0, "q, k: the number of query heads (", Q.h,
              ") must be a multiple of the number of key/value heads (", K.h, "); got q ",
              shape_str(q), ", k ", shape_str(k), " in layout ", lay);
    MHA_CHECK(Q.d >= 1, "q: the head dimension D must be at least 1; got q ", shape_str(q));

    p.batch = Q.b;
    p.num_heads_q = Q.h;
    p.num_heads_k = K.h;
    p.seqlen_q = Q.l;
    p.seqlen_k = K.l;
    p.head_dim = Q.d;
    p.head_dim_k = K.d;
    p.head_dim_v = V.d;
    p.q = q.data();
    p.k = k.data();
    p.v = v.data();
    p.q_stride_batch = Q.sb, p.q_stride_head = Q.sh, p.q_stride_seq = Q.sl;
    p.k_stride_batch = K.sb, p.k_stride_head = K.sh, p.k_stride_seq = K.sl;
    p.v_stride_batch = V.sb, p.v_stride_head = V.sh, p.v_stride_seq = V.sl;

    // Score function and scale.
    py::array wq = no_array(), wk = no_array(), wv = no_array();
    switch (score) {
        case kScoreScaledDot:
        case kScoreDot:
            p.score = Score::kDot;
            MHA_CHECK(K.d == Q.d, "k: head dimension (", K.d, ") must equal q's (", Q.d,
                      ") for a dot-product score; got q ", shape_str(q), ", k ", shape_str(k));
            break;
        case kScoreGeneral:
            p.score = Score::kGeneral;
            wq = as_accum(score_wq, dbl, "General.W");
            MHA_CHECK(wq.ndim() == 2 && wq.shape(0) == Q.d && wq.shape(1) == K.d,
                      "General.W: expected shape (D, Dk) = (", Q.d, ", ", K.d, "), got ",
                      shape_str(wq));
            p.score_wq = wq.data();
            break;
        case kScoreAdditive: {
            p.score = Score::kAdditive;
            wq = as_accum(score_wq, dbl, "W_q");
            wk = as_accum(score_wk, dbl, "W_k");
            wv = as_accum(score_w, dbl, "w");
            MHA_CHECK(wv.ndim() == 1 && wv.shape(0) >= 1,
                      "w: expected a vector of shape (A,) with A >= 1, got ", shape_str(wv));
            const int64_t na = wv.shape(0);
            MHA_CHECK(wq.ndim() == 2 && wq.shape(0) == Q.d && wq.shape(1) == na,
                      "W_q: expected shape (D, A) = (", Q.d, ", ", na, "), got ", shape_str(wq));
            MHA_CHECK(wk.ndim() == 2 && wk.shape(0) == K.d && wk.shape(1) == na,
                      "W_k: expected shape (Dk, A) = (", K.d, ", ", na, "), got ", shape_str(wk));
            p.score_dim = na;
            p.score_wq = wq.data();
            p.score_wk = wk.data();
            p.score_w = wv.data();
            break;
        }
        default:
            throw std::invalid_argument("score: unknown score function");
    }
    if (scale.is_none()) {
        p.scale = score == kScoreScaledDot ? 1.0 / std::sqrt(static_cast<double>(Q.d)) : 1.0;
    } else {
        double s;
        try {
            s = scale.cast<double>();
        } catch (const py::cast_error&) {
            throw type_error(detail::concat("scale: expected a float or None, got ",
                                            std::string(py::str(py::type::of(scale).attr("__name__")))));
        }
        MHA_CHECK(std::isfinite(s), "scale: must be finite, got ", s);
        // Logits are accumulated in float32 for fp32/fp16/bf16 inputs: past 2^64 every
        // non-tiny logit overflows to inf and rows turn to NaN. Refuse rather than guess.
        MHA_CHECK(dbl || std::fabs(s) <= 1.8446744073709552e19, "scale: |", s,
                  "| > 2^64 overflows the float32 logits of ", dtype_name(q),
                  " inputs; use float64 inputs for such scales");
        p.scale = s;
    }

    // Masks: bool mask and float bias broadcast through zero strides to (B, Hq, Lq, Lk).
    const int64_t target[4] = {Q.b, Q.h, Q.l, K.l};
    py::array mask_arr = no_array(), bias_arr = no_array(), kl_arr = no_array();
    if (!mask.is_none()) {
        mask_arr = py::array::ensure(mask);
        MHA_CHECK_TYPE(mask_arr && mask_arr.dtype().kind() == 'b',
                       "mask: expected a bool array (True = may attend), got dtype ",
                       mask_arr ? dtype_name(mask_arr) : std::string("object"),
                       ". For an additive float mask (0 / -inf) pass it as bias=...; for a 0/1 "
                       "mask where 1 means 'hidden' (the TensorFlow tutorial convention) pass "
                       "mask=(m == 0)");
        int64_t st[4];
        broadcast_strides(mask_arr, "mask", target, st);
        p.mask = static_cast<const uint8_t*>(mask_arr.data());
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
        bias_arr = same ? fast_path_view(raw) : as_accum(raw, dbl, "bias");
        int64_t st[4];
        broadcast_strides(bias_arr, "bias", target, st);
        p.bias = bias_arr.data();
        p.bias_stride_batch = st[0], p.bias_stride_head = st[1], p.bias_stride_q = st[2],
        p.bias_stride_k = st[3];
    }
    if (!key_lengths.is_none()) {
        py::array raw = py::array::ensure(key_lengths);
        MHA_CHECK_TYPE(raw && (raw.dtype().kind() == 'i' || raw.dtype().kind() == 'u'),
                       "key_lengths: expected an integer array of shape (B,), got dtype ",
                       raw ? dtype_name(raw) : std::string("object"));
        MHA_CHECK(raw.ndim() == 1 && raw.shape(0) == Q.b,
                  "key_lengths: expected shape (B,) = (", Q.b, ",), got ", shape_str(raw));
        kl_arr = fast_path_view(
            py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(raw));
        // uint64 values above INT64_MAX would wrap: reject them as out of range.
        if (raw.dtype().kind() == 'u' && raw.itemsize() == 8) {
            const py::array_t<uint64_t> u = py::array_t<uint64_t, py::array::forcecast>::ensure(raw);
            for (py::ssize_t b = 0; b < u.shape(0); ++b) {
                MHA_CHECK(u.at(b) <= static_cast<uint64_t>(K.l), "key_lengths: entry ", b, " is ",
                          u.at(b), ", expected 0 <= key_lengths[b] <= Lk = ", K.l);
            }
        }
        p.key_lengths = static_cast<const int64_t*>(kl_arr.data());
    }

    MHA_CHECK(causal >= 0 && causal <= 2, "causal: expected False, True, 'bottom_right' or 'top_left'");
    p.causal = static_cast<Causal>(causal);
    MHA_CHECK(window_left >= -1 && window_right >= -1,
              "window: expected (left, right) with each >= 0, or -1/None for unbounded; got (",
              window_left, ", ", window_right, ")");
    p.window_left = window_left;
    p.window_right = window_right;

    MHA_CHECK(device == 0 || device == 1, "device: expected 'cpu', 'cuda' or 'auto'");
    p.device = static_cast<Device>(device);
    p.num_threads = parse_num_threads(num_threads);

    // Outputs.
    const std::vector<int64_t> out_shape = shape_of(rank, blhd, Q.b, Q.h, Q.l, V.d);
    py::array result = no_array();
    if (out.is_none()) {
        result = py::array(q.dtype(), out_shape);
    } else {
        MHA_CHECK_TYPE(py::isinstance<py::array>(out), "out: expected a NumPy array or None");
        result = py::reinterpret_borrow<py::array>(out);
        MHA_CHECK_TYPE(result.dtype().is(q.dtype()) || result.dtype().equal(q.dtype()),
                       "out: expected dtype ", dtype_name(q), ", got ", dtype_name(result));
        bool shape_ok = result.ndim() == static_cast<py::ssize_t>(out_shape.size());
        for (size_t i = 0; shape_ok && i < out_shape.size(); ++i) {
            shape_ok = result.shape(i) == out_shape[i];
        }
        MHA_CHECK(shape_ok, "out: expected shape ", shape_str(out_shape), ", got ",
                  shape_str(result));
        MHA_CHECK(result.flags() & py::array::c_style, "out: must be C-contiguous");
        MHA_CHECK(result.writeable(), "out: must be writeable");
        MHA_CHECK(!overlaps(result, q) && !overlaps(result, k) && !overlaps(result, v),
                  "out: must not share memory with q, k or v");
        for (const py::array* in : {&mask_arr, &bias_arr, &kl_arr, &wq, &wk, &wv}) {
            MHA_CHECK(!*in || !overlaps(result, *in),
                      "out: must not share memory with mask, bias, key_lengths or score weights");
        }
    }
    const Dims4 O = dims_of(result, ax);
    p.out = result.mutable_data();
    p.out_stride_batch = O.sb, p.out_stride_head = O.sh, p.out_stride_seq = O.sl;
    // Size-1 axes got stride 0 above; with one row per axis it is never used.

    // weights (B, Hq, Lq, Lk) and lse (B, Hq, Lq), dropping the leading axes the inputs lack.
    py::array weights = no_array(), lse = no_array();
    if (return_weights || return_lse) {
        const py::dtype acc_dtype = dbl ? py::dtype::of<double>() : py::dtype::of<float>();
        const std::vector<int64_t> full = {Q.b, Q.h, Q.l, K.l};
        if (return_weights) {
            weights = py::array(acc_dtype, std::vector<int64_t>(full.begin() + (4 - rank), full.end()));
            p.weights = weights.mutable_data();
        }
        if (return_lse) {
            lse = py::array(acc_dtype,
                            std::vector<int64_t>(full.begin() + (4 - rank), full.end() - 1));
            p.lse = lse.mutable_data();
        }
    }

    // Ctrl-C polling, for calls long enough to notice it (> ~1 ms of work) from the main thread.
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

    if (!return_weights && !return_lse) return std::move(result);
    py::tuple t(1 + (return_weights ? 1 : 0) + (return_lse ? 1 : 0));
    size_t i = 0;
    t[i++] = result;
    if (return_weights) t[i++] = weights;
    if (return_lse) t[i++] = lse;
    return std::move(t);
}

// S2Attention's two native passes (csrc/cpu/s2_cpu.h) on x (B, H, W, 3C), float32/float64:
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

PyObject* attention_fastcall(PyObject*, PyObject* const* args, size_t nargsf,
                             PyObject* kwnames) {
    try {
        const Py_ssize_t npos = PyVectorcall_NARGS(nargsf);
        const Py_ssize_t nkw = kwnames == nullptr ? 0 : PyTuple_GET_SIZE(kwnames);
        // The only keyword is the last argument, naive=.
        if (nkw > 1 || (nkw == 1 && (npos != kAttentionArgs - 1 ||
                                     PyUnicode_CompareWithASCIIString(
                                         PyTuple_GET_ITEM(kwnames, 0), "naive") != 0))) {
            throw type_error("_core.attention: the only keyword argument is naive=");
        }
        const Py_ssize_t nargs = npos + nkw;
        if (nargs != kAttentionArgs && nargs != kAttentionArgs - 1) {
            throw type_error(detail::concat("_core.attention: expected ", kAttentionArgs - 1,
                                            " or ", kAttentionArgs, " arguments, got ", nargs));
        }
        auto arr = [&](Py_ssize_t i, const char* name) {
            if (py::isinstance<py::array>(args[i])) {  // skip NumPy's conversion machinery
                return py::reinterpret_borrow<py::array>(args[i]);
            }
            py::array a = py::array::ensure(args[i]);
            if (!a) {
                PyErr_Clear();
                throw type_error(detail::concat(name, ": expected a NumPy array, got ",
                                                Py_TYPE(args[i])->tp_name));
            }
            return a;
        };
        auto obj = [&](Py_ssize_t i) { return py::reinterpret_borrow<py::object>(args[i]); };
        auto integer = [&](Py_ssize_t i, const char* name) {
            const long long x = PyLong_AsLongLong(args[i]);
            if (x == -1 && PyErr_Occurred()) {
                PyErr_Clear();
                throw type_error(detail::concat(name, ": expected an int"));
            }
            return x;
        };
        auto flag = [&](Py_ssize_t i) { return PyObject_IsTrue(args[i]) == 1; };
        py::object result =
            attention(arr(0, "q"), arr(1, "k"), arr(2, "v"), obj(3), obj(4),
                      static_cast<int>(integer(5, "causal")), integer(6, "window"),
                      integer(7, "window"), obj(8), obj(9), static_cast<int>(integer(10, "score")),
                      obj(11), obj(12), obj(13), flag(14), flag(15), flag(16),
                      static_cast<int>(integer(17, "device")), obj(18), obj(19),
                      nargs == kAttentionArgs && flag(20));
        return result.release().ptr();
    } catch (py::error_already_set& e) {
        e.restore();
    } catch (const type_error& e) {
        PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const std::invalid_argument& e) {
        PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const std::bad_alloc&) {
        PyErr_NoMemory();
    } catch (const std::exception& e) {
        PyErr_SetString(PyExc_RuntimeError, e.what());
    }
    return nullptr;
}

PyMethodDef attention_def = {
    "attention", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&attention_fastcall)),
    METH_FASTCALL | METH_KEYWORDS,
    "attention(q, k, v, mask, bias, causal, window_left, window_right, key_lengths, scale, "
    "score, score_wq, score_wk, score_w, return_weights, return_lse, blhd, device, "
    "num_threads, out, naive=False): the raw binding behind mha_ext.attention."};

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

    m.add_object("attention",
                 py::reinterpret_steal<py::object>(PyCFunction_New(&mha::attention_def, nullptr)));

    m.def("s2_attention", &mha::s2_attention, py::arg("x"), py::arg("logits") = py::none(),
          py::arg("num_threads") = py::none(),
          "S2Attention's native passes: logits None -> branch sums (B, C); else (B, H, W, C).");

    m.def("build_info", [] {
        const mha::BuildInfo info = mha::build_info();
        py::dict d;
        d["version"] = MHA_EXT_VERSION;
        d["simd"] = info.simd;
        d["openmp"] = info.openmp;
        d["max_threads"] = info.max_threads;
        d["cuda_built"] = info.cuda_built;
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
