"""How mha_ext's OpenMP threads share the machine with NumPy's BLAS (issue 15, item 6).

libgomp reads its wait policy once, when it is loaded. Each variant therefore runs in a fresh
worker process; the driver interleaves the variants round by round (variant order rotated) and
reports the median over rounds of each worker's median:

- ``libgomp default``: GOMP_SPINCOUNT=300000, libgomp's own default (idle workers spin about
  300,000 pause instructions after every parallel region before they sleep);
- ``mha_ext default``: nothing set, so ``import mha_ext`` applies its default
  (OMP_WAIT_POLICY=passive while libgomp loads): the same as ``passive`` if the import works;
- ``passive``: OMP_WAIT_POLICY=passive (workers sleep at once);
- ``spin 1000``: GOMP_SPINCOUNT=1000 (a short spin), for the choice of the default;
- ``before``: with ``--before PATH``, an older build of mha_ext (PYTHONPATH=PATH) with nothing
  set, i.e. the behaviour before this change.

Each worker validates mha_ext against a float64 reference first, then times (same threads for
everything: all usable CPUs unless --threads):

- attention alone: (1, 8, 128, 64) float32, a small call that still runs on a thread team;
- matmul alone: 384 x 384 float32 ``@`` (NumPy's BLAS and its own threads);
- alternating: one attention call, then one matmul;
- MultiHeadAttention(384, 6) and TransformerEncoderLayer(384, 6, 1536) on (8, 128, 384), each
  after a NumPy matmul of the same activations (as in a model), and alone;
- forward kernel: (1, 8, L, 64) for L in 512, 1024, 2048 (and 1024 causal), and the call
  overhead on (1, 1, 16, 16);
- the price of the fork handler: a threaded call right after os.fork() (the parent's pool is
  handed back before each fork) against one without.

Run:  python benchmarks/bench_threads.py [--rounds 5] [--before /path/to/old/site] [--quick]
      [--variants passive,before,...]
Writes benchmarks/results/<machine>/threads.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _machine_folder() -> Path:
    """benchmarks/results/<machine folder> of this CPU (bench_forward.machine_folder)."""
    sys.path.insert(0, str(HERE))
    import bench_forward

    return HERE / "results" / bench_forward.machine_folder(bench_forward.cpu_description())
SPIN_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
VARIANTS = {
    "libgomp default": {"GOMP_SPINCOUNT": "300000"},
    "mha_ext default": {},
    "passive": {"OMP_WAIT_POLICY": "passive"},
    "spin 1000": {"GOMP_SPINCOUNT": "1000"},
}
FORWARD_LS = (512, 1024, 2048)


# --------------------------------------------------------------------------------------------
# Worker: one process, one runtime setting
# --------------------------------------------------------------------------------------------


def _median_time(fn, reps: int, inner: int, warmup: int = 2) -> float:
    """Median over reps of the mean time of `inner` calls, in microseconds."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner * 1e6)
    return statistics.median(samples)


def _reference(q, k, v, causal=False):
    s = np.einsum("bhid,bhjd->bhij", q.astype(np.float64), k.astype(np.float64))
    s /= np.sqrt(q.shape[-1])
    if causal:
        s = np.where(np.tril(np.ones(s.shape[-2:], dtype=bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhij,bhjd->bhid", p / p.sum(-1, keepdims=True), v.astype(np.float64))


def worker(reps: int, threads: int) -> dict:
    import mha_ext

    rng = np.random.default_rng(0)

    def qkv(shape):
        return [rng.standard_normal(shape, dtype=np.float32) for _ in range(3)]

    # Validate first: threaded, causal and not.
    for causal in (False, True):
        q, k, v = qkv((1, 8, 200, 64))
        out = mha_ext.attention(q, k, v, causal=causal, num_threads=threads)
        err = float(np.max(np.abs(out - _reference(q, k, v, causal))))
        if err > 1e-5:
            raise SystemExit(f"validation failed: max error {err}")

    res = {}
    q, k, v = qkv((1, 8, 128, 64))
    a = rng.standard_normal((384, 384), dtype=np.float32)
    b = rng.standard_normal((384, 384), dtype=np.float32)

    def attn():
        mha_ext.attention(q, k, v, num_threads=threads)

    def mm():
        a @ b

    def alternate():
        attn()
        mm()

    res["attention alone"] = _median_time(attn, reps, 20)
    res["matmul alone"] = _median_time(mm, reps, 20)
    res["alternating"] = _median_time(alternate, reps, 20)

    x = rng.standard_normal((8, 128, 384), dtype=np.float32)
    w = rng.standard_normal((384, 384), dtype=np.float32) / 20
    mha = mha_ext.MultiHeadAttention(384, 6, seed=0)
    enc = mha_ext.TransformerEncoderLayer(384, 6, 1536, seed=0)
    res["MultiHeadAttention alone"] = _median_time(lambda: mha(x), reps, 3)
    res["MultiHeadAttention after matmul"] = _median_time(lambda: mha(x @ w), reps, 3)
    res["TransformerEncoderLayer alone"] = _median_time(lambda: enc(x), reps, 3)
    res["TransformerEncoderLayer after matmul"] = _median_time(lambda: enc(x @ w), reps, 3)

    for L in FORWARD_LS:
        q, k, v = qkv((1, 8, L, 64))
        inner = max(1, 2048 // L)
        res[f"forward L={L}"] = _median_time(
            lambda q=q, k=k, v=v: mha_ext.attention(q, k, v, num_threads=threads), reps, inner
        )
    q, k, v = qkv((1, 8, 1024, 64))
    res["forward L=1024 causal"] = _median_time(
        lambda: mha_ext.attention(q, k, v, causal=True, num_threads=threads), reps, 2
    )
    q, k, v = qkv((1, 1, 16, 16))
    res["call overhead (1,1,16,16)"] = _median_time(lambda: mha_ext.attention(q, k, v), reps, 500)

    # The fork handler: the forking thread's pool is handed back, so the next call restarts it.
    q, k, v = qkv((1, 8, 128, 64))
    after, plain = [], []
    for _ in range(reps):
        attn()
        t0 = time.perf_counter()
        attn()
        plain.append((time.perf_counter() - t0) * 1e6)
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        t0 = time.perf_counter()
        attn()
        after.append((time.perf_counter() - t0) * 1e6)
    res["call after fork"] = statistics.median(after)
    res["call without fork"] = statistics.median(plain)
    return {"times_us": res, "build": mha_ext.build_info()}


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def cpu_description() -> dict:
    info = {"model": platform.machine(), "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    want = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "amx_tile"}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and info["model"] == platform.machine():
            info["model"] = value.strip()
        elif key.strip() == "flags" and not info["flags"]:
            info["flags"] = sorted(set(value.split()) & want)
    info["usable_cpus"] = len(os.sched_getaffinity(0))
    return info


def run_worker(env_add: dict, pythonpath: str | None, reps: int, threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in SPIN_VARS}
    env.update(env_add)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--reps", str(reps)]
    cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed ({env_add}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_markdown(res: dict, path: Path) -> None:
    cpu, names = res["cpu"], list(res["variants"])
    lines = [
        "# Threads next to NumPy's BLAS (benchmarks/bench_threads.py)",
        "",
        f"CPU: {cpu['model']}, {cpu['usable_cpus']} usable CPUs; flags: {' '.join(cpu['flags'])}; "
        f"SIMD path in use: {res['simd']}; threads: {res['threads']}; "
        f"{res['rounds']} rounds x {res['reps']} reps, medians; load average at start "
        f"{res['load_average']}.",
        "",
        "Times in microseconds (median over rounds of per-process medians). Ratios are to "
        "`passive` (OMP_WAIT_POLICY=passive).",
        "",
        "| measurement | "
        + " | ".join(names)
        + " | "
        + " | ".join(f"{n} / passive" for n in names)
        + " |",
        "|---" * (1 + 2 * len(names)) + "|",
    ]
    for key in res["keys"]:
        t = [res["median_us"][n][key] for n in names]
        p = res["median_us"]["passive"][key]
        lines.append(
            f"| {key} | " + " | ".join(f"{x:.1f}" for x in t) + " | "
            + " | ".join(f"{x / p:.2f}" for x in t) + " |"
        )
    alone = {n: res["median_us"][n] for n in names}
    lines += ["", "Alternating attention + matmul against the sum of the two alone:", ""]
    for n in names:
        m = alone[n]
        ratio = m["alternating"] / (m["attention alone"] + m["matmul alone"])
        lines.append(f"- {n}: {ratio:.2f}x")
    path.write_text("\n".join(lines) + "\n")


def write_plot(res: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    keys = [k for k in res["keys"] if "fork" not in k and "overhead" not in k]
    names = list(res["variants"])
    fig, ax = plt.subplots(figsize=(10, 5))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        ratios = [res["median_us"][n][k] / res["median_us"]["passive"][k] for k in keys]
        ax.bar(np.arange(len(keys)) + i * width, ratios, width, label=n)
    ax.axhline(1.1, color="gray", linestyle="--", linewidth=1)
    ax.set_xticks(np.arange(len(keys)) + 0.4)
    ax.set_xticklabels(keys, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("time / time with OMP_WAIT_POLICY=passive")
    ax.set_title(f"{res['cpu']['model']} ({res['simd']}), {res['threads']} threads")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--before", help="site directory of an older mha_ext build (A/B)")
    ap.add_argument("--variants", help="comma-separated subset of the variants to run")
    ap.add_argument("--quick", action="store_true", help="2 rounds x 5 reps, no files written")
    ap.add_argument("--out", type=Path, default=None,
                    help="default: benchmarks/results/<machine folder>")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.reps, args.threads)))
        return 0
    if args.quick:
        args.rounds, args.reps = 2, 5
    variants = {n: (env, None) for n, env in VARIANTS.items()}
    if args.before:
        variants["before"] = ({}, args.before)
    if args.variants:
        wanted = args.variants.split(",")
        unknown = sorted(set(wanted) - set(variants))
        if unknown or "passive" not in wanted:
            ap.error(f"--variants: unknown {unknown} (known: {list(variants)}); include passive")
        variants = {n: variants[n] for n in wanted}
    runs: dict = {n: [] for n in variants}
    build = None
    load = [round(x, 2) for x in os.getloadavg()]
    names = list(variants)
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            env, path = variants[n]
            out = run_worker(env, path, args.reps, args.threads)
            runs[n].append(out["times_us"])
            if n == "mha_ext default":
                build = out["build"]
            print(f"round {r + 1}/{args.rounds} {n}: done", file=sys.stderr, flush=True)
    keys = list(runs[names[0]][0])
    median = {n: {k: statistics.median(x[k] for x in runs[n]) for k in keys} for n in names}
    res = {
        "cpu": cpu_description(),
        "simd": build["simd"] if build else None,
        "build": build,
        "threads": args.threads,
        "rounds": args.rounds,
        "reps": args.reps,
        "load_average": load,
        "variants": {n: {"env": variants[n][0], "older_build": variants[n][1] is not None}
                     for n in names},
        "keys": keys,
        "median_us": median,
        "runs_us": runs,
    }
    width = max(len(k) for k in keys)
    print(f"{'us':<{width}} " + " ".join(f"{n[:16]:>16}" for n in names))
    for k in keys:
        print(f"{k:<{width}} " + " ".join(f"{median[n][k]:16.1f}" for n in names))
    if not args.quick:
        args.out = args.out or _machine_folder()
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "threads.json").write_text(json.dumps(res, indent=1) + "\n")
        write_markdown(res, args.out / "threads.md")
        write_plot(res, args.out / "threads.png")
        print(f"wrote {args.out}/threads.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
