// CPU merge of partial attention results: out = sum_p exp(lse_p - lse) out_p, lse = logsumexp.
//
// Memory-bound: every part's output row is read once and the merged row written once. Per
// row, the parts' lse values are scanned for the max and the sum of exp (a few scalars), then
// the output rows are accumulated in accum_t (float, double for float64) and stored.
#include "cpu/merge_cpu.h"

#include <vector>

// The kernel's scalar float16 / bfloat16 conversions, in a copy of their own (this unit is
// compiled once, with the baseline flags; see cpu/kernel/config.h).
#define MHA_CPU_NS cpu_merge
#define MHA_CPU_VEC_BYTES 32
#include "cpu/kernel/convert.h"
#include "switch.h"

namespace mha {
namespace {

using cpu_merge::bf16;
using cpu_merge::f16;

// Element access in accum_t A for each storage type.
inline float load(const float* p, int64_t d) { return p[d]; }
inline double load(const double* p, int64_t d) { return p[d]; }
inline float load(const f16* p, int64_t d) { return cpu_merge::half_to_float(p[d].bits); }
inline float load(const bf16* p, int64_t d) { return cpu_merge::bf16_to_float(p[d].bits); }
inline void store(float* p, int64_t d, float x) { p[d] = x; }
inline void store(double* p, int64_t d, double x) { p[d] = x; }
inline void store(f16* p, int64_t d, float x) { p[d].bits = cpu_merge::float_to_half(x); }
inline void store(bf16* p, int64_t d, float x) { p[d].bits = cpu_merge::float_to_bf16(x); }

// lse_p[b, h, i]; the lse arrays hold accum_t (check_merge_params).
template <typename A>
inline A lse_at(const MergeParams& p, int64_t part, int64_t b, int64_t h, int64_t i) {
    const int64_t* s = p.lse_strides + 3 * part;
    return static_cast<const A*>(p.lses[part])[b * s[0] + h * s[1] + i * s[2]];
}

// Below this many elements read, one thread (an OpenMP team costs more than the work).
constexpr int64_t kSerialElems = int64_t{1} << 16;

template <typename T, typename A>
void merge_rows(const MergeParams& p) {
    const int64_t rows = p.batch * p.num_heads * p.seqlen;
    const int64_t n = p.num_parts;
    const int64_t dv = p.head_dim;
    const bool parallel = rows > 1 && rows * (dv + 1) * n > kSerialElems;
    int threads = p.num_threads > 0 ? p.num_threads : 0;
#ifdef _OPENMP
    if (threads == 0) threads = omp_get_max_threads();
#endif
    if (!parallel) threads = 1;
    (void)threads;
#pragma omp parallel num_threads(threads) if (parallel)
    {
        std::vector<A> acc(static_cast<size_t>(dv > 0 ? dv : 1));
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; ++r) {
            const int64_t i = r % p.seqlen;
            const int64_t h = (r / p.seqlen) % p.num_heads;
            const int64_t b = r / (p.seqlen * p.num_heads);
            // lse = m + log(sum exp(lse_p - m)); NaN in any part makes the row NaN.
            A m = -std::numeric_limits<A>::infinity();
            bool nan = false;
            for (int64_t q = 0; q < n; ++q) {
                const A x = static_cast<A>(lse_at<A>(p, q, b, h, i));
                if (std::isnan(x)) nan = true;
                if (x > m) m = x;
            }
            T* dst = static_cast<T*>(p.out) + b * p.out_stride_batch + h * p.out_stride_head +
                     i * p.out_stride_seq;
            A lse;
            if (nan) {
                lse = std::numeric_limits<A>::quiet_NaN();
                for (int64_t d = 0; d < dv; ++d) store(dst, d, lse);
            } else if (m == -std::numeric_limits<A>::infinity()) {
                // Every part is empty: the empty-row rule, output 0 and lse -inf.
                lse = m;
                for (int64_t d = 0; d < dv; ++d) store(dst, d, A(0));
            } else {
                A total = 0;
                for (int64_t q = 0; q < n; ++q) {
                    total += std::exp(static_cast<A>(lse_at<A>(p, q, b, h, i)) - m);
                }
                lse = m + std::log(total);
                const A inv = A(1) / total;
                for (int64_t d = 0; d < dv; ++d) acc[d] = 0;
                for (int64_t q = 0; q < n; ++q) {
                    const A x = static_cast<A>(lse_at<A>(p, q, b, h, i));
                    if (x == -std::numeric_limits<A>::infinity()) continue;  // contributes nothing
                    const A w = std::exp(x - m) * inv;
                    const int64_t* s = p.out_strides + 3 * q;
                    const T* src = static_cast<const T*>(p.outs[q]) + b * s[0] + h * s[1] + i * s[2];
                    for (int64_t d = 0; d < dv; ++d) acc[d] += w * load(src, d);
                }
                for (int64_t d = 0; d < dv; ++d) store(dst, d, acc[d]);
            }
            if (p.lse != nullptr) static_cast<A*>(p.lse)[r] = lse;
        }
    }
}

}  // namespace

void merge_cpu(const MergeParams& p) {
    MHA_DTYPE_SWITCH(p.dtype, f16, bf16, T, A, [&] { merge_rows<T, A>(p); });
}

}  // namespace mha
