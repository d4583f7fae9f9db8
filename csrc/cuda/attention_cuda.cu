// CUDA backend, host side: stage the NumPy (host) arrays to the device keeping their strides,
// pick a kernel, launch, copy the outputs back.
//
// Paths:
//   fp16/bf16, dot score, max(D, Dv) <= 256, Lq >= kTcMinSeqQ   attention_tc_kernel (head dims
//                                         padded to 64, 96, 128 or 256), split over keys
//                                         when its blocks cannot fill the GPU, merged by
//                                         attention_combine_kernel
//   dot score, (Hq / Hk) * Lq <= 16 query rows per KV head, Lk >= 64
//                                         attention_decode_kernel (flash-decoding: a block per
//                                         (key split, KV head, batch)), merged by
//                                         attention_combine_kernel; MHA_EXT_CUDA_DECODE=0 off
//   everything else (float32, float64, General, Additive, other head dims, short Lq)
//                                         attention_simt_kernel, split over keys
//                                         (flash-decoding) when rows are few and Lk long,
//                                         merged by attention_combine_kernel
//   weights                               attention_weights_kernel after the forward
// Memory: each host thread keeps its device arena, a pinned host mirror of it and its timing
// events between calls (grown when a call needs more, freed at thread exit), so a call does
// no cudaMalloc/cudaFree/cudaEventCreate once warm. Inputs are gathered into the pinned
// mirror and go to the device in one copy; outputs come back through it.
// Environment knobs for tests and benchmarks: MHA_EXT_CUDA_SIMT=1 forces the SIMT path,
// MHA_EXT_CUDA_SPLITS=n forces n key chunks (SIMT, tensor-core and decode paths), MHA_EXT_CUDA_PINNED=0 copies
// straight from/to the (pageable) NumPy memory instead.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "cuda/attention_cuda.h"
#include "cuda/attention_kernels.cuh"
#include "switch.h"

namespace mha {

namespace {

using cuda::kSimtWarps;

constexpr int64_t kTcMinSeqQ = 16;           // shorter query blocks go to the split SIMT path
constexpr size_t kSmemDefaultLimit = 48 * 1024;  // dynamic shared memory without opt-in
constexpr int64_t kMaxSplits = 64;
constexpr size_t kDecodeSmemOptin = 96 * 1024;  // the decode kernel's opt-in ceiling

thread_local double g_last_kernel_ms = 0.0;
thread_local double g_last_copy_ms = 0.0;

[[noreturn]] void fail(const std::string& what, cudaError_t err) {
    throw std::runtime_error("device='cuda': " + what + " failed: " + cudaGetErrorName(err) +
                             " (" + cudaGetErrorString(err) + ")");
}

void check(cudaError_t err, const char* what) {
    if (err != cudaSuccess) {
        cudaGetLastError();  // clear a non-sticky error so later calls can still work
        fail(what, err);
    }
}

void check_launch(const char* kernel) {
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) fail(std::string("launching ") + kernel, err);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Elements [lo, lo + count) relative to a tensor's base pointer that its strides can reach.
struct Span {
    int64_t lo = 0;
    int64_t count = 0;  // 0: empty tensor
};

Span span_of(const int64_t (&sizes)[4], const int64_t (&strides)[4]) {
    Span s;
    int64_t lo = 0, hi = 0;
    for (int a = 0; a < 4; ++a) {
        if (sizes[a] <= 0) return s;
        const int64_t reach = strides[a] * (sizes[a] - 1);
        (reach < 0 ? lo : hi) += reach;
    }
    s.lo = lo;
    s.count = hi - lo + 1;
    return s;
}

// Per host thread, kept between calls: the device buffer the arena is carved from, its
// pinned host mirror, the timing events.
struct DeviceCache {
    char* device = nullptr;
    size_t device_bytes = 0;
    char* pinned = nullptr;
    size_t pinned_bytes = 0;
    cudaEvent_t ev[4] = {nullptr, nullptr, nullptr, nullptr};
    DeviceCache() = default;
    DeviceCache(const DeviceCache&) = delete;
    DeviceCache& operator=(const DeviceCache&) = delete;
    ~DeviceCache() {  // errors ignored: the runtime may already be shutting down
        if (device != nullptr) cudaFree(device);
        if (pinned != nullptr) cudaFreeHost(pinned);
        for (auto& e : ev) {
            if (e != nullptr) cudaEventDestroy(e);
        }
    }
};
thread_local DeviceCache g_cache;

size_t grown(size_t need, size_t have) {
    size_t n = have + have / 2;  // grow by half at least: fewer reallocations
    if (n < need) n = need;
    return (n + (size_t{1} << 20) - 1) / (size_t{1} << 20) * (size_t{1} << 20);
}

// One device allocation carved into buffers (the thread's cached one). Staged inputs keep
// their host address modulo 16, so a host row that is 16-byte aligned is aligned on the
// device too.
class Arena {
   public:
    // Reserves bytes; returns the offset. misalign < 16 is added to a 256-aligned start.
    size_t reserve(size_t bytes, size_t misalign = 0) {
        const size_t off = (total_ + 255) / 256 * 256 + misalign;
        total_ = off + bytes;
        return off;
    }
    void allocate(bool pinned) {
        if (total_ == 0) return;
        DeviceCache& c = g_cache;
        if (c.device_bytes < total_) {
            if (c.device != nullptr) cudaFree(c.device);
            c.device = nullptr;
            c.device_bytes = 0;
            size_t n = grown(total_, 0);
            cudaError_t err = cudaMalloc(&c.device, n);
            if (err != cudaSuccess) {  // the rounded size may not fit where the exact one does
                cudaGetLastError();
                n = total_;
                err = cudaMalloc(&c.device, n);
            }
            if (err != cudaSuccess) {
                cudaGetLastError();
                c.device = nullptr;
                throw std::runtime_error("device='cuda': out of device memory (needed " +
                                         std::to_string(total_) + " bytes): " +
                                         cudaGetErrorString(err));
            }
            c.device_bytes = n;
        }
        base_ = c.device;
        if (pinned && c.pinned_bytes < total_) {
            if (c.pinned != nullptr) cudaFreeHost(c.pinned);
            c.pinned = nullptr;
            c.pinned_bytes = 0;
            const size_t n = grown(total_, 0);
            if (cudaMallocHost(reinterpret_cast<void**>(&c.pinned), n) == cudaSuccess) {
                c.pinned_bytes = n;
            } else {
                cudaGetLastError();  // no pinned memory: the pageable path
                c.pinned = nullptr;
            }
        }
        mirror_ = pinned && c.pinned_bytes >= total_ ? c.pinned : nullptr;
    }
    char* at(size_t off) const { return base_ + off; }
    // The pinned host mirror of byte off (nullptr: copy from/to pageable memory directly).
    char* mirror(size_t off) const { return mirror_ == nullptr ? nullptr : mirror_ + off; }
    Arena() = default;
    Arena(const Arena&) = delete;
    Arena& operator=(const Arena&) = delete;

   private:
    char* base_ = nullptr;
    char* mirror_ = nullptr;
    size_t total_ = 0;
};

// A host tensor staged to the device: its span, and where it lives in the arena.
struct Staged {
    const char* host = nullptr;  // host address of the first spanned byte
    size_t bytes = 0;
    size_t off = 0;
    int64_t lo = 0;  // element offset of the first spanned element from the base pointer
    bool used = false;
};

Staged plan_stage(Arena& arena, const void* base, size_t elem, const Span& span) {
    Staged s;
    if (base == nullptr || span.count == 0) return s;
    s.host = static_cast<const char*>(base) + span.lo * static_cast<int64_t>(elem);
    s.bytes = static_cast<size_t>(span.count) * elem;
    s.off = arena.reserve(s.bytes, reinterpret_cast<uintptr_t>(s.host) % 16);
    s.lo = span.lo;
    s.used = true;
    return s;
}

// The device pointer that corresponds to the host base pointer.
template <typename P>
P device_base(const Arena& arena, const Staged& s, size_t elem) {
    if (!s.used) return nullptr;
    return reinterpret_cast<P>(arena.at(s.off) - s.lo * static_cast<int64_t>(elem));
}

// Inputs: gathered into the pinned mirror and sent in one copy of [lo, hi) by flush(), or
// (no mirror) one cudaMemcpy each from the pageable host memory. The range may also cover
// the output's bytes; the kernels overwrite those.
struct Uploads {
    size_t lo = SIZE_MAX, hi = 0;
    void add(const Arena& arena, const Staged& s) {
        if (!s.used) return;
        if (char* m = arena.mirror(s.off)) {
            std::memcpy(m, s.host, s.bytes);
            if (s.off < lo) lo = s.off;
            if (s.off + s.bytes > hi) hi = s.off + s.bytes;
        } else {
            check(cudaMemcpy(arena.at(s.off), s.host, s.bytes, cudaMemcpyHostToDevice),
                  "copying an input to the device");
        }
    }
    void flush(const Arena& arena, cudaStream_t stream) const {
        if (hi > lo) {
            check(cudaMemcpyAsync(arena.at(lo), arena.mirror(lo), hi - lo,
                                  cudaMemcpyHostToDevice, stream),
                  "copying the inputs to the device");
        }
    }
};

// bytes at arena offset off back to host memory (through the pinned mirror when there is one).
// The first of these after the kernels also surfaces their faults.
void download(const Arena& arena, size_t off, void* host, size_t bytes, cudaStream_t stream,
              const char* what) {
    if (bytes == 0) return;
    if (char* m = arena.mirror(off)) {
        check(cudaMemcpyAsync(m, arena.at(off), bytes, cudaMemcpyDeviceToHost, stream), what);
        check(cudaStreamSynchronize(stream), what);
        std::memcpy(host, m, bytes);
    } else {
        check(cudaMemcpy(host, arena.at(off), bytes, cudaMemcpyDeviceToHost), what);
    }
}

bool env_is_zero(const char* name) {
    const char* v = std::getenv(name);
    return v != nullptr && std::strcmp(v, "0") == 0;
}

bool env_flag(const char* name) {
    const char* v = std::getenv(name);
    return v != nullptr && v[0] != '\0' && std::strcmp(v, "0") != 0;
}

int64_t env_int(const char* name, int64_t fallback) {
    const char* v = std::getenv(name);
    if (v == nullptr || v[0] == '\0') return fallback;
    char* end = nullptr;
    const long long x = std::strtoll(v, &end, 10);
    return (end != nullptr && *end == '\0' && x > 0) ? static_cast<int64_t>(x) : fallback;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The thread's four timing events (created on first use, kept).
struct Events {
    cudaEvent_t* e;
    Events() : e(g_cache.ev) {
        for (int i = 0; i < 4; ++i) {
            if (e[i] == nullptr) check(cudaEventCreate(&e[i]), "cudaEventCreate");
        }
    }
};

// The SIMT / weights kernels of one (storage type, accumulation type).
template <typename T, typename A>
void run_simt(const AttentionParams& p, const cuda::SimtArgs<A>& args, int64_t num_splits,
              int64_t grid_x, size_t smem, cudaStream_t stream) {
    const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(num_splits));
    MHA_BOOL_SWITCH(p.score == Score::kAdditive, kAdditive, [&] {
        MHA_LAUNCH(grid, kSimtWarps * 32, smem, stream,
                   cuda::attention_simt_kernel<T, A, kAdditive>)(p, args);
    });
    check_launch("the attention kernel");
}

template <typename T, typename A>
void run_decode(const AttentionParams& p, const cuda::DecodeArgs<A>& args, int64_t num_splits,
                size_t smem, cudaStream_t stream) {
    const dim3 grid(static_cast<unsigned>(num_splits), static_cast<unsigned>(p.num_heads_k),
                    static_cast<unsigned>(p.batch));
    if (smem > kSmemDefaultLimit) {
        const cudaError_t err = cudaFuncSetAttribute(cuda::attention_decode_kernel<T, A>,
                                                     cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                     static_cast<int>(smem));
        if (err != cudaSuccess) {
            cudaGetLastError();  // not left for the next launch to report
            fail("raising the decode kernel's shared memory", err);
        }
    }
    MHA_LAUNCH(grid, cuda::kDecodeThreads, smem, stream, cuda::attention_decode_kernel<T, A>)(
        p, args);
    check_launch("the decode attention kernel");
}

// Merges num_splits partial (out, lse) rows by lse: one warp per query row, grid-stride past
// the grid cap.
template <typename T, typename A>
void run_combine(const AttentionParams& p, const A* part_out, const A* part_lse,
                 int64_t num_splits, A* lse, cudaStream_t stream) {
    const int64_t rows = p.batch * p.num_heads_q * p.seqlen_q;
    const int64_t grid_x = ceil_div(rows, kSimtWarps) < 65536 * 16 ? ceil_div(rows, kSimtWarps)
                                                                   : 65536 * 16;
    MHA_LAUNCH(static_cast<unsigned>(grid_x), kSimtWarps * 32, 0, stream,
               cuda::attention_combine_kernel<T, A>)(p, part_out, part_lse,
                                                     static_cast<int>(num_splits), lse);
    check_launch("the split-KV merge kernel");
}

template <typename T, typename A>
void run_weights(const AttentionParams& p, const cuda::SimtArgs<A>& args, const A* lse,
                 A* weights, int64_t grid_x, size_t smem, cudaStream_t stream) {
    const unsigned gx = static_cast<unsigned>(grid_x);
    MHA_BOOL_SWITCH(p.score == Score::kAdditive, kAdditive, [&] {
        MHA_LAUNCH(gx, kSimtWarps * 32, smem, stream,
                   cuda::attention_weights_kernel<T, A, kAdditive>)(p, args, lse, weights);
    });
    check_launch("the attention weights kernel");
}

template <typename T, typename A>
void run_project(const T* x, int64_t batch, int64_t heads, int64_t seq, int64_t dim,
                 int64_t sb, int64_t sh, int64_t ss, const A* w, int64_t n_out, A mul,
                 const int64_t* key_lengths, A* y, cudaStream_t stream) {
    const int64_t total = batch * heads * seq * n_out;
    if (total == 0) return;
    const int64_t blocks = ceil_div(total, 256) < 65536 * 8 ? ceil_div(total, 256) : 65536 * 8;
    MHA_LAUNCH(static_cast<unsigned>(blocks), 256, 0, stream, cuda::project_rows_kernel<T, A>)(
        x, batch, heads, seq, dim, sb, sh, ss, w, n_out, mul, key_lengths, y);
    check_launch("the score projection kernel");
}

// What attention_forward_cuda decided for one call: where each device buffer lives in the
// arena, which kernels run and their geometry. Filled on the host before anything launches.
struct LaunchPlan {
    Staged out;  // the output's staging (copied back at the end)
    size_t off_qproj = 0, off_kproj = 0;  // score projections (General / Additive)
    size_t off_lse = 0, off_weights = 0;  // lse (also for the weights pass), weights
    size_t off_part = 0;                   // split-KV partials
    size_t off_scratch = 0, off_wscratch = 0;  // per-warp scratch when shared memory is short
    bool use_tc = false;   // the tensor-core kernel (fp16/bf16, dot score)
    bool use_decode = false;  // the flash-decoding kernel
    int dec_tile = 0, dec_pitch = 0, dec_rows = 0;
    bool dec_vec = false;
    int64_t dec_splits = 1, dec_split = 1;
    size_t dec_smem = 0, off_dpart = 0;
    bool tc_vec = false;   // its rows are 16-byte aligned: cp.async
    int64_t tc_splits = 1, tc_split = 0;  // its key chunks (split over keys)
    size_t off_tpart = 0;                 // their partials
    bool k_vec = false;    // the SIMT kernels read keys as 16-byte vectors
    int64_t num_splits = 1, split_size = 1;  // split-KV geometry (SIMT path)
    int64_t grid_x = 0, wgrid_x = 0;         // SIMT / weights grid
    size_t simt_smem = 0, w_smem = 0;        // their dynamic shared memory (0: global scratch)
};

// Everything after staging, for one (storage type T, accumulation type A).
template <typename T, typename A>
void forward(const AttentionParams& hp, const AttentionParams& d, Arena& arena,
             const LaunchPlan& plan, Events& ev) {
    const cudaStream_t stream = 0;
    const Staged& out_st = plan.out;
    const size_t off_qproj = plan.off_qproj, off_kproj = plan.off_kproj;
    const size_t off_lse = plan.off_lse, off_weights = plan.off_weights;
    const size_t off_part = plan.off_part, off_scratch = plan.off_scratch;
    const size_t off_wscratch = plan.off_wscratch;
    const bool use_tc = plan.use_tc, tc_vec = plan.tc_vec, k_vec = plan.k_vec;
    const int64_t num_splits = plan.num_splits, split_size = plan.split_size;
    const int64_t grid_x = plan.grid_x, wgrid_x = plan.wgrid_x;
    const size_t simt_smem = plan.simt_smem, w_smem = plan.w_smem;
    const int64_t rows = hp.batch * hp.num_heads_q * hp.seqlen_q;
    const bool need_lse = hp.lse != nullptr || hp.weights != nullptr;
    A* lse = need_lse ? reinterpret_cast<A*>(arena.at(off_lse)) : nullptr;

    cuda::SimtArgs<A> args;
    args.lse = lse;
    args.split_size = split_size;
    args.k_vec = k_vec;
    if (hp.score == Score::kDot) {
        args.dqk = hp.head_dim;
    } else if (hp.score == Score::kGeneral) {
        args.dqk = hp.head_dim_k;
    } else {
        args.dqk = hp.score_dim;
    }

    check(cudaEventRecord(ev.e[1], stream), "cudaEventRecord");
    if (hp.score != Score::kDot) {
        A* qp = reinterpret_cast<A*>(arena.at(off_qproj));
        const A* wq = static_cast<const A*>(d.score_wq);
        const A mul = hp.score == Score::kGeneral ? static_cast<A>(hp.scale) : A(1);
        run_project<T, A>(static_cast<const T*>(d.q), hp.batch, hp.num_heads_q, hp.seqlen_q,
                          hp.head_dim, hp.q_stride_batch, hp.q_stride_head, hp.q_stride_seq,
                          wq, args.dqk, mul, nullptr, qp, stream);
        args.q_proj = qp;
        if (hp.score == Score::kAdditive) {
            A* kp = reinterpret_cast<A*>(arena.at(off_kproj));
            if (hp.seqlen_k > 0) {
                run_project<T, A>(static_cast<const T*>(d.k), hp.batch, hp.num_heads_k,
                                  hp.seqlen_k, hp.head_dim_k, hp.k_stride_batch,
                                  hp.k_stride_head, hp.k_stride_seq,
                                  static_cast<const A*>(d.score_wk), args.dqk, A(1),
                                  d.key_lengths, kp, stream);
            }
            args.k_proj = kp;
            args.w_vec = static_cast<const A*>(d.score_w);
        }
    }

    if (use_tc) {
        if constexpr (sizeof(T) == 2) {
            cuda::TcArgs targs;
            targs.lse = reinterpret_cast<float*>(lse);
            targs.vec = tc_vec;
            if (plan.tc_splits > 1) {
                targs.num_splits = static_cast<int>(plan.tc_splits);
                targs.split_size = plan.tc_split;
                targs.part_out = reinterpret_cast<float*>(arena.at(plan.off_tpart));
                targs.part_lse = targs.part_out + plan.tc_splits * rows * hp.head_dim_v;
            }
            cuda::launch_attention_tc(d, targs, stream);
            if (plan.tc_splits > 1) {
                run_combine<T, A>(d, targs.part_out, targs.part_lse, plan.tc_splits, lse, stream);
            }
        }
    } else if (plan.use_decode) {
        cuda::DecodeArgs<A> da;
        da.tile_n = plan.dec_tile;
        da.pitch = plan.dec_pitch;
        da.rows = plan.dec_rows;
        da.split_size = plan.dec_split;
        da.vec = plan.dec_vec;
        da.part_out = reinterpret_cast<A*>(arena.at(plan.off_dpart));
        da.part_lse = da.part_out + plan.dec_splits * rows * hp.head_dim_v;
        run_decode<T, A>(d, da, plan.dec_splits, plan.dec_smem, stream);
        run_combine<T, A>(d, da.part_out, da.part_lse, plan.dec_splits, lse, stream);
    } else {
        args.scratch = simt_smem == 0 ? reinterpret_cast<A*>(arena.at(off_scratch)) : nullptr;
        if (num_splits > 1) {
            args.part_out = reinterpret_cast<A*>(arena.at(off_part));
            args.part_lse = args.part_out + num_splits * rows * hp.head_dim_v;
        }
        run_simt<T, A>(d, args, num_splits, grid_x, simt_smem, stream);
        if (num_splits > 1) {
            run_combine<T, A>(d, args.part_out, args.part_lse, num_splits, lse, stream);
        }
    }
    if (hp.weights != nullptr) {
        args.scratch = w_smem == 0 ? reinterpret_cast<A*>(arena.at(off_wscratch)) : nullptr;
        run_weights<T, A>(d, args, lse, reinterpret_cast<A*>(arena.at(off_weights)), wgrid_x,
                          w_smem, stream);
    }
    check(cudaEventRecord(ev.e[2], stream), "cudaEventRecord");

    // Outputs back to the host (a synchronous copy also surfaces kernel faults).
    if (out_st.used) {
        download(arena, out_st.off, const_cast<char*>(out_st.host), out_st.bytes, stream,
                 "running the attention kernels / copying the output back");
    }
    if (hp.lse != nullptr) {
        download(arena, off_lse, hp.lse, static_cast<size_t>(rows) * sizeof(A), stream,
                 "copying lse back");
    }
    if (hp.weights != nullptr) {
        download(arena, off_weights, hp.weights,
                 static_cast<size_t>(rows * hp.seqlen_k) * sizeof(A), stream,
                 "copying the weights back");
    }
    check(cudaEventRecord(ev.e[3], stream), "cudaEventRecord");
    check(cudaEventSynchronize(ev.e[3]), "running the attention kernels");
}

}  // namespace

bool cuda_device_available() {
    int count = 0;
    const cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) {
        cudaGetLastError();
        return false;
    }
    return count > 0;
}

double attention_cuda_last_kernel_ms() { return g_last_kernel_ms; }
double attention_cuda_last_copy_ms() { return g_last_copy_ms; }

void attention_forward_cuda(const AttentionParams& hp) {
    {
        int count = 0;
        const cudaError_t err = cudaGetDeviceCount(&count);
        if (err != cudaSuccess || count == 0) {
            cudaGetLastError();
            // No driver at all reads as "driver version is insufficient": say what it means.
            throw std::runtime_error(
                std::string("device='cuda': no usable CUDA GPU on this machine "
                            "(cudaGetDeviceCount: ") +
                (err != cudaSuccess ? cudaGetErrorString(err) : "0 devices") +
                "; is an NVIDIA GPU with its driver installed?); use device='cpu' or "
                "device='auto'");
        }
    }
    int dev = 0;
    check(cudaGetDevice(&dev), "cudaGetDevice");
    int num_sms = 0;
    check(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, dev),
          "cudaDeviceGetAttribute");

    const bool dbl = dtype_accumulates_in_double(hp.dtype);
    const bool half = hp.dtype == DType::kFloat16 || hp.dtype == DType::kBFloat16;
    const size_t es = static_cast<size_t>(dtype_size(hp.dtype));
    const size_t as = dbl ? 8 : 4;
    const int64_t B = hp.batch, Hq = hp.num_heads_q, Hk = hp.num_heads_k;
    const int64_t Lq = hp.seqlen_q, Lk = hp.seqlen_k;
    const int64_t D = hp.head_dim, Dk = hp.head_dim_k, Dv = hp.head_dim_v;
    const int64_t rows = B * Hq * Lq;
    const int64_t dqk = hp.score == Score::kDot       ? D
                        : hp.score == Score::kGeneral ? Dk
                                                      : hp.score_dim;

    // --- Plan the device memory -----------------------------------------------------------
    Arena arena;
    const Span q_span = span_of({B, Hq, Lq, D},
                                {hp.q_stride_batch, hp.q_stride_head, hp.q_stride_seq, 1});
    const Span k_span = span_of({B, Hk, Lk, Dk},
                                {hp.k_stride_batch, hp.k_stride_head, hp.k_stride_seq, 1});
    const Span v_span = span_of({B, Hk, Lk, Dv},
                                {hp.v_stride_batch, hp.v_stride_head, hp.v_stride_seq, 1});
    const Span o_span = span_of({B, Hq, Lq, Dv}, {hp.out_stride_batch, hp.out_stride_head,
                                                  hp.out_stride_seq, 1});
    const Span m_span = span_of({B, Hq, Lq, Lk}, {hp.mask_stride_batch, hp.mask_stride_head,
                                                  hp.mask_stride_q, hp.mask_stride_k});
    const Span b_span = span_of({B, Hq, Lq, Lk}, {hp.bias_stride_batch, hp.bias_stride_head,
                                                  hp.bias_stride_q, hp.bias_stride_k});
    const Staged q_st = plan_stage(arena, hp.q, es, q_span);
    const Staged k_st = plan_stage(arena, hp.k, es, k_span);
    const Staged v_st = plan_stage(arena, hp.v, es, v_span);
    const Staged o_st = plan_stage(arena, hp.out, es, o_span);
    const Staged m_st = plan_stage(arena, hp.mask, 1, m_span);
    const Staged b_st = plan_stage(arena, hp.bias, as, b_span);
    const Staged kl_st = plan_stage(arena, hp.key_lengths, 8, Span{0, B});
    Staged wq_st, wk_st, w_st;
    if (hp.score == Score::kGeneral) {
        wq_st = plan_stage(arena, hp.score_wq, as, Span{0, D * Dk});
    } else if (hp.score == Score::kAdditive) {
        wq_st = plan_stage(arena, hp.score_wq, as, Span{0, D * hp.score_dim});
        wk_st = plan_stage(arena, hp.score_wk, as, Span{0, Dk * hp.score_dim});
        w_st = plan_stage(arena, hp.score_w, as, Span{0, hp.score_dim});
    }
    const size_t off_qproj =
        hp.score != Score::kDot ? arena.reserve(static_cast<size_t>(rows * dqk) * as) : 0;
    const size_t off_kproj =
        hp.score == Score::kAdditive ? arena.reserve(static_cast<size_t>(B * Hk * Lk * dqk) * as)
                                     : 0;
    const bool need_lse = hp.lse != nullptr || hp.weights != nullptr;
    const size_t off_lse = need_lse ? arena.reserve(static_cast<size_t>(rows) * as) : 0;
    const size_t off_weights =
        hp.weights != nullptr ? arena.reserve(static_cast<size_t>(rows * Lk) * as) : 0;

    // --- Pick the path --------------------------------------------------------------------
    const bool force_simt = env_flag("MHA_EXT_CUDA_SIMT");
    const bool use_tc = half && hp.score == Score::kDot && Lk > 0 &&
                        (D > Dv ? D : Dv) <= cuda::kTcMaxHeadDim && Lq >= kTcMinSeqQ &&
                        !force_simt;

    // Split over keys on the tensor-core path: when the (query tile, batch, head) blocks
    // cannot fill the GPU (short Lq, few heads, long keys), cut the keys into chunks of
    // whole tiles, about two blocks per SM in all, at least two tiles per chunk; merged by
    // lse like the SIMT splits. MHA_EXT_CUDA_SPLITS=n forces n chunks.
    int64_t tc_splits = 1, tc_split = 0;
    if (use_tc) {
        constexpr int64_t kTcTileM = 64, kTcTileN = 64;  // a chunk is whole tiles of either width
        const int64_t blocks = ceil_div(Lq, kTcTileM) * B * Hq;
        int64_t want = env_int("MHA_EXT_CUDA_SPLITS", 0);
        if (want == 0 && blocks < static_cast<int64_t>(num_sms) && Lk >= 4 * kTcTileN) {
            want = ceil_div(static_cast<int64_t>(num_sms) * 2, blocks);
            const int64_t by_len = ceil_div(Lk, 2 * kTcTileN);
            if (want > by_len) want = by_len;
        }
        if (want > kMaxSplits) want = kMaxSplits;
        if (want > 1) {
            tc_split = ceil_div(ceil_div(Lk, want), kTcTileN) * kTcTileN;
            tc_splits = ceil_div(Lk, tc_split);
        }
    }
    const size_t off_tpart =
        tc_splits > 1 ? arena.reserve(static_cast<size_t>(tc_splits * rows * (Dv + 1)) *
                                      sizeof(float))
                      : 0;

    // Flash-decoding: few query rows per KV head (the GQA group times Lq), long keys.
    const int64_t dec_rows = Hk > 0 ? (Hq / Hk) * Lq : 0;
    int dec_tile = 0;
    const int dec_pitch = static_cast<int>(ceil_div(D > Dv ? D : Dv, 8) * 8);
    size_t dec_smem = 0;
    if (!use_tc && !force_simt && !env_is_zero("MHA_EXT_CUDA_DECODE") &&
        hp.score == Score::kDot && Lk >= 64 && dec_rows >= 1 &&
        dec_rows <= cuda::kDecodeMaxRows && Hk <= 65535 && B <= 65535) {
        // The largest tile within the default 48 KB, else within 96 KB (opt-in; A100/H100).
        for (size_t limit : {kSmemDefaultLimit, kDecodeSmemOptin}) {
            for (int tn : {64, 32, 16, 8}) {
                const size_t bytes = cuda::decode_smem_bytes(static_cast<int>(dec_rows), D, Dv,
                                                             tn, dec_pitch, es, as);
                if (dec_tile == 0 && bytes <= limit) {
                    dec_tile = tn;
                    dec_smem = bytes;
                }
            }
        }
    }
    const bool use_decode = dec_tile > 0;
    int64_t dec_splits = 1, dec_split = Lk;
    if (use_decode) {
        int64_t want = env_int("MHA_EXT_CUDA_SPLITS", 0);
        if (want == 0) {  // about two blocks per SM, at least two tiles per split
            want = ceil_div(static_cast<int64_t>(num_sms) * 2, B * Hk);
            const int64_t by_len = ceil_div(Lk, static_cast<int64_t>(dec_tile) * 2);
            if (want > by_len) want = by_len;
        }
        if (want > kMaxSplits) want = kMaxSplits;
        if (want < 1) want = 1;
        dec_split = ceil_div(ceil_div(Lk, want), dec_tile) * dec_tile;
        dec_splits = ceil_div(Lk, dec_split);
    }
    const size_t off_dpart =
        use_decode ? arena.reserve(static_cast<size_t>(dec_splits * rows * (Dv + 1)) * as) : 0;

    // SIMT geometry: per-warp scratch of dqk + Dv accumulators in shared memory when it fits.
    const size_t simt_bytes = static_cast<size_t>(kSimtWarps) * (dqk + Dv) * as;
    const bool simt_in_smem = simt_bytes <= kSmemDefaultLimit;
    const bool use_simt = !use_tc && !use_decode;
    int64_t num_splits = 1;
    if (use_simt && simt_in_smem) {
        const int64_t target_warps = static_cast<int64_t>(num_sms) * 32;
        int64_t want = env_int("MHA_EXT_CUDA_SPLITS", 0);
        if (want == 0 && Lk >= 512 && rows < target_warps) {
            want = ceil_div(target_warps, rows);
            const int64_t by_len = ceil_div(Lk, 128);
            if (want > by_len) want = by_len;
        }
        if (want > kMaxSplits) want = kMaxSplits;
        if (want > 1 && Lk > 0) num_splits = want;
    }
    int64_t split_size = Lk > 0 ? Lk : 1;
    if (num_splits > 1) {
        split_size = ceil_div(ceil_div(Lk, num_splits), 32) * 32;
        num_splits = ceil_div(Lk, split_size);
    }
    int64_t grid_x = ceil_div(rows, kSimtWarps);
    const int64_t grid_cap = simt_in_smem ? (int64_t{1} << 30) : 128;
    if (grid_x > grid_cap) grid_x = grid_cap;
    const size_t off_part =
        (use_simt && num_splits > 1)
            ? arena.reserve(static_cast<size_t>(num_splits * rows * (Dv + 1)) * as)
            : 0;
    const size_t off_scratch =
        (use_simt && !simt_in_smem)
            ? arena.reserve(static_cast<size_t>(grid_x * kSimtWarps * (dqk + Dv)) * as)
            : 0;
    // Weights kernel: per-warp query vector.
    const size_t w_bytes = static_cast<size_t>(kSimtWarps) * dqk * as;
    const bool w_in_smem = w_bytes <= kSmemDefaultLimit;
    int64_t wgrid_x = ceil_div(rows, kSimtWarps);
    const int64_t wgrid_cap = w_in_smem ? (int64_t{1} << 30) : 128;
    if (wgrid_x > wgrid_cap) wgrid_x = wgrid_cap;
    const size_t off_wscratch =
        (hp.weights != nullptr && !w_in_smem)
            ? arena.reserve(static_cast<size_t>(wgrid_x * kSimtWarps * dqk) * as)
            : 0;

    arena.allocate(!env_is_zero("MHA_EXT_CUDA_PINNED"));

    // --- Device view of the parameters ----------------------------------------------------
    AttentionParams d = hp;
    d.q = device_base<const void*>(arena, q_st, es);
    d.k = device_base<const void*>(arena, k_st, es);
    d.v = device_base<const void*>(arena, v_st, es);
    d.out = device_base<void*>(arena, o_st, es);
    d.mask = device_base<const uint8_t*>(arena, m_st, 1);
    d.bias = device_base<const void*>(arena, b_st, as);
    d.key_lengths = device_base<const int64_t*>(arena, kl_st, 8);
    d.score_wq = device_base<const void*>(arena, wq_st, as);
    d.score_wk = device_base<const void*>(arena, wk_st, as);
    d.score_w = device_base<const void*>(arena, w_st, as);
    d.weights = nullptr;
    d.lse = nullptr;

    // 16-byte rows for cp.async / vector loads: aligned base and strides, D % 8 == 0.
    auto strides_ok = [&](int64_t a, int64_t b, int64_t c) {
        const int64_t e = static_cast<int64_t>(es);
        return (a * e) % 16 == 0 && (b * e) % 16 == 0 && (c * e) % 16 == 0;
    };
    const bool tc_vec = use_tc && D % 8 == 0 && Dv % 8 == 0 && aligned16(d.q) &&
                        aligned16(d.k) && aligned16(d.v) &&
                        strides_ok(hp.q_stride_batch, hp.q_stride_head, hp.q_stride_seq) &&
                        strides_ok(hp.k_stride_batch, hp.k_stride_head, hp.k_stride_seq) &&
                        strides_ok(hp.v_stride_batch, hp.v_stride_head, hp.v_stride_seq);
    const int64_t per16 = 16 / static_cast<int64_t>(es);
    const bool dec_vec = use_decode && D % per16 == 0 && Dv % per16 == 0 && aligned16(d.k) &&
                         aligned16(d.v) &&
                         strides_ok(hp.k_stride_batch, hp.k_stride_head, hp.k_stride_seq) &&
                         strides_ok(hp.v_stride_batch, hp.v_stride_head, hp.v_stride_seq);
    const bool k_vec = hp.score != Score::kAdditive && d.k != nullptr && aligned16(d.k) &&
                       (Dk * static_cast<int64_t>(es)) % 16 == 0 &&
                       strides_ok(hp.k_stride_batch, hp.k_stride_head, hp.k_stride_seq);

    // --- Run ------------------------------------------------------------------------------
    Events ev;
    check(cudaEventRecord(ev.e[0], 0), "cudaEventRecord");
    Uploads up;
    const Staged* inputs[] = {&q_st, &k_st, &v_st, &m_st, &b_st, &kl_st, &wq_st, &wk_st, &w_st};
    for (const Staged* st : inputs) up.add(arena, *st);
    // An output with gaps between its rows: keep the host bytes of the gaps.
    if (o_st.used && o_span.count != B * Hq * Lq * Dv) up.add(arena, o_st);
    up.flush(arena, 0);

    LaunchPlan plan;
    plan.out = o_st;
    plan.off_qproj = off_qproj, plan.off_kproj = off_kproj;
    plan.off_lse = off_lse, plan.off_weights = off_weights;
    plan.off_part = off_part, plan.off_scratch = off_scratch, plan.off_wscratch = off_wscratch;
    plan.use_tc = use_tc, plan.tc_vec = tc_vec, plan.k_vec = k_vec;
    plan.tc_splits = tc_splits, plan.tc_split = tc_split, plan.off_tpart = off_tpart;
    plan.use_decode = use_decode, plan.dec_tile = dec_tile, plan.dec_pitch = dec_pitch;
    plan.dec_rows = static_cast<int>(dec_rows), plan.dec_vec = dec_vec;
    plan.dec_splits = dec_splits, plan.dec_split = dec_split;
    plan.dec_smem = dec_smem, plan.off_dpart = off_dpart;
    plan.num_splits = num_splits, plan.split_size = split_size;
    plan.grid_x = grid_x, plan.wgrid_x = wgrid_x;
    plan.simt_smem = simt_in_smem ? simt_bytes : 0;
    plan.w_smem = w_in_smem ? w_bytes : 0;
    MHA_DTYPE_SWITCH(hp.dtype, __half, __nv_bfloat16, T, A,
                     [&] { forward<T, A>(hp, d, arena, plan, ev); });

    float h2d = 0.0f, kernels = 0.0f, d2h = 0.0f;
    check(cudaEventElapsedTime(&h2d, ev.e[0], ev.e[1]), "cudaEventElapsedTime");
    check(cudaEventElapsedTime(&kernels, ev.e[1], ev.e[2]), "cudaEventElapsedTime");
    check(cudaEventElapsedTime(&d2h, ev.e[2], ev.e[3]), "cudaEventElapsedTime");
    g_last_kernel_ms = kernels;
    g_last_copy_ms = static_cast<double>(h2d) + d2h;
}

}  // namespace mha
