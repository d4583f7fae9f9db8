// S2Attention CPU passes (s2_cpu.h has the index order and the shift table). Versions:
//   s2_branch_sum_cpu  pass 1, one image row (b, i) per OpenMP iteration: double partial sums
//                      per row, then a reduction over the rows in a fixed order, so the result
//                      does not depend on the thread count.
//   s2_combine_cpu     pass 2: the (batch, 3, C) softmax once, then one image row (b, i) per
//                      OpenMP iteration, one channel quarter at a time so the innermost loop
//                      runs over contiguous channels of three fixed source pixels.
// Neither pass writes x: the shifted branches are read through clamped source indices, so
// there is no shifted copy to allocate and no aliasing between a shift's reads and writes.
#include "s2/s2_cpu.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "check.h"
#ifdef _OPENMP
#include <omp.h>
#endif

namespace mha {
namespace {

// (di, dj) of quarter q in shift s (0 = shift1, 1 = shift2): shifted[i, j] = x[i - di, j - dj],
// the source clamped into the image (an edge pixel without a source keeps its own value).
constexpr int kShift[2][4][2] = {
    {{+1, 0}, {-1, 0}, {0, +1}, {0, -1}},  // shift1: from the row above, below, left, right
    {{0, +1}, {0, -1}, {+1, 0}, {-1, 0}},  // shift2: from the column left, right, row above, below
};

// Below this many elements read, one thread is faster than waking the OpenMP team.
constexpr int64_t kSerialWork = int64_t{1} << 15;

inline int64_t clamp_index(int64_t v, int64_t n) {
    return std::min(std::max(v, int64_t{0}), n - 1);
}

int thread_count(const S2Params& p, int64_t work) {
    if (work < kSerialWork) return 1;
#ifdef _OPENMP
    return p.num_threads > 0 ? p.num_threads : omp_get_max_threads();
#else
    return 1;
#endif
}

// Channel quarter q is [bound[q], bound[q + 1]): the reference code's c//4, c//2, c*3//4.
struct Quarters {
    int64_t bound[5];
};
Quarters quarters(int64_t c) { return {{0, c / 4, c / 2, 3 * c / 4, c}}; }

template <typename T>
void branch_sum(const S2Params& p) {
    const int64_t B = p.batch, H = p.height, W = p.width, C = p.channels;
    const int64_t sh = p.x_stride_h, sw = p.x_stride_w;
    T* sums = static_cast<T*>(p.sums);
    if (H == 0 || W == 0) {
        std::fill(sums, sums + B * C, T(0));
        return;
    }
    const T* x = static_cast<const T*>(p.x);
    const Quarters q = quarters(C);
    const int64_t rows = B * H;
    // partial: (batch * height, channels), row (b, i) summed over j and the three branches.
    // double even for float32: the sum runs over 3*H*W values and feeds the softmax.
    std::vector<double> partial(static_cast<size_t>(rows * C), 0.0);
    const int threads = thread_count(p, rows * W * 3 * C);

#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t b = r / H, i = r % H;
        const T* xb = x + b * p.x_stride_batch;
        double* acc = partial.data() + r * C;
        for (int64_t j = 0; j < W; ++j) {
            const T* own = xb + i * sh + j * sw + 2 * C;  // branch 2, not shifted
            for (int64_t c = 0; c < C; ++c) acc[c] += own[c];
            for (int s = 0; s < 2; ++s) {
                for (int qq = 0; qq < 4; ++qq) {
                    const int64_t si = clamp_index(i - kShift[s][qq][0], H);
                    const int64_t sj = clamp_index(j - kShift[s][qq][1], W);
                    const T* src = xb + si * sh + sj * sw + s * C;
                    for (int64_t c = q.bound[qq]; c < q.bound[qq + 1]; ++c) acc[c] += src[c];
                }
            }
        }
    }

#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t b = 0; b < B; ++b) {
        for (int64_t c = 0; c < C; ++c) {
            double s = 0.0;
            for (int64_t i = 0; i < H; ++i) s += partial[(b * H + i) * C + c];
            sums[b * C + c] = static_cast<T>(s);
        }
    }
}

template <typename T>
void combine(const S2Params& p) {
    // accum_t: float for float32, double for float64 (three products per output).
    using accum_t = T;
    const int64_t B = p.batch, H = p.height, W = p.width, C = p.channels;
    const int64_t sh = p.x_stride_h, sw = p.x_stride_w;
    const T* x = static_cast<const T*>(p.x);
    const T* logits = static_cast<const T*>(p.logits);
    T* out = static_cast<T*>(p.out);
    const Quarters q = quarters(C);

    // bar: (batch, 3, channels), softmax over the branch axis. NaN or +inf logits give NaN
    // weights for that channel, as torch.softmax does.
    std::vector<accum_t> bar(static_cast<size_t>(B * 3 * C));
    for (int64_t b = 0; b < B; ++b) {
        const T* lb = logits + b * 3 * C;
        accum_t* wb = bar.data() + b * 3 * C;
        for (int64_t c = 0; c < C; ++c) {
            const accum_t l0 = lb[c], l1 = lb[C + c], l2 = lb[2 * C + c];
            const accum_t m = std::max(std::max(l0, l1), l2);
            const accum_t e0 = std::exp(l0 - m), e1 = std::exp(l1 - m), e2 = std::exp(l2 - m);
            const accum_t inv = accum_t(1) / (e0 + e1 + e2);
            wb[c] = e0 * inv;
            wb[C + c] = e1 * inv;
            wb[2 * C + c] = e2 * inv;
        }
    }

    const int64_t rows = B * H;
    const int threads = thread_count(p, rows * W * 3 * C);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t b = r / H, i = r % H;
        const T* xb = x + b * p.x_stride_batch;
        const accum_t* w0 = bar.data() + b * 3 * C;
        const accum_t* w1 = w0 + C;
        const accum_t* w2 = w0 + 2 * C;
        for (int64_t j = 0; j < W; ++j) {
            T* o = out + (r * W + j) * C;  // out: (batch, height, width, C), C-contiguous
            const T* own = xb + i * sh + j * sw + 2 * C;
            for (int qq = 0; qq < 4; ++qq) {
                const T* s1 = xb + clamp_index(i - kShift[0][qq][0], H) * sh +
                              clamp_index(j - kShift[0][qq][1], W) * sw;
                const T* s2 = xb + clamp_index(i - kShift[1][qq][0], H) * sh +
                              clamp_index(j - kShift[1][qq][1], W) * sw + C;
                for (int64_t c = q.bound[qq]; c < q.bound[qq + 1]; ++c) {
                    o[c] = static_cast<T>(w0[c] * accum_t(s1[c]) + w1[c] * accum_t(s2[c]) +
                                          w2[c] * accum_t(own[c]));
                }
            }
        }
    }
}

}  // namespace

void s2_check_params(const S2Params& p) {
    MHA_CHECK_TYPE(p.dtype == DType::kFloat32 || p.dtype == DType::kFloat64,
                   "x: S2Attention supports float32 and float64 only");
    MHA_CHECK(p.batch >= 0 && p.height >= 0 && p.width >= 0,
              "x: sizes must be non-negative, got (B, H, W) = (", p.batch, ", ", p.height, ", ",
              p.width, ")");
    MHA_CHECK(p.channels >= 1, "x: channels must be at least 1, got ", p.channels);
    check_num_threads(p.num_threads);
    const bool pixels = p.batch > 0 && p.height > 0 && p.width > 0;
    MHA_CHECK(!pixels || p.x != nullptr, "x: must be given");
}

void s2_branch_sum_cpu(const S2Params& p) {
    s2_check_params(p);
    MHA_CHECK(p.batch == 0 || p.sums != nullptr, "s2: sums must be given");
    if (p.batch == 0) return;
    if (p.dtype == DType::kFloat64) {
        branch_sum<double>(p);
    } else {
        branch_sum<float>(p);
    }
}

void s2_combine_cpu(const S2Params& p) {
    s2_check_params(p);
    if (p.batch == 0 || p.height == 0 || p.width == 0) return;
    MHA_CHECK(p.logits != nullptr && p.out != nullptr, "s2: logits and out must be given");
    if (p.dtype == DType::kFloat64) {
        combine<double>(p);
    } else {
        combine<float>(p);
    }
}

}  // namespace mha
