// mha_bench: native microbenchmark of mha::attention_forward, no Python in the loop.
//
// Fills one mha::AttentionParams per configuration, validates it once against the naive
// kernel (params.naive = true) on a few rows, then times the blocked kernel: `--warmup`
// untimed calls, then `--iters` samples, each sample a loop of calls long enough to last
// `--min-time` seconds; the median and the minimum of the per-call times are reported.
//
// FLOPs are counted the FlashAttention way: 4 * B * Hq * Lq * Lk_visible * D, halved for
// causal with Lq = Lk (Lk_visible = Lk minus the padded keys of the mask / key_lengths
// variants, i.e. only the work that has to be done is counted). Decode (Lq = 1) also
// reports GB/s of K + V read (2 * B * Hk * Lk * D * sizeof(T)).
//
// Usage: mha_bench --help
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "dispatch.h"
#include "params.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

enum class Variant { kNone, kCausal, kMask, kKeyLengths, kDecode };

const char* variant_name(Variant v) {
    switch (v) {
        case Variant::kNone: return "none";
        case Variant::kCausal: return "causal";
        case Variant::kMask: return "mask";
        case Variant::kKeyLengths: return "key_lengths";
        case Variant::kDecode: return "decode";
    }
    return "?";
}

bool parse_variant(const std::string& s, Variant* v) {
    if (s == "none") *v = Variant::kNone;
    else if (s == "causal") *v = Variant::kCausal;
    else if (s == "mask") *v = Variant::kMask;
    else if (s == "key_lengths" || s == "kl") *v = Variant::kKeyLengths;
    else if (s == "decode") *v = Variant::kDecode;
    else return false;
    return true;
}

struct Config {
    std::string name;
    int64_t batch = 1, heads_q = 8, heads_k = 8, seqlen_q = 2048, seqlen_k = 2048, head_dim = 64;
    Variant variant = Variant::kNone;
};

// The SPEC section 7 matrix (B = 1, H = 8 unless stated), and a small subset for smoke runs.
std::vector<Config> make_matrix(bool quick) {
    std::vector<Config> m;
    const std::vector<int64_t> dims = {64, 128};
    const std::vector<int64_t> lens = quick ? std::vector<int64_t>{512, 2048}
                                            : std::vector<int64_t>{512, 1024, 2048, 4096, 8192};
    for (int64_t d : dims) {
        for (int64_t l : lens) {
            for (Variant v : {Variant::kNone, Variant::kCausal}) {
                Config c;
                c.seqlen_q = c.seqlen_k = l;
                c.head_dim = d;
                c.variant = v;
                c.name = "fwd_d" + std::to_string(d) + "_l" + std::to_string(l) +
                         (v == Variant::kCausal ? "_causal" : "");
                m.push_back(c);
            }
        }
    }
    for (int64_t d : dims) {
        if (quick && d != 64) continue;
        for (Variant v : {Variant::kMask, Variant::kKeyLengths}) {
            Config c;
            c.seqlen_q = c.seqlen_k = 2048;
            c.head_dim = d;
            c.variant = v;
            c.name = std::string(v == Variant::kMask ? "mask" : "kl") + "_d" + std::to_string(d) +
                     "_l2048";
            m.push_back(c);
        }
    }
    Config dec;
    dec.name = "decode";
    dec.seqlen_q = 1;
    dec.seqlen_k = 32768;
    dec.heads_q = dec.heads_k = quick ? 8 : 32;
    dec.head_dim = 128;
    dec.variant = Variant::kDecode;
    m.push_back(dec);
    return m;
}

struct Options {
    std::vector<std::string> configs;  // exact names from --list
    std::string filter;                // substring filter on names
    bool quick = false;
    bool custom = false;
    Config custom_config;
    int threads = 0;  // 0: OpenMP default
    int iters = 7;
    int warmup = 1;
    double min_time = 0.05;
    double pad = 0.125;  // padded fraction of the keys for the mask / key_lengths variants
    bool validate = true;
    bool naive = false;  // time the naive kernel instead (slow; a sanity check only)
    bool membw = false;
    bool list = false;
    std::string json;  // "" none, "-" stdout, else a path
    bool use_f64 = false;
};

void usage() {
    std::printf(
        "mha_bench: time mha::attention_forward without Python.\n"
        "\n"
        "  --list                 print the built-in configuration names and exit\n"
        "  --quick                a small matrix (D 64/128, L 512/2048, decode with Hq = 8)\n"
        "  --config NAME          run one built-in configuration (repeatable)\n"
        "  --filter SUBSTR        run the built-in configurations whose name contains SUBSTR\n"
        "  --shape B,Hq,Hk,Lq,Lk,D  run one custom shape (with --variant)\n"
        "  --variant V            none | causal | mask | key_lengths | decode (custom shape)\n"
        "  --threads N            OpenMP threads for the kernel (default: OpenMP default)\n"
        "  --iters N              timed samples, median reported (default 7, minimum 5 advised)\n"
        "  --warmup N             untimed calls before timing (default 1)\n"
        "  --min-time S           seconds per sample; short calls are looped (default 0.05)\n"
        "  --pad F                padded key fraction for mask / key_lengths (default 0.125)\n"
        "  --dtype float32|float64  element type (default float32)\n"
        "  --naive                time the naive one-row kernel instead of the blocked one\n"
        "  --no-validate          skip the check against the naive kernel\n"
        "  --membw                also measure memory read bandwidth (OpenMP sum of 1 GiB)\n"
        "  --json PATH            write the results as JSON to PATH ('-' for stdout)\n"
        "\n"
        "Default: the full SPEC section 7 matrix (B = 1, H = 8; decode Hq = Hk = 32).\n");
}

bool parse_shape(const char* s, Config* c) {
    long long b, hq, hk, lq, lk, d;
    if (std::sscanf(s, "%lld,%lld,%lld,%lld,%lld,%lld", &b, &hq, &hk, &lq, &lk, &d) != 6) {
        return false;
    }
    c->batch = b, c->heads_q = hq, c->heads_k = hk, c->seqlen_q = lq, c->seqlen_k = lk,
    c->head_dim = d;
    return b >= 1 && hq >= 1 && hk >= 1 && lq >= 1 && lk >= 1 && d >= 1;
}

Options parse_args(int argc, char** argv) {
    Options o;
    std::string variant = "none";
    auto need = [&](int& i) -> const char* {
        if (i + 1 >= argc) {
            std::fprintf(stderr, "mha_bench: %s needs a value\n", argv[i]);
            std::exit(2);
        }
        return argv[++i];
    };
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        if (a == "--help" || a == "-h") {
            usage();
            std::exit(0);
        } else if (a == "--list") {
            o.list = true;
        } else if (a == "--quick") {
            o.quick = true;
        } else if (a == "--config") {
            o.configs.push_back(need(i));
        } else if (a == "--filter") {
            o.filter = need(i);
        } else if (a == "--shape") {
            o.custom = true;
            if (!parse_shape(need(i), &o.custom_config)) {
                std::fprintf(stderr, "mha_bench: --shape expects B,Hq,Hk,Lq,Lk,D (all >= 1)\n");
                std::exit(2);
            }
        } else if (a == "--variant") {
            variant = need(i);
        } else if (a == "--threads") {
            o.threads = std::atoi(need(i));
        } else if (a == "--iters") {
            o.iters = std::max(1, std::atoi(need(i)));
        } else if (a == "--warmup") {
            o.warmup = std::max(0, std::atoi(need(i)));
        } else if (a == "--min-time") {
            o.min_time = std::atof(need(i));
        } else if (a == "--pad") {
            o.pad = std::atof(need(i));
        } else if (a == "--dtype") {
            const std::string t = need(i);
            if (t != "float32" && t != "float64") {
                std::fprintf(stderr, "mha_bench: --dtype must be float32 or float64\n");
                std::exit(2);
            }
            o.use_f64 = t == "float64";
        } else if (a == "--naive") {
            o.naive = true;
        } else if (a == "--no-validate") {
            o.validate = false;
        } else if (a == "--membw") {
            o.membw = true;
        } else if (a == "--json") {
            o.json = need(i);
        } else {
            std::fprintf(stderr, "mha_bench: unknown argument '%s' (see --help)\n", a.c_str());
            std::exit(2);
        }
    }
    if (!parse_variant(variant, &o.custom_config.variant)) {
        std::fprintf(stderr, "mha_bench: unknown --variant '%s'\n", variant.c_str());
        std::exit(2);
    }
    if (o.pad < 0.0 || o.pad >= 1.0) {
        std::fprintf(stderr, "mha_bench: --pad must be in [0, 1)\n");
        std::exit(2);
    }
    if (o.custom) {
        Config& c = o.custom_config;
        c.name = "custom";
        if (c.variant == Variant::kDecode && c.seqlen_q != 1) {
            std::fprintf(stderr, "mha_bench: --variant decode needs Lq = 1\n");
            std::exit(2);
        }
    }
    return o;
}

// A 64-byte aligned buffer of n elements.
template <typename T>
struct Buffer {
    T* ptr = nullptr;
    size_t n = 0;
    explicit Buffer(size_t count) : n(count) {
        const size_t bytes = ((count * sizeof(T) + 63) / 64) * 64;
        ptr = static_cast<T*>(std::aligned_alloc(64, bytes == 0 ? 64 : bytes));
        if (ptr == nullptr) throw std::bad_alloc();
    }
    ~Buffer() { std::free(ptr); }
    Buffer(const Buffer&) = delete;
    Buffer& operator=(const Buffer&) = delete;
};

template <typename T>
void fill_normal(Buffer<T>& buf, uint64_t seed) {
    // Chunked so that large buffers fill in parallel and are first-touched by the workers.
    const int64_t n = static_cast<int64_t>(buf.n);
    const int64_t chunk = 1 << 20;
#ifdef _OPENMP
#pragma omp parallel for schedule(static)
#endif
    for (int64_t start = 0; start < n; start += chunk) {
        std::mt19937_64 gen(seed * 0x9E3779B97F4A7C15ULL + static_cast<uint64_t>(start));
        std::normal_distribution<double> dist(0.0, 1.0);
        const int64_t end = std::min(n, start + chunk);
        for (int64_t i = start; i < end; ++i) buf.ptr[i] = static_cast<T>(dist(gen));
    }
}

struct Result {
    Config config;
    int threads = 0;
    int iters = 0;
    int64_t calls_per_sample = 0;
    int64_t visible_keys = 0;
    double ms_median = 0, ms_min = 0;
    double gflops = 0, gbps = 0;
    double max_abs_err = -1;  // vs the naive kernel on the checked rows; -1 when not checked
};

double now_s() {
    using clock = std::chrono::steady_clock;
    return std::chrono::duration<double>(clock::now().time_since_epoch()).count();
}

double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    const size_t n = v.size();
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

template <typename T>
Result run_config(const Config& c, const Options& o) {
    const int64_t B = c.batch, Hq = c.heads_q, Hk = c.heads_k, Lq = c.seqlen_q, Lk = c.seqlen_k,
                  D = c.head_dim;
    if (Hq % Hk != 0) throw std::invalid_argument("Hq must be a multiple of Hk");
    // q, k, v, out: C-contiguous (B, H, L, D), the "bhld" layout.
    Buffer<T> q(B * Hq * Lq * D), k(B * Hk * Lk * D), v(B * Hk * Lk * D), out(B * Hq * Lq * D);
    fill_normal(q, 1);
    fill_normal(k, 2);
    fill_normal(v, 3);
    std::memset(out.ptr, 0, out.n * sizeof(T));

    const bool padded = c.variant == Variant::kMask || c.variant == Variant::kKeyLengths;
    const int64_t valid =
        padded ? std::max<int64_t>(1, Lk - static_cast<int64_t>(std::llround(o.pad * Lk))) : Lk;
    // mask: (B, 1, 1, Lk) padding mask, broadcast over heads and queries by zero strides.
    std::vector<uint8_t> mask;
    std::vector<int64_t> key_lengths;

    mha::AttentionParams p{};
    p.dtype = sizeof(T) == 8 ? mha::DType::kFloat64 : mha::DType::kFloat32;
    p.device = mha::Device::kCpu;
    p.q = q.ptr, p.k = k.ptr, p.v = v.ptr, p.out = out.ptr;
    p.batch = B, p.num_heads_q = Hq, p.num_heads_k = Hk, p.seqlen_q = Lq, p.seqlen_k = Lk;
    p.head_dim = p.head_dim_k = p.head_dim_v = D;
    p.q_stride_batch = Hq * Lq * D, p.q_stride_head = Lq * D, p.q_stride_seq = D;
    p.k_stride_batch = Hk * Lk * D, p.k_stride_head = Lk * D, p.k_stride_seq = D;
    p.v_stride_batch = Hk * Lk * D, p.v_stride_head = Lk * D, p.v_stride_seq = D;
    p.out_stride_batch = Hq * Lq * D, p.out_stride_head = Lq * D, p.out_stride_seq = D;
    p.scale = 1.0 / std::sqrt(static_cast<double>(D));
    p.num_threads = o.threads;
    if (c.variant == Variant::kCausal) p.causal = mha::Causal::kBottomRight;
    if (c.variant == Variant::kMask) {
        mask.assign(B * Lk, 0);
        for (int64_t b = 0; b < B; ++b) std::fill_n(mask.begin() + b * Lk, valid, uint8_t{1});
        p.mask = mask.data();
        p.mask_stride_batch = Lk, p.mask_stride_head = 0, p.mask_stride_q = 0,
        p.mask_stride_k = 1;
    }
    if (c.variant == Variant::kKeyLengths) {
        key_lengths.assign(B, valid);
        p.key_lengths = key_lengths.data();
    }

    Result r;
    r.config = c;
    r.visible_keys = valid;
    r.threads = o.threads;
#ifdef _OPENMP
    if (r.threads <= 0) r.threads = omp_get_max_threads();
#else
    r.threads = 1;
#endif

    // Validation: compare a few query rows of the blocked kernel with the naive kernel.
    if (o.validate && !o.naive) {
        mha::attention_forward(p);
        const int64_t rows = std::min<int64_t>(Lq, 16);
        const int64_t row0 = Lq - rows;  // the last rows: for causal they see the most keys
        Buffer<T> ref(B * Hq * rows * D);
        mha::AttentionParams pn = p;
        pn.naive = true;
        pn.seqlen_q = rows;
        pn.q = q.ptr + row0 * D;
        pn.out = ref.ptr;
        pn.out_stride_batch = Hq * rows * D, pn.out_stride_head = rows * D;
        // Bottom-right causal alignment is relative to Lk - Lq, so the last `rows` queries
        // keep their diagonal when run on their own.
        mha::attention_forward(pn);
        double err = 0;
        for (int64_t b = 0; b < B; ++b) {
            for (int64_t h = 0; h < Hq; ++h) {
                for (int64_t i = 0; i < rows; ++i) {
                    for (int64_t d = 0; d < D; ++d) {
                        const double x =
                            out.ptr[b * p.out_stride_batch + h * p.out_stride_head +
                                    (row0 + i) * D + d];
                        const double y = ref.ptr[b * pn.out_stride_batch +
                                                 h * pn.out_stride_head + i * D + d];
                        err = std::max(err, std::fabs(x - y));
                    }
                }
            }
        }
        r.max_abs_err = err;
        const double tol = sizeof(T) == 8 ? 1e-10 : 1e-4;
        if (!(err <= tol)) {
            std::fprintf(stderr, "mha_bench: %s: VALIDATION FAILED, max |blocked - naive| = %g\n",
                         c.name.c_str(), err);
        }
    }
    p.naive = o.naive;

    // Warmup, and a first timing to size the samples.
    double t_call = 0;
    for (int w = 0; w < std::max(1, o.warmup); ++w) {
        const double t0 = now_s();
        mha::attention_forward(p);
        t_call = now_s() - t0;
    }
    const int64_t calls = std::max<int64_t>(
        1, static_cast<int64_t>(std::ceil(o.min_time / std::max(t_call, 1e-9))));
    std::vector<double> per_call;
    for (int it = 0; it < o.iters; ++it) {
        const double t0 = now_s();
        for (int64_t n = 0; n < calls; ++n) mha::attention_forward(p);
        per_call.push_back((now_s() - t0) / static_cast<double>(calls));
    }
    r.iters = o.iters;
    r.calls_per_sample = calls;
    const double t = median(per_call);
    r.ms_median = 1e3 * t;
    r.ms_min = 1e3 * *std::min_element(per_call.begin(), per_call.end());

    double flops = 4.0 * B * Hq * static_cast<double>(Lq) * static_cast<double>(valid) * D;
    if (c.variant == Variant::kCausal && Lq == Lk) flops *= 0.5;
    r.gflops = flops / t * 1e-9;
    const double kv_bytes = 2.0 * B * Hk * static_cast<double>(valid) * D * sizeof(T);
    r.gbps = kv_bytes / t * 1e-9;
    return r;
}

// Memory read bandwidth: OpenMP sum over a 1 GiB float array (first-touched by the workers).
double measure_read_bandwidth(int threads, int iters) {
    const int64_t n = int64_t{1} << 28;  // 1 GiB of float
    Buffer<float> a(n);
#ifdef _OPENMP
    if (threads > 0) omp_set_num_threads(threads);
#pragma omp parallel for schedule(static)
#endif
    for (int64_t i = 0; i < n; ++i) a.ptr[i] = static_cast<float>(i & 1023);
    std::vector<double> gbps;
    volatile float sink = 0;
    for (int it = 0; it < iters + 1; ++it) {
        const double t0 = now_s();
        float total = 0;
#ifdef _OPENMP
#pragma omp parallel for simd schedule(static) reduction(+ : total)
#endif
        for (int64_t i = 0; i < n; ++i) total += a.ptr[i];
        const double dt = now_s() - t0;
        sink = sink + total;
        if (it > 0) gbps.push_back(n * sizeof(float) / dt * 1e-9);  // the first pass warms up
    }
    return median(gbps);
}

void print_header() {
    std::printf("%-22s %3s %4s %4s %6s %6s %4s %-11s %3s %10s %10s %9s %8s %9s\n", "name", "B",
                "Hq", "Hk", "Lq", "Lk", "D", "variant", "thr", "ms(med)", "ms(min)", "GFLOP/s",
                "GB/s", "max_err");
}

void print_result(const Result& r) {
    const Config& c = r.config;
    char gb[32] = "-";
    if (c.variant == Variant::kDecode) std::snprintf(gb, sizeof(gb), "%.1f", r.gbps);
    char err[32] = "-";
    if (r.max_abs_err >= 0) std::snprintf(err, sizeof(err), "%.1e", r.max_abs_err);
    std::printf("%-22s %3lld %4lld %4lld %6lld %6lld %4lld %-11s %3d %10.3f %10.3f %9.1f %8s %9s\n",
                c.name.c_str(), static_cast<long long>(c.batch),
                static_cast<long long>(c.heads_q), static_cast<long long>(c.heads_k),
                static_cast<long long>(c.seqlen_q), static_cast<long long>(c.seqlen_k),
                static_cast<long long>(c.head_dim), variant_name(c.variant), r.threads,
                r.ms_median, r.ms_min, r.gflops, gb, err);
    std::fflush(stdout);
}

void write_json(std::FILE* f, const std::vector<Result>& results, const Options& o,
                const mha::BuildInfo& info, double membw) {
    std::fprintf(f, "{\n  \"tool\": \"mha_bench\",\n");
    std::fprintf(f, "  \"simd\": \"%s\", \"openmp\": %s, \"max_threads\": %d,\n", info.simd.c_str(),
                 info.openmp ? "true" : "false", info.max_threads);
    std::fprintf(f, "  \"dtype\": \"%s\", \"iters\": %d, \"warmup\": %d, \"min_time_s\": %g,\n",
                 o.use_f64 ? "float64" : "float32", o.iters, o.warmup, o.min_time);
    std::fprintf(f, "  \"kernel\": \"%s\",\n", o.naive ? "naive" : "blocked");
    if (membw > 0) std::fprintf(f, "  \"read_bandwidth_gbps\": %.3f,\n", membw);
    std::fprintf(f, "  \"results\": [\n");
    for (size_t i = 0; i < results.size(); ++i) {
        const Result& r = results[i];
        const Config& c = r.config;
        std::fprintf(f,
                     "    {\"name\": \"%s\", \"variant\": \"%s\", \"B\": %lld, \"Hq\": %lld, "
                     "\"Hk\": %lld, \"Lq\": %lld, \"Lk\": %lld, \"D\": %lld, "
                     "\"visible_keys\": %lld, \"threads\": %d, \"iters\": %d, "
                     "\"calls_per_sample\": %lld, \"ms_median\": %.6f, \"ms_min\": %.6f, "
                     "\"gflops\": %.3f, \"kv_gbps\": %.3f, \"max_abs_err\": %.3e}%s\n",
                     c.name.c_str(), variant_name(c.variant), static_cast<long long>(c.batch),
                     static_cast<long long>(c.heads_q), static_cast<long long>(c.heads_k),
                     static_cast<long long>(c.seqlen_q), static_cast<long long>(c.seqlen_k),
                     static_cast<long long>(c.head_dim), static_cast<long long>(r.visible_keys),
                     r.threads, r.iters, static_cast<long long>(r.calls_per_sample), r.ms_median,
                     r.ms_min, r.gflops, r.gbps, r.max_abs_err,
                     i + 1 < results.size() ? "," : "");
    }
    std::fprintf(f, "  ]\n}\n");
}

}  // namespace

int main(int argc, char** argv) {
    const Options o = parse_args(argc, argv);
    const std::vector<Config> matrix = make_matrix(o.quick);
    if (o.list) {
        for (const Config& c : matrix) {
            std::printf("%-22s B=%lld Hq=%lld Hk=%lld Lq=%lld Lk=%lld D=%lld %s\n",
                        c.name.c_str(), static_cast<long long>(c.batch),
                        static_cast<long long>(c.heads_q), static_cast<long long>(c.heads_k),
                        static_cast<long long>(c.seqlen_q), static_cast<long long>(c.seqlen_k),
                        static_cast<long long>(c.head_dim), variant_name(c.variant));
        }
        return 0;
    }

    std::vector<Config> todo;
    if (o.custom) {
        todo.push_back(o.custom_config);
    } else if (!o.configs.empty()) {
        for (const std::string& name : o.configs) {
            auto it = std::find_if(matrix.begin(), matrix.end(),
                                   [&](const Config& c) { return c.name == name; });
            if (it == matrix.end()) {
                std::fprintf(stderr, "mha_bench: unknown config '%s' (see --list)\n",
                             name.c_str());
                return 2;
            }
            todo.push_back(*it);
        }
    } else {
        for (const Config& c : matrix) {
            if (o.filter.empty() || c.name.find(o.filter) != std::string::npos) todo.push_back(c);
        }
    }

    const mha::BuildInfo info = mha::build_info();
    std::printf("# mha_bench: simd=%s openmp=%d max_threads=%d threads=%d compiler=%s\n",
                info.simd.c_str(), info.openmp ? 1 : 0, info.max_threads, o.threads,
                info.compiler.c_str());
    std::printf("# dtype=%s kernel=%s warmup=%d iters=%d (median) min_time=%gs pad=%g\n",
                o.use_f64 ? "float64" : "float32", o.naive ? "naive" : "blocked", o.warmup,
                o.iters, o.min_time, o.pad);
    std::printf("# GFLOP/s = 4*B*Hq*Lq*Lk_visible*D / t (halved for causal Lq = Lk); "
                "GB/s (decode) = K+V bytes / t\n");

    double membw = 0;
    if (o.membw) {
        membw = measure_read_bandwidth(o.threads, 5);
        std::printf("# memory read bandwidth (OpenMP sum over 1 GiB, median of 5): %.1f GB/s\n",
                    membw);
    }

    print_header();
    std::vector<Result> results;
    int status = 0;
    for (const Config& c : todo) {
        try {
            Result r = o.use_f64 ? run_config<double>(c, o) : run_config<float>(c, o);
            print_result(r);
            if (r.max_abs_err > (o.use_f64 ? 1e-10 : 1e-4)) status = 1;
            results.push_back(r);
        } catch (const std::exception& e) {
            std::fprintf(stderr, "mha_bench: %s: %s\n", c.name.c_str(), e.what());
            status = 1;
        }
    }

    if (!o.json.empty()) {
        if (o.json == "-") {
            write_json(stdout, results, o, info, membw);
        } else {
            std::FILE* f = std::fopen(o.json.c_str(), "w");
            if (f == nullptr) {
                std::fprintf(stderr, "mha_bench: cannot write %s\n", o.json.c_str());
                return 1;
            }
            write_json(f, results, o, info, membw);
            std::fclose(f);
        }
    }
    return status;
}
