"""Forward-attention benchmark suite for mha_ext (SPEC section 7).

Usage::

    python benchmarks/bench_forward.py [--quick] [--threads N] [--out benchmarks/results]

What it does, in order:

1. Records the machine (CPU model, cores, AVX2/AVX-512 flags, library versions, mha_ext's
   build_info()) and the load average before and after.
2. Gives every side the same thread count: ``torch.set_num_threads(N)``, ``num_threads=N`` for
   mha_ext (OpenMP) and N BLAS threads for NumPy, through threadpoolctl when it is installed,
   else through OPENBLAS_NUM_THREADS / MKL_NUM_THREADS / OMP_NUM_THREADS set before NumPy is
   imported (the script re-executes itself once to do that). The JSON says which.
3. Measures the ceilings: sgemm GFLOP/s (NumPy ``@`` on 2048 x 2048 float32) and memory
   bandwidth (read: BLAS sgemv over a large matrix, threaded ``np.add.reduce``, ``torch.sum``,
   the best one is the ceiling; copy: threaded ``np.copyto``).
4. For each group of configurations: validates first (mha_ext vs PyTorch SDPA and the naive
   NumPy attention, max |difference| <= 1e-4; this first call of every side is the warmup),
   then times all sides interleaved in one process: each repetition runs every side once, in
   a rotating order; a sample is a loop of calls lasting at least ``--min-sample`` seconds;
   the median of the per-call times over >= 5 repetitions (3 in --quick) is reported.
5. Decode, call overhead, two Python threads against the same calls in series, and peak
   extra memory (in a fresh subprocess), then the pass/fail table of SPEC section 7, written
   as JSON, Markdown and PNG plots.

FLOPs are counted the FlashAttention way: 4 * B * Hq * Lq * Lk_visible * D, halved for causal
with Lq = Lk, where Lk_visible excludes padded keys (mask / key_lengths variants).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

try:
    import threadpoolctl
except ImportError:  # optional: fall back to environment variables
    threadpoolctl = None

SPEC_DIMS = (64, 128)
SPEC_LENS = (512, 1024, 2048, 4096, 8192)
QUICK_LENS = (512, 2048)
BATCH = 1
HEADS = 8
MASK_LEN = 2048  # sequence length of the bool-mask / key_lengths comparison
PAD_FRACTION = 0.125  # padded keys in the mask / key_lengths variants
DECODE = {"Hq": 32, "Hk": 32, "Lk": 32768, "D": 128}
MEMORY_SHAPE = {"L": 16384, "H": 8, "D": 64}
NAIVE_MAX_SCORE_BYTES = 2e9  # skip naive NumPy when the (H, Lq, Lk) float32 scores exceed this
TOLERANCE = 1e-4  # max |mha_ext - other| accepted by the validation
BLAS_ENV_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)
SIDES = ("mha_ext", "torch", "numpy")
DTYPES = ("float32", "bfloat16", "float16")
DTYPE_SUFFIX = {"float32": "", "bfloat16": "_bf16", "float16": "_f16"}
# max |mha_ext - torch| accepted per dtype: each side rounds its output (and P) on its own.
GEMM_CEILING = {
    "float32": "sgemm_gflops",
    "bfloat16": "torch_bf16_gemm_gflops",
    "float16": "torch_fp16_gemm_gflops",
}
DTYPE_TOLERANCE = {"float32": TOLERANCE, "bfloat16": 0.05, "float16": 0.01}


def np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


# --------------------------------------------------------------------------------------------
# Configurations and inputs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """One attention problem. kind: forward | mask | key_lengths | decode."""

    kind: str
    B: int
    Hq: int
    Hk: int
    Lq: int
    Lk: int
    D: int
    causal: bool = False
    pad: float = 0.0
    dtype: str = "float32"  # float32 | bfloat16 | float16 (q, k, v and out)

    @property
    def name(self) -> str:
        base = {"forward": "fwd", "mask": "mask", "key_lengths": "kl", "decode": "decode"}[
            self.kind
        ]
        if self.kind == "decode":
            return f"decode_h{self.Hq}_lk{self.Lk}_d{self.D}"
        suffix = DTYPE_SUFFIX[self.dtype]
        return f"{base}_d{self.D}_l{self.Lk}" + ("_causal" if self.causal else "") + suffix

    @property
    def visible_keys(self) -> int:
        if self.kind in ("mask", "key_lengths"):
            return max(1, self.Lk - round(self.pad * self.Lk))
        return self.Lk

    @property
    def flops(self) -> float:
        f = 4.0 * self.B * self.Hq * self.Lq * self.visible_keys * self.D
        return f / 2 if self.causal and self.Lq == self.Lk else f

    @property
    def kv_bytes(self) -> float:
        """Bytes of K and V that must be read (float32)."""
        return 2.0 * self.B * self.Hk * self.visible_keys * self.D * 4

    @property
    def score_bytes(self) -> float:
        """Size of the float32 score matrix a naive implementation materialises."""
        return 4.0 * self.B * self.Hq * self.Lq * self.Lk


def forward_config(
    D: int, L: int, causal: bool, heads: int = HEADS, dtype: str = "float32"
) -> Config:
    return Config("forward", BATCH, heads, heads, L, L, D, causal=causal, dtype=dtype)


def make_inputs(cfg: Config, seed: int = 0) -> dict:
    """q, k, v (B, H, L, D) float32 C-contiguous, standard normal; plus the masks."""
    rng = np.random.default_rng(seed)
    inp = {
        "q": rng.standard_normal((cfg.B, cfg.Hq, cfg.Lq, cfg.D), dtype=np.float32),
        "k": rng.standard_normal((cfg.B, cfg.Hk, cfg.Lk, cfg.D), dtype=np.float32),
        "v": rng.standard_normal((cfg.B, cfg.Hk, cfg.Lk, cfg.D), dtype=np.float32),
        "mask": None,
        "key_lengths": None,
    }
    if cfg.dtype != "float32":
        for name in ("q", "k", "v"):
            inp[name] = inp[name].astype(np_dtype(cfg.dtype))
    if cfg.kind in ("mask", "key_lengths"):
        # A padding mask (B, 1, 1, Lk): the last keys of every sequence are padding.
        mask = np.zeros((cfg.B, 1, 1, cfg.Lk), dtype=bool)
        mask[..., : cfg.visible_keys] = True
        inp["mask"] = mask  # the torch and NumPy sides use it for key_lengths too
        if cfg.kind == "key_lengths":
            inp["key_lengths"] = np.full(cfg.B, cfg.visible_keys, dtype=np.int64)
    return inp


def naive_attention(q, k, v, *, causal=False, mask=None, scale=None):
    """Textbook float32 NumPy attention: materialises the (B, H, Lq, Lk) scores."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    hq, hk = q.shape[1], k.shape[1]
    if hq != hk:
        k = np.repeat(k, hq // hk, axis=1)
        v = np.repeat(v, hq // hk, axis=1)
    s = np.matmul(q, k.swapaxes(-1, -2))
    s *= np.float32(scale)
    lq, lk = s.shape[-2:]
    if causal:  # bottom-right aligned, as mha_ext's causal=True
        s[..., np.triu(np.ones((lq, lk), dtype=bool), k=lk - lq + 1)] = -np.inf
    if mask is not None:
        np.putmask(s, ~np.broadcast_to(mask, s.shape), np.float32(-np.inf))
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return np.matmul(s, v)


def build_calls(cfg: Config, inp: dict, threads: int, sides=SIDES) -> dict:
    """side name -> zero-argument callable computing the attention for cfg."""
    import mha_ext

    q, k, v, mask, kl = inp["q"], inp["k"], inp["v"], inp["mask"], inp["key_lengths"]
    calls = {}
    if "mha_ext" in sides:
        mha_mask = mask if cfg.kind == "mask" else None

        def run_mha():
            return mha_ext.attention(
                q, k, v, causal=cfg.causal, mask=mha_mask, key_lengths=kl, num_threads=threads
            )

        calls["mha_ext"] = run_mha
    if "torch" in sides:
        import torch
        import torch.nn.functional as F

        tdt = getattr(torch, cfg.dtype)  # bf16 arrays (ml_dtypes) go through float32
        tq, tk, tv = (torch.from_numpy(a.astype(np.float32)).to(tdt) for a in (q, k, v))
        tmask = torch.from_numpy(mask) if mask is not None else None
        gqa = {"enable_gqa": True} if cfg.Hq != cfg.Hk else {}

        def run_torch():
            # is_causal is top-left aligned: identical to bottom-right here (Lq = Lk).
            return F.scaled_dot_product_attention(
                tq, tk, tv, attn_mask=tmask, is_causal=cfg.causal, **gqa
            )

        calls["torch"] = run_torch
    if "numpy" in sides and cfg.score_bytes <= NAIVE_MAX_SCORE_BYTES and cfg.dtype == "float32":

        def run_numpy():
            return naive_attention(q, k, v, causal=cfg.causal, mask=mask)

        calls["numpy"] = run_numpy
    return calls


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    return x.float().numpy() if str(x.dtype) == "torch.bfloat16" else x.numpy()


def check_outputs(calls: dict, tolerance: float = TOLERANCE) -> dict:
    """Call every side once (this is also the warmup); compare everything with mha_ext.

    Returns {"max_abs_err": {side: err}, "first_call_s": {side: seconds}, "ok": bool}.
    """
    outs, first = {}, {}
    for side, fn in calls.items():
        t0 = time.perf_counter()
        outs[side] = _as_numpy(fn())
        first[side] = time.perf_counter() - t0
    ref = outs["mha_ext"]
    errs = {}
    for side, o in outs.items():
        if side != "mha_ext":
            errs[side] = float(np.max(np.abs(o.astype(np.float64) - ref))) if o.size else 0.0
    ref = ref.astype(np.float64)
    finite = bool(np.all(np.isfinite(ref)))
    ok = finite and all(e <= tolerance for e in errs.values())
    return {"max_abs_err": errs, "first_call_s": first, "ok": ok}


def validate(cfg: Config, threads: int = 1, seed: int = 0, sides=SIDES) -> dict:
    """Validate one configuration on fresh random inputs (used by the smoke test)."""
    inp = make_inputs(cfg, seed)
    return check_outputs(build_calls(cfg, inp, threads, sides))


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


# Sides timed in a block of their own after the interleaved rounds. After each NumPy matmul,
# OpenBLAS's idle worker threads keep spinning for a while and take the cores from whatever
# runs next: interleaved with the naive NumPy side, mha_ext measured half its speed at
# L = 512 (and torch about 0.7x). The contract compares mha_ext with torch, so those two are
# interleaved with each other; the NumPy reference is still timed in the same process, with
# the same thread count.
APART = ("numpy",)


def time_interleaved(
    calls: dict, first_call_s: dict, reps: int, min_sample_s: float, max_calls: int = 100_000
) -> dict:
    """Per-call seconds of every side: `reps` rounds, each side once per round (rotating order),
    then the APART sides, `reps` samples each.

    A sample loops a side's call n times, n sized from its first (warmup) call so that the
    sample lasts about min_sample_s; the sample's value is its time / n.
    """

    def side(key):  # keys are side names or (config, side) pairs
        return key[1] if isinstance(key, tuple) else key

    names = [s for s in calls if side(s) not in APART]
    apart = [s for s in calls if side(s) in APART]
    inner = {
        s: max(1, min(max_calls, math.ceil(min_sample_s / max(first_call_s[s], 1e-7))))
        for s in calls
    }
    samples = {s: [] for s in calls}

    def sample(s):
        fn, n = calls[s], inner[s]
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        samples[s].append((time.perf_counter() - t0) / n)

    for r in range(reps):
        for s in names[r % len(names) :] + names[: r % len(names)]:
            sample(s)
    for s in apart:
        for _ in range(reps):
            sample(s)
    return {s: {"samples_s": samples[s], "calls_per_sample": inner[s]} for s in calls}


def summarise(cfg: Config, timing: dict) -> dict:
    """Median / min ms and GFLOP/s (GB/s of K+V for decode) per side."""
    out = {}
    for side, t in timing.items():
        med = statistics.median(t["samples_s"])
        out[side] = {
            "ms_median": 1e3 * med,
            "ms_min": 1e3 * min(t["samples_s"]),
            "gflops": cfg.flops / med * 1e-9,
            "kv_gbps": cfg.kv_bytes / med * 1e-9,
            "reps": len(t["samples_s"]),
            "calls_per_sample": t["calls_per_sample"],
            "samples_ms": [round(1e3 * x, 6) for x in t["samples_s"]],
        }
    return out


# --------------------------------------------------------------------------------------------
# Machine, threads, ceilings
# --------------------------------------------------------------------------------------------


def machine_folder(info: dict) -> str:
    """The results folder of this kind of CPU, so that machines never overwrite each other.

    ``amd-epyc-zen3`` (AVX2 only), ``intel-xeon-avx512-amx``, ``intel-xeon-avx512``, else a
    slug of the model name and the widest vector extension.
    """
    model = info.get("model", "").lower()
    flags = set(info.get("flags", []))
    vendor = "amd" if "amd" in model else "intel" if "intel" in model else "cpu"
    family = "epyc" if "epyc" in model else "xeon" if "xeon" in model else ""
    if vendor == "amd" and family == "epyc" and "avx512f" not in flags:
        return "amd-epyc-zen3"
    isa = "-avx512-amx" if "amx_tile" in flags else "-avx512" if "avx512f" in flags else (
        "-avx2" if "avx2" in flags else ""
    )
    if family:
        return f"{vendor}-{family}{isa}"
    slug = "".join(c if c.isalnum() else "-" for c in model).strip("-")
    return (slug or platform.machine()) + isa


def cpu_description() -> dict:
    info = {"model": platform.processor() or platform.machine(), "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and info["model"] in ("", platform.machine(), platform.processor()):
            info["model"] = value.strip()
        elif key == "flags" and not info["flags"]:
            flags = set(value.split())
            info["flags"] = sorted(
                flags
                & {
                    "avx",
                    "avx2",
                    "fma",
                    "f16c",
                    "avx512f",
                    "avx512bw",
                    "avx512dq",
                    "avx512vl",
                    "avx512_bf16",
                    "avx512_fp16",
                    "amx_tile",
                    "amx_bf16",
                }
            )
    info["machine_folder"] = machine_folder(info)
    info["logical_cpus"] = os.cpu_count()
    info["usable_cpus"] = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    )
    return info


def load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_description(threads: int, thread_control: dict) -> dict:
    import mha_ext

    desc = {
        "cpu": cpu_description(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "mha_ext": mha_ext.build_info(),
        "threads": threads,
        "thread_control": thread_control,
    }
    try:
        import torch

        desc["torch"] = torch.__version__
        desc["torch_threads"] = torch.get_num_threads()
    except ImportError:
        desc["torch"] = None
    if threadpoolctl is not None:
        desc["numpy_threadpools"] = [
            {k: p.get(k) for k in ("internal_api", "version", "num_threads", "architecture")}
            for p in threadpoolctl.threadpool_info()
        ]
    return desc


def ensure_env_threads(threads: int) -> None:
    """Without threadpoolctl, NumPy's BLAS reads its thread count from the environment at
    import time only: set the variables and re-execute this script once."""
    if threadpoolctl is not None or os.environ.get("MHA_BENCH_THREADS") == str(threads):
        return
    for var in BLAS_ENV_VARS:
        os.environ[var] = str(threads)
    os.environ["MHA_BENCH_THREADS"] = str(threads)
    os.execv(sys.executable, [sys.executable, *sys.argv])


def set_threads(threads: int) -> dict:
    """Same thread count everywhere; returns how NumPy's BLAS was limited (and a keep-alive)."""
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        pass
    if threadpoolctl is not None:
        limiter = threadpoolctl.threadpool_limits(limits=threads, user_api="blas")
        return {"numpy_blas": "threadpoolctl", "_keep": limiter}
    env = {v: os.environ.get(v) for v in BLAS_ENV_VARS}
    return {"numpy_blas": "environment variables set before importing numpy", "env": env}


def _median_time(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def measure_ceilings(threads: int, reps: int, bw_bytes: int) -> dict:
    """sgemm GFLOP/s and memory read / copy bandwidth, all with `threads` threads."""
    rng = np.random.default_rng(1)
    n = 2048
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    t = _median_time(lambda: a @ b, max(reps, 5))
    res = {"sgemm_n": n, "sgemm_gflops": 2.0 * n**3 / t * 1e-9}
    try:
        import torch

        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        t = _median_time(lambda: torch.mm(ta, tb), max(reps, 5))
        res["torch_sgemm_gflops"] = 2.0 * n**3 / t * 1e-9
        # Low-precision GEMM ceilings (torch.mm uses AMX / AVX512-BF16 / FP16 where present).
        for name, tdt in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            xa, xb = ta.to(tdt), tb.to(tdt)
            t = _median_time(lambda: torch.mm(xa, xb), max(reps, 5))
            res[f"torch_{name}_gemm_gflops"] = 2.0 * n**3 / t * 1e-9
    except ImportError:
        pass

    count = bw_bytes // 4
    cols = 4096
    count -= count % (cols * threads)
    big = np.empty(count, dtype=np.float32)
    big.fill(1.0)  # touch every page before timing
    read = {}
    # sgemv: BLAS reads the matrix once (multithreaded); the vector stays in cache.
    mat, vec = big.reshape(-1, cols), np.ones(cols, dtype=np.float32)
    read["blas_sgemv"] = big.nbytes / _median_time(lambda: mat @ vec, max(reps, 5)) * 1e-9
    chunks = np.array_split(big, threads)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        # ufunc reductions release the GIL, so the chunks are summed in parallel.
        read["numpy_threaded_sum"] = (
            big.nbytes
            / _median_time(lambda: list(pool.map(np.add.reduce, chunks)), max(reps, 5))
            * 1e-9
        )
        dst = np.empty_like(big)
        pairs = list(zip(np.array_split(dst, threads), chunks))
        copy_t = _median_time(
            lambda: list(pool.map(lambda p: np.copyto(p[0], p[1]), pairs)), max(reps, 5)
        )
        del dst
    try:
        import torch

        tbig = torch.from_numpy(big)
        read["torch_sum"] = big.nbytes / _median_time(tbig.sum, max(reps, 5)) * 1e-9
    except ImportError:
        pass
    res["read_bandwidth_methods_gbps"] = read
    res["read_bandwidth_gbps"] = max(read.values())
    res["read_bandwidth_method"] = max(read, key=read.get)
    # Copy: bytes read + bytes written (write-allocate traffic not counted).
    res["copy_bandwidth_gbps"] = 2.0 * big.nbytes / copy_t * 1e-9
    res["bandwidth_array_mb"] = big.nbytes / 2**20
    return res


# --------------------------------------------------------------------------------------------
# Call overhead and memory
# --------------------------------------------------------------------------------------------


def measure_overhead(threads: int, reps: int, calls_per_sample: int) -> dict:
    """us per call for a (1, 1, 16, 16) float32 problem, interleaved."""
    import mha_ext

    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((1, 1, 16, 16), dtype=np.float32) for _ in range(3))
    calls = {
        "mha_ext": lambda: mha_ext.attention(q, k, v, num_threads=threads),
        "mha_ext_1thread": lambda: mha_ext.attention(q, k, v, num_threads=1),
    }
    try:
        import torch
        import torch.nn.functional as F

        def torch_from_numpy():
            return F.scaled_dot_product_attention(
                torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v)
            ).numpy()

        calls["torch_from_numpy"] = torch_from_numpy
    except ImportError:
        pass
    for fn in calls.values():  # warmup
        for _ in range(100):
            fn()
    # Interleaved like the other timings: every repetition runs each side's loop once.
    samples = {s: [] for s in calls}
    names = list(calls)
    for r in range(reps):
        for s in names[r % len(names) :] + names[: r % len(names)]:
            fn = calls[s]
            t0 = time.perf_counter()
            for _ in range(calls_per_sample):
                fn()
            samples[s].append((time.perf_counter() - t0) / calls_per_sample)
    return {
        s: {
            "us_median": 1e6 * statistics.median(x),
            "us_min": 1e6 * min(x),
            "reps": reps,
            "calls_per_sample": calls_per_sample,
        }
        for s, x in samples.items()
    }


def measure_python_threads(reps: int) -> dict:
    """Two Python threads each running single-threaded mha_ext calls vs the same calls run
    one after the other: the GIL is released during native work, so on >= 2 free cores the
    threaded run takes about half the time. Each sample is a serial block and a threaded
    block, alternated; the ratio is the median of per-sample ratios."""
    import threading

    import mha_ext

    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, 2, 256, 64), dtype=np.float32)
    k = rng.standard_normal((1, 2, 2048, 64), dtype=np.float32)
    v = rng.standard_normal((1, 2, 2048, 64), dtype=np.float32)

    def call():
        mha_ext.attention(q, k, v, num_threads=1)

    call()
    t0 = time.perf_counter()
    call()
    n = max(1, round(0.1 / max(time.perf_counter() - t0, 1e-5)))  # ~0.1 s per worker

    def work():
        for _ in range(n):
            call()

    serial, threaded = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        work()
        work()
        serial.append(time.perf_counter() - t0)
        workers = [threading.Thread(target=work) for _ in range(2)]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        threaded.append(time.perf_counter() - t0)
    ratios = [t / s for t, s in zip(threaded, serial)]
    return {
        "problem": "q (1, 2, 256, 64), k/v (1, 2, 2048, 64) float32, num_threads=1",
        "calls_per_worker": n,
        "serial_ms_median": 1e3 * statistics.median(serial),
        "two_threads_ms_median": 1e3 * statistics.median(threaded),
        "ratio_median": statistics.median(ratios),
        "ratios": ratios,
    }


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def memory_child(side: str, L: int, H: int, D: int, threads: int, causal: bool) -> dict:
    """Runs in a fresh process: peak RSS growth of one call beyond its inputs and output.

    There is no warmup call: whatever the first call allocates (thread pool, scratch,
    allocator caches) counts, so the figure is an upper bound on a steady-state call.
    """
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, H, L, D), dtype=np.float32) for _ in range(3))
    out = np.zeros_like(q)  # touched: part of the baseline
    if side == "mha_ext":
        import mha_ext

        def run():
            mha_ext.attention(q, k, v, causal=causal, num_threads=threads, out=out)

        counted_out = 0  # written into the preallocated `out`
    else:
        import torch
        import torch.nn.functional as F

        torch.set_num_threads(threads)
        tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))

        def run():
            return F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)

        counted_out = out.nbytes  # torch allocates its result inside the call
    try:  # reset the peak (VmHWM) to the current RSS, Linux >= 4.0
        Path("/proc/self/clear_refs").write_text("5")
        method = "VmHWM after clear_refs reset"
    except OSError:
        method = "VmHWM (not reset: may under-report)"
    rss0, hwm0 = _status_kb("VmRSS"), _status_kb("VmHWM")
    t0 = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - t0
    hwm1 = _status_kb("VmHWM")
    del result
    extra = (hwm1 - max(rss0, hwm0)) * 1024 - counted_out
    return {
        "side": side,
        "shape": [1, H, L, D],
        "causal": causal,
        "threads": threads,
        "inputs_mb": 3 * q.nbytes / 2**20,
        "output_mb": out.nbytes / 2**20,
        "baseline_rss_mb": rss0 / 1024,
        "peak_rss_mb": hwm1 / 1024,
        "extra_mb": max(extra, 0) / 2**20,
        "seconds": seconds,
        "method": method,
    }


def measure_memory(side: str, threads: int, causal: bool) -> dict:
    s = MEMORY_SHAPE
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--memory-child",
        side,
        str(s["L"]),
        str(s["H"]),
        str(s["D"]),
        str(threads),
        str(int(causal)),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"side": side, "error": proc.stderr.strip()[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# The suite
# --------------------------------------------------------------------------------------------


class Progress:
    """tqdm when available, else one printed line per step."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.n, self.bar = total, 0, None
        self.enabled = enabled
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="step", dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def step(self, label: str):
        self.n += 1
        if self.bar is not None:
            self.bar.set_description(label)
            self.bar.update(1)
        elif self.enabled:
            print(f"[{self.n}/{self.total}] {label}", flush=True)

    def write(self, text: str):
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def run_group(cfgs, threads, reps, min_sample, sides, log) -> list:
    """Validate, then time every (config, side) of a group interleaved."""
    calls, first, records, inputs = {}, {}, [], {}
    for cfg in cfgs:
        inputs[cfg] = make_inputs(cfg, seed=zlib.crc32(cfg.name.encode()))
        c = build_calls(cfg, inputs[cfg], threads, sides)
        check = check_outputs(c, DTYPE_TOLERANCE[cfg.dtype])
        records.append({"config": cfg, "validation": check})
        if not check["ok"]:
            log(f"VALIDATION FAILED for {cfg.name}: {check['max_abs_err']}")
        for side, fn in c.items():
            calls[(cfg, side)] = fn
            first[(cfg, side)] = check["first_call_s"][side]
    timing = time_interleaved(calls, first, reps, min_sample)
    out = []
    for rec in records:
        cfg = rec["config"]
        t = {side: timing[(c, side)] for (c, side) in timing if c == cfg}
        res = summarise(cfg, t)
        entry = {
            "name": cfg.name,
            **asdict(cfg),
            "visible_keys": cfg.visible_keys,
            "flops": cfg.flops,
            "kv_bytes": cfg.kv_bytes,
            "validation": {
                "ok": rec["validation"]["ok"],
                "max_abs_err": rec["validation"]["max_abs_err"],
            },
            "results": res,
        }
        if "torch" in res and "mha_ext" in res:
            entry["speedup_vs_torch"] = res["torch"]["ms_median"] / res["mha_ext"]["ms_median"]
        out.append(entry)
        parts = [f"{s} {r['ms_median']:.3f} ms {r['gflops']:.1f} GF/s" for s, r in res.items()]
        log(f"{cfg.name}: " + " | ".join(parts))
    return out


def geomean(xs) -> float:
    xs = [x for x in xs if x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def evaluate_contract(res: dict, quick: bool) -> list:
    """One row per SPEC section 7 CPU target: measured value, target, pass/fail/partial."""
    rows = []
    fwd = {
        (e["D"], e["Lk"], e["causal"]): e
        for e in res.get("forward", [])
        if e.get("dtype", "float32") == "float32"
    }
    spec_keys = {(d, length, c) for d in SPEC_DIMS for length in SPEC_LENS for c in (False, True)}
    complete = spec_keys <= set(fwd)

    def row(name, target, value, ok, detail="", full=True):
        status = ("pass" if ok else "FAIL") if full else ("partial: " + ("ok" if ok else "below"))
        rows.append(
            {"row": name, "target": target, "measured": value, "status": status, "detail": detail}
        )

    sp = [e["speedup_vs_torch"] for e in fwd.values() if "speedup_vs_torch" in e]
    if sp:
        g, lo = geomean(sp), min(sp)
        row(
            "fp32 forward vs torch SDPA",
            "geomean >= 1.3x, min >= 1.0x",
            f"geomean {g:.2f}x, min {lo:.2f}x",
            g >= 1.3 and lo >= 1.0,
            f"{len(sp)} configs",
            complete,
        )
    ceil = res.get("ceilings", {})
    # SPEC 7: the best of NumPy @ and torch.mm on 2048^2 float32.
    sg = max(ceil.get("sgemm_gflops") or 0, ceil.get("torch_sgemm_gflops") or 0) or None
    fr = [
        (e["results"]["mha_ext"]["gflops"] / sg, e["name"])
        for (d, length, c), e in fwd.items()
        if not c and length >= 2048 and sg
    ]
    if fr:
        lo, name = min(fr)
        row(
            "non-causal L >= 2048 vs sgemm",
            ">= 80% of sgemm",
            f"min {100 * lo:.0f}% ({name})",
            lo >= 0.80,
            f"sgemm {sg:.1f} GFLOP/s (best of NumPy @ and torch.mm)",
            complete,
        )
    for dt, label in (("bfloat16", "bf16"), ("float16", "fp16")):
        low = {
            (e["D"], e["Lk"], e["causal"]): e
            for e in res.get("forward", [])
            if e.get("dtype") == dt
        }
        sp_low = [e["speedup_vs_torch"] for e in low.values() if "speedup_vs_torch" in e]
        if not sp_low:
            continue
        g, lo = geomean(sp_low), min(sp_low)
        full = spec_keys <= set(low)
        if dt == "bfloat16":
            row(
                "bf16 forward vs torch SDPA",
                "geomean >= 1.3x, min >= 1.0x",
                f"geomean {g:.2f}x, min {lo:.2f}x",
                g >= 1.3 and lo >= 1.0,
                f"{len(sp_low)} configs",
                full,
            )
            bg = ceil.get("torch_bf16_gemm_gflops")
            fr_low = [
                (e["results"]["mha_ext"]["gflops"] / bg, e["name"])
                for (d, length, c), e in low.items()
                if not c and length >= 2048 and bg
            ]
            if fr_low:
                lo2, name = min(fr_low)
                row(
                    "bf16 non-causal L >= 2048 vs bf16 GEMM",
                    ">= 70% of torch.mm bf16",
                    f"min {100 * lo2:.0f}% ({name})",
                    lo2 >= 0.70,
                    f"bf16 GEMM {bg:.1f} GFLOP/s",
                    full,
                )
        else:
            row(
                "fp16 forward vs torch SDPA",
                "min >= 1.0x",
                f"geomean {g:.2f}x, min {lo:.2f}x",
                lo >= 1.0,
                f"{len(sp_low)} configs",
                full,
            )
    cr = []
    for (d, length, c), e in fwd.items():
        if c and (d, length, False) in fwd:
            nc = fwd[(d, length, False)]["results"]["mha_ext"]["gflops"]
            cr.append((e["results"]["mha_ext"]["gflops"] / nc, e["name"]))
    if cr:
        lo, name = min(cr)
        row(
            "causal rate vs non-causal",
            ">= 90%",
            f"min {100 * lo:.0f}% ({name}), geomean {100 * geomean([x for x, _ in cr]):.0f}%",
            lo >= 0.9,
            "",
            complete,
        )
    mr = []
    for e in res.get("masked", []):
        if e["kind"] in ("mask", "key_lengths") and "unmasked_gflops" in e:
            mr.append((e["results"]["mha_ext"]["gflops"] / e["unmasked_gflops"], e["name"]))
    if mr:
        lo, name = min(mr)
        row(
            "bool mask / key_lengths vs unmasked",
            ">= 85%",
            f"min {100 * lo:.0f}% ({name})",
            lo >= 0.85,
            f"pad {PAD_FRACTION:.3f}, FLOPs of visible keys",
            {e["D"] for e in res["masked"]} >= set(SPEC_DIMS) and not quick,
        )
    dec = res.get("decode")
    bw = res.get("ceilings", {}).get("read_bandwidth_gbps")
    if dec and bw:
        g = dec["results"]["mha_ext"]["kv_gbps"]
        row(
            "decode vs read bandwidth",
            ">= 70%",
            f"{100 * g / bw:.0f}% ({g:.1f} of {bw:.1f} GB/s)",
            g / bw >= 0.7,
            dec["name"],
            dec["Hq"] == DECODE["Hq"],
        )
    mem = res.get("memory", {}).get("mha_ext")
    if mem and "extra_mb" in mem:
        row(
            "peak extra memory L=16k H=8 D=64",
            "< 64 MB",
            f"{mem['extra_mb']:.1f} MB",
            mem["extra_mb"] < 64,
            mem["method"],
            True,
        )
    ov = res.get("overhead", {}).get("mha_ext")
    if ov:
        tor = res["overhead"].get("torch_from_numpy", {}).get("us_median")
        row(
            "call overhead (1,1,16,16)",
            "<= 3 us",
            f"{ov['us_median']:.2f} us",
            ov["us_median"] <= 3.0,
            f"torch from numpy {tor:.2f} us" if tor else "",
            True,
        )
    return rows


def _md_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def write_markdown(res: dict, path: Path) -> None:
    m, c = res["machine"], res["ceilings"]
    sg = c["sgemm_gflops"]
    out = [
        f"# mha_ext forward benchmark ({res['mode']})",
        "",
        (
            f"- CPU: {m['cpu']['model']} ({m['cpu']['usable_cpus']} usable CPUs, flags "
            f"{', '.join(m['cpu']['flags'])})"
        ),
        (
            f"- threads: {m['threads']} for every side (NumPy BLAS via "
            f"{m['thread_control']['numpy_blas']})"
        ),
        (
            f"- numpy {m['numpy']}, torch {m.get('torch')}, mha_ext {m['mha_ext'].get('version')} "
            f"(simd {m['mha_ext'].get('simd')}, compiler {m['mha_ext'].get('compiler')})"
        ),
        (
            f"- SIMD path in use: **{m['mha_ext'].get('simd')}**; paths this CPU runs: "
            f"{', '.join(m['mha_ext'].get('simd_supported', []))}"
            + (f" ({m['mha_ext']['simd_note']})" if m["mha_ext"].get("simd_note") else "")
        ),
        (
            f"- load average before / after: {res['load_before']} / {res['load_after']}; "
            f"total time {res['elapsed_s']:.0f} s"
        ),
        (
            f"- timing: first call of every side = validation + warmup; then {res['reps']} "
            f"interleaved repetitions, median; samples >= {res['min_sample_s']} s"
        ),
        "",
        "## Ceilings",
        "",
        f"- sgemm (NumPy `@`, 2048^2 float32): **{sg:.1f} GFLOP/s**"
        + (f" (torch.mm {c['torch_sgemm_gflops']:.1f})" if "torch_sgemm_gflops" in c else ""),
        (
            f"- memory read bandwidth: **{c['read_bandwidth_gbps']:.1f} GB/s** "
            f"(best of {', '.join(f'{k} {v:.1f}' for k, v in c['read_bandwidth_methods_gbps'].items())}"
            f"; {c['bandwidth_array_mb']:.0f} MB array)"
        ),
        f"- copy bandwidth (read + write): {c['copy_bandwidth_gbps']:.1f} GB/s",
        (
            f"- bf16 GEMM (torch.mm, 2048^2 bfloat16): **{_fmt(c.get('torch_bf16_gemm_gflops'))} "
            f"GFLOP/s**; fp16 GEMM (torch.mm): {_fmt(c.get('torch_fp16_gemm_gflops'))} GFLOP/s"
        ),
        "",
        "## SPEC section 7 (CPU rows)",
        "",
        _md_table(
            ["target", "goal", "measured", "status"],
            [[r["row"], r["target"], r["measured"], r["status"]] for r in res["contract"]],
        ),
        "",
    ]
    for dt in DTYPES:
        entries = [e for e in res["forward"] if e.get("dtype", "float32") == dt]
        if not entries:
            continue
        ceiling = c.get(GEMM_CEILING[dt]) if dt != "float32" else sg
        label = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[dt]
        out += [f"## Forward, {label}, B = 1, H = 8 (ms median; GFLOP/s)", ""]
        rows = []
        for e in entries:
            r = e["results"]
            rows.append(
                [
                    e["D"],
                    e["Lk"],
                    "yes" if e["causal"] else "no",
                    _fmt(r["mha_ext"]["ms_median"], ".2f"),
                    _fmt(r["mha_ext"]["gflops"]),
                    _fmt(r.get("torch", {}).get("ms_median"), ".2f"),
                    _fmt(r.get("torch", {}).get("gflops")),
                    _fmt(r.get("numpy", {}).get("ms_median"), ".2f"),
                    _fmt(r.get("numpy", {}).get("gflops")),
                    _fmt(e.get("speedup_vs_torch"), ".2f") + "x",
                    f"{100 * r['mha_ext']['gflops'] / ceiling:.0f}%" if ceiling else "-",
                ]
            )
        out.append(
            _md_table(
                [
                    "D",
                    "L",
                    "causal",
                    "mha_ext ms",
                    "mha_ext GF/s",
                    "torch ms",
                    "torch GF/s",
                    "numpy ms",
                    "numpy GF/s",
                    "vs torch",
                    "% GEMM" if dt != "float32" else "% sgemm",
                ],
                rows,
            )
        )
        out.append("")
    if res.get("masked"):
        out += ["", f"## Masks at L = {MASK_LEN} (pad {PAD_FRACTION}; GFLOP/s of visible keys)", ""]
        rows = []
        for e in res["masked"]:
            r = e["results"]
            rows.append(
                [
                    e["name"],
                    e["D"],
                    e["kind"],
                    e["visible_keys"],
                    _fmt(r["mha_ext"]["ms_median"], ".2f"),
                    _fmt(r["mha_ext"]["gflops"]),
                    _fmt(r.get("torch", {}).get("gflops")),
                    _fmt(r.get("numpy", {}).get("gflops")),
                    _fmt(100 * e["mha_ext_vs_unmasked"], ".0f") + "%"
                    if "mha_ext_vs_unmasked" in e
                    else "-",
                ]
            )
        out.append(
            _md_table(
                [
                    "config",
                    "D",
                    "variant",
                    "visible keys",
                    "mha_ext ms",
                    "mha_ext GF/s",
                    "torch GF/s",
                    "numpy GF/s",
                    "vs unmasked",
                ],
                rows,
            )
        )
    if res.get("decode"):
        e, bw = res["decode"], c["read_bandwidth_gbps"]
        out += [
            "",
            (
                f"## Decode: Lq = 1, Lk = {e['Lk']}, Hq = Hk = {e['Hq']}, D = {e['D']} "
                f"(K+V = {e['kv_bytes'] / 1e6:.0f} MB)"
            ),
            "",
        ]
        rows = [
            [s, _fmt(r["ms_median"], ".2f"), _fmt(r["kv_gbps"]), f"{100 * r['kv_gbps'] / bw:.0f}%"]
            for s, r in e["results"].items()
        ]
        out.append(_md_table(["side", "ms", "GB/s (K+V)", "% read bandwidth"], rows))
    if res.get("overhead"):
        out += ["", "## Call overhead, (1, 1, 16, 16) float32", ""]
        out.append(
            _md_table(
                ["side", "us / call (median)", "us (min)"],
                [
                    [s, _fmt(r["us_median"], ".2f"), _fmt(r["us_min"], ".2f")]
                    for s, r in res["overhead"].items()
                ],
            )
        )
    if res.get("threads"):
        t = res["threads"]
        out += [
            "",
            "## Two Python threads (GIL released during native work)",
            "",
            (
                f"{t['problem']}, {t['calls_per_worker']} calls per worker: two workers run "
                "one after the other, then at once in two Python threads (alternated, median)."
            ),
            "",
            _md_table(
                ["serial ms", "2 threads ms", "2 threads / serial"],
                [
                    [
                        _fmt(t["serial_ms_median"]),
                        _fmt(t["two_threads_ms_median"]),
                        _fmt(t["ratio_median"], ".2f"),
                    ]
                ],
            ),
        ]
    if res.get("memory"):
        out += ["", "## Peak extra memory (fresh subprocess)", ""]
        rows = []
        for s, r in res["memory"].items():
            if "error" in r:
                rows.append([s, "-", "-", "-", "error: " + r["error"].splitlines()[-1][:80]])
            else:
                rows.append(
                    [
                        s,
                        "x".join(map(str, r["shape"])) + (" causal" if r["causal"] else ""),
                        _fmt(r["inputs_mb"] + r["output_mb"], ".0f"),
                        _fmt(r["extra_mb"]),
                        r["method"],
                    ]
                )
        out.append(_md_table(["side", "shape", "inputs + output MB", "extra MB", "method"], rows))
    path.write_text("\n".join(out) + "\n")


def write_plot(res: dict, path: Path, dtype: str = "float32") -> bool:
    """GFLOP/s per L of one dtype's forward rows, one panel per (D, causal), the GEMM ceiling."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    forward = [e for e in res["forward"] if e.get("dtype", "float32") == dtype]
    if not forward:
        return False
    sg = res["ceilings"].get(GEMM_CEILING[dtype]) or res["ceilings"]["sgemm_gflops"]
    gemm = {"float32": "sgemm", "bfloat16": "bf16 GEMM", "float16": "fp16 GEMM"}[dtype]
    dims = sorted({e["D"] for e in forward})
    fig, axes = plt.subplots(len(dims), 2, figsize=(11, 4 * len(dims)), squeeze=False, sharey=True)
    styles = {"mha_ext": "o-", "torch": "s--", "numpy": "^:"}
    for i, d in enumerate(dims):
        for j, causal in enumerate((False, True)):
            ax = axes[i][j]
            es = sorted(
                (e for e in forward if e["D"] == d and e["causal"] == causal),
                key=lambda e: e["Lk"],
            )
            for side, st in styles.items():
                pts = [(e["Lk"], e["results"][side]["gflops"]) for e in es if side in e["results"]]
                if pts:
                    ax.plot(*zip(*pts), st, label=side)
            ax.axhline(sg, color="k", lw=1, label=f"{gemm} {sg:.0f} GFLOP/s")
            frac = 0.8 if dtype == "float32" else 0.7
            ax.axhline(frac * sg, color="gray", lw=0.8, ls="--", label=f"{frac:.0%} {gemm}")
            ax.set_xscale("log", base=2)
            ax.set_xticks([e["Lk"] for e in es], [str(e["Lk"]) for e in es])
            ax.set_ylim(bottom=0)
            ax.set_title(f"D = {d}, {'causal' if causal else 'non-causal'}")
            ax.set_xlabel("sequence length L")
            ax.set_ylabel("GFLOP/s")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    m = res["machine"]
    fig.suptitle(
        f"{dtype} forward, B=1, H={HEADS}, {m['threads']} threads, {m['cpu']['model']}, "
        f"mha_ext path {m['mha_ext'].get('simd')}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="few sizes, 3 reps: a < 1 min smoke run")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for every side (default: the usable CPUs)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: benchmarks/results/<machine folder>, e.g. amd-epyc-zen3)",
    )
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 5; 3 quick)")
    p.add_argument(
        "--min-sample",
        type=float,
        default=None,
        help="seconds per timed sample; short calls are looped (default 0.1; quick 0.03)",
    )
    p.add_argument("--dims", type=int, nargs="+", default=None, help="head dims (default 64 128)")
    p.add_argument(
        "--lens",
        type=int,
        nargs="+",
        default=None,
        help="sequence lengths (default 512 ... 8192; quick 512 2048)",
    )
    p.add_argument(
        "--sections",
        nargs="+",
        default=["forward", "masked", "decode", "overhead", "threads", "memory"],
        choices=["forward", "masked", "decode", "overhead", "threads", "memory"],
    )
    p.add_argument(
        "--dtypes",
        nargs="+",
        default=list(DTYPES),
        choices=list(DTYPES),
        help="forward dtypes (default float32 bfloat16 float16)",
    )
    p.add_argument(
        "--low-lens",
        type=int,
        nargs="+",
        default=None,
        help="sequence lengths of the bf16 / fp16 rows (default: those of --lens)",
    )
    p.add_argument(
        "--simd",
        default=None,
        help="force mha_ext's CPU path (one of build_info()['simd_supported'])",
    )
    p.add_argument("--no-numpy", action="store_true", help="skip the naive NumPy side")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--memory-child",
        nargs=6,
        metavar=("SIDE", "L", "H", "D", "THREADS", "CAUSAL"),
        help=argparse.SUPPRESS,
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_child:
        side, L, H, D, thr, causal = args.memory_child
        print(json.dumps(memory_child(side, int(L), int(H), int(D), int(thr), bool(int(causal)))))
        return 0
    threads = args.threads or cpu_description()["usable_cpus"] or 1
    ensure_env_threads(threads)
    quick = args.quick
    reps = args.reps or (3 if quick else 5)
    if reps < 5 and not quick:
        print(f"warning: --reps {reps} is below the median of >= 5 that SPEC section 7 asks for")
    min_sample = args.min_sample if args.min_sample is not None else (0.03 if quick else 0.1)
    dims = tuple(args.dims or SPEC_DIMS)
    lens = tuple(args.lens or (QUICK_LENS if quick else SPEC_LENS))
    low_lens = tuple(args.low_lens or lens)
    sides = tuple(s for s in SIDES if not (args.no_numpy and s == "numpy"))
    try:
        import torch  # noqa: F401
    except ImportError:
        sides = tuple(s for s in sides if s != "torch")
    import mha_ext

    if args.simd:
        mha_ext._core._set_simd(args.simd)
    control = set_threads(threads)
    keep = control.pop("_keep", None)
    t_start = time.perf_counter()
    res = {
        "mode": "quick" if quick else "full",
        "load_before": load_average(),
        "machine": machine_description(threads, control),
        "reps": reps,
        "min_sample_s": min_sample,
        "warmup": "1 call per side (the validation call)",
        "flop_count": "4*B*Hq*Lq*Lk_visible*D, halved for causal Lq == Lk",
        "tolerance": TOLERANCE,
    }
    sec = set(args.sections)
    n_steps = (
        1
        + (len(dims) * len(lens) if "forward" in sec else 0)
        + (len(dims) * len(low_lens) * (len(args.dtypes) - 1) if "forward" in sec else 0)
        + ((1 if quick else len(dims)) if "masked" in sec else 0)
        + sum(s in sec for s in ("decode", "overhead", "threads", "memory"))
    )
    bar = Progress(n_steps, enabled=not args.no_progress)
    log = bar.write

    bar.step("ceilings")
    res["ceilings"] = measure_ceilings(threads, reps, (256 if quick else 1024) * 2**20)
    c = res["ceilings"]
    log(
        f"ceilings: sgemm {c['sgemm_gflops']:.1f} GFLOP/s, read {c['read_bandwidth_gbps']:.1f} "
        f"GB/s ({c['read_bandwidth_method']}), copy {c['copy_bandwidth_gbps']:.1f} GB/s"
    )

    res["forward"] = []
    if "forward" in sec:
        for dt in args.dtypes:
            for d in dims:
                for length in lens if dt == "float32" else low_lens:
                    bar.step(f"forward {dt} D={d} L={length}")
                    cfgs = [
                        forward_config(d, length, False, dtype=dt),
                        forward_config(d, length, True, dtype=dt),
                    ]
                    res["forward"] += run_group(cfgs, threads, reps, min_sample, sides, log)

    res["masked"] = []
    if "masked" in sec:
        for d in dims[:1] if quick else dims:
            bar.step(f"masks D={d} L={MASK_LEN}")
            base = forward_config(d, MASK_LEN, False)
            cfgs = [base] + [
                Config(kind, BATCH, HEADS, HEADS, MASK_LEN, MASK_LEN, d, pad=PAD_FRACTION)
                for kind in ("mask", "key_lengths")
            ]
            group = run_group(cfgs, threads, reps, min_sample, sides, log)
            unmasked = group[0]["results"]["mha_ext"]["gflops"]
            for e in group[1:]:
                e["unmasked_gflops"] = unmasked
                e["mha_ext_vs_unmasked"] = e["results"]["mha_ext"]["gflops"] / unmasked
            res["masked"] += group

    if "decode" in sec:
        bar.step("decode")
        h = 8 if quick else DECODE["Hq"]
        cfg = Config("decode", BATCH, h, h, 1, DECODE["Lk"], DECODE["D"])
        res["decode"] = run_group([cfg], threads, reps, min_sample, sides, log)[0]

    if "overhead" in sec:
        bar.step("call overhead")
        res["overhead"] = measure_overhead(threads, max(reps, 5), 500 if quick else 5000)
        log(
            "overhead (us/call): "
            + ", ".join(f"{s} {r['us_median']:.2f}" for s, r in res["overhead"].items())
        )

    if "threads" in sec:
        bar.step("python threads")
        res["threads"] = measure_python_threads(max(reps, 5))
        t = res["threads"]
        log(
            f"2 Python threads: {t['two_threads_ms_median']:.1f} ms vs serial "
            f"{t['serial_ms_median']:.1f} ms (ratio {t['ratio_median']:.2f})"
        )

    if "memory" in sec:
        bar.step("peak memory")
        # Quick mode runs the causal problem (half the work); memory does not depend on it.
        res["memory"] = {"mha_ext": measure_memory("mha_ext", threads, causal=quick)}
        if not quick and "torch" in sides:
            res["memory"]["torch"] = measure_memory("torch", threads, causal=False)
        log(
            "memory: "
            + ", ".join(
                f"{s} {r.get('extra_mb', float('nan')):.1f} MB extra"
                for s, r in res["memory"].items()
            )
        )
    bar.close()

    res["elapsed_s"] = time.perf_counter() - t_start
    res["load_after"] = load_average()
    res["contract"] = evaluate_contract(res, quick)
    del keep

    if args.out is None:
        args.out = Path(__file__).resolve().parent / "results" / machine_folder(cpu_description())
    args.out.mkdir(parents=True, exist_ok=True)
    prefix = "quick_" if quick else ""
    json_path = args.out / f"{prefix}results.json"
    json_path.write_text(json.dumps(res, indent=1, default=str) + "\n")
    write_markdown(res, args.out / f"{prefix}results.md")
    plotted = bool(res["forward"]) and write_plot(res, args.out / f"{prefix}forward_gflops.png")
    for dt in args.dtypes[1:] if args.dtypes[0] == "float32" else args.dtypes:
        if dt != "float32":
            write_plot(res, args.out / f"{prefix}forward_gflops{DTYPE_SUFFIX[dt]}.png", dt)
    print()
    print(
        _md_table(
            ["target", "goal", "measured", "status"],
            [[r["row"], r["target"], r["measured"], r["status"]] for r in res["contract"]],
        )
    )
    print(
        f"\nwrote {json_path}, {prefix}results.md"
        + (f", {prefix}forward_gflops.png" if plotted else "")
        + f" in {args.out} ({res['elapsed_s']:.0f} s)"
    )
    bad_validation = [
        e["name"] for g in ("forward", "masked") for e in res[g] if not e["validation"]["ok"]
    ]
    if res.get("decode") and not res["decode"]["validation"]["ok"]:
        bad_validation.append(res["decode"]["name"])
    if bad_validation:
        print(f"validation FAILED for: {', '.join(bad_validation)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
