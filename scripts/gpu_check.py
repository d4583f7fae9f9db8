"""One-shot GPU check for the CUDA backend: build, test, sanitize, benchmark.

Run from the repository root on a machine with an NVIDIA GPU, python3, pip, nvcc and a CUDA
build of torch:

    python3 scripts/gpu_check.py            # everything
    python3 scripts/gpu_check.py --skip-build --skip-sanitizer   # just tests + timings

Steps:
  1. Test dependencies (pytest, hypothesis, ml_dtypes, scikit-build-core, pybind11) are
     installed from local wheels in ./.whl/ when that folder exists, else from PyPI; the
     script stops with a clear message when neither works.
  2. Builds and installs mha_ext with MHA_EXT_CUDA=ON and CMAKE_CUDA_ARCHITECTURES=90.
  3. Runs tests/test_cuda.py.
  4. Runs compute-sanitizer (memcheck, racecheck) on a small driver (this file, --driver).
  5. Times mha_ext against PyTorch SDPA's flash, cuDNN and efficient backends in one process,
     interleaved, with CUDA events, median of --reps (after --warmup runs): fp16, D in
     {64, 128}, L in {1k .. 16k}, causal and not; and decode (Lq = 1, Lk in {8k, 32k})
     bandwidth. FLOPs = 4 B H Lq Lk D, halved for causal Lq = Lk.
     mha_ext takes NumPy (host) arrays, so its call includes host<->device copies; its
     kernel-only time comes from mha_ext._core.cuda_last_kernel_ms() when the binding
     exposes it, else from the PyTorch profiler (CUPTI sees every kernel in the process).
Results go to $OUT (if set) or benchmarks/results/, as gpu_check_<GPU name>.json and .md.

On a lent machine that cannot reach PyPI (the project's device tool: see its README): here,
download the test dependencies as manylinux wheels into ./.whl (ignored by git; `pip download
--no-deps --only-binary=:all: --python-version 3.12 ... -d .whl pytest hypothesis ml_dtypes
scikit-build-core pybind11` and their own dependencies), then make one call that carries
`.whl`, runs `PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py --quick` and leaves time in
its limit for a rerun; the results come back from $OUT. The split rows (short Lq, long Lk)
time the tensor-core kernel split over keys and unsplit (MHA_EXT_CUDA_SPLITS=1) side by side.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

# import name -> pip requirement
DEPS = {
    "pytest": "pytest>=8",
    "hypothesis": "hypothesis>=6.100",
    "ml_dtypes": "ml_dtypes>=0.4",
    "numpy": "numpy>=1.23",
    "scikit_build_core": "scikit-build-core>=0.10",
    "pybind11": "pybind11>=2.13",
}


def log(msg: str) -> None:
    print(f"[gpu_check] {msg}", flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    log("$ " + " ".join(cmd))
    return subprocess.run(cmd, check=False, **kw)


# ------------------------------------------------------------------------------------------
# 1-2. Dependencies and build.


def ensure_deps() -> None:
    missing = []
    for mod, req in DEPS.items():
        try:
            importlib.import_module(mod)
        except ImportError:
            missing.append(req)
    if not missing:
        return
    wheels = ROOT / ".whl"
    ok = False
    if wheels.is_dir() and any(wheels.glob("*.whl")):
        r = run([PY, "-m", "pip", "install", "--no-index", "--find-links", str(wheels), *missing])
        ok = r.returncode == 0
    if not ok:
        r = run([PY, "-m", "pip", "install", *missing])
        ok = r.returncode == 0
    if not ok:
        sys.exit(
            f"gpu_check: could not install {missing}: no usable wheels in {wheels} and PyPI "
            "failed. Put the wheels in .whl/ at the repository root."
        )


def build() -> None:
    env = dict(os.environ, MHA_EXT_CUDA="ON")
    t0 = time.time()
    r = run(
        [
            PY,
            "-m",
            "pip",
            "install",
            "--no-build-isolation",
            "--no-deps",
            "-v",
            ".",
            "-Ccmake.define.CMAKE_CUDA_ARCHITECTURES=90",
            "-Ccmake.define.MHA_EXT_CUDA_EMULATOR=OFF",  # the real kernels, not the emulator
            "-Cbuild-dir=build/gpu_check",
        ],
        cwd=ROOT,
        env=env,
    )
    if r.returncode != 0:
        sys.exit("gpu_check: building mha_ext with CUDA failed")
    log(f"build took {time.time() - t0:.0f} s")


def import_mha():
    # Import the installed package from outside the source tree.
    r = subprocess.run(
        [PY, "-c", "import mha_ext, json; print(json.dumps(mha_ext.build_info()))"],
        cwd="/",
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        sys.exit("gpu_check: importing mha_ext failed:\n" + r.stderr)
    info = json.loads(r.stdout.strip().splitlines()[-1])
    log(f"build_info: {info}")
    if not info.get("cuda_available"):
        sys.exit("gpu_check: mha_ext.cuda_available() is False on this machine")
    if info.get("cuda_emulated"):
        sys.exit("gpu_check: this mha_ext is the host-emulation build (cuda_emulated); "
                 "rebuild without MHA_EXT_CUDA_EMULATOR")
    return info


# ------------------------------------------------------------------------------------------
# 3-4. Tests and sanitizers.


def run_tests(out_dir: Path) -> dict:
    logf = out_dir / "pytest_cuda.log"
    with open(logf, "w") as f:
        r = run(
            [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"],
            cwd=ROOT,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    tail = logf.read_text().strip().splitlines()[-15:]
    print("\n".join(tail))
    return {"returncode": r.returncode, "summary": tail[-1] if tail else ""}


def driver() -> None:
    """Small calls covering every kernel, for compute-sanitizer (no torch imported)."""
    import mha_ext
    import ml_dtypes
    import numpy as np

    rng = np.random.default_rng(0)

    def r(shape, dt):
        return rng.uniform(-1, 1, size=shape).astype(np.float32).astype(dt)

    for dt in (np.float16, ml_dtypes.bfloat16):
        for D in (64, 80, 128):
            q, k, v = r((1, 2, 70, D), dt), r((1, 2, 130, D), dt), r((1, 2, 130, D), dt)
            mha_ext.attention(q, k, v, causal=True, device="cuda")
            mha_ext.attention(
                q,
                k,
                v,
                mask=rng.random((70, 130)) < 0.5,
                bias=r((70, 130), np.float32),
                window=(30, 2),
                key_lengths=np.array([100]),
                device="cuda",
                return_weights=True,
                return_lse=True,
            )
        big = r((1, 2, 70, 72), dt)
        mha_ext.attention(big[..., 3:67], big[..., 3:67], big[..., 3:67], device="cuda")
    for dt in (np.float32, np.float64, np.float16):
        q, k, v = r((2, 4, 1, 48), dt), r((2, 2, 3000, 48), dt), r((2, 2, 3000, 24), dt)
        mha_ext.attention(
            q, k, v, key_lengths=np.array([3000, 1200]), device="cuda", return_lse=True
        )
        q, k, v = r((1, 2, 20, 24), dt), r((1, 2, 33, 40), dt), r((1, 2, 33, 16), dt)
        acc = np.float64 if dt == np.float64 else np.float32
        mha_ext.attention(
            q, k, v, score=mha_ext.General(r((24, 40), acc)), device="cuda", return_weights=True
        )
        mha_ext.attention(
            q,
            k,
            v,
            score=mha_ext.Additive(r((24, 8), acc), r((40, 8), acc), r((8,), acc)),
            device="cuda",
            return_weights=True,
            return_lse=True,
        )
    print("driver: done")


def run_sanitizers(out_dir: Path) -> dict:
    san = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if not Path(san).exists():
        log("compute-sanitizer not found: skipped")
        return {"skipped": True}
    results = {}
    for tool in ("memcheck", "racecheck"):
        logf = out_dir / f"sanitizer_{tool}.log"
        with open(logf, "w") as f:
            r = run(
                [san, "--tool", tool, "--error-exitcode", "3", PY, str(Path(__file__)), "--driver"],
                cwd="/",
                stdout=f,
                stderr=subprocess.STDOUT,
            )
        text = logf.read_text()
        m = re.findall(r"ERROR SUMMARY: (\d+) error", text)
        results[tool] = {"returncode": r.returncode, "errors": int(m[-1]) if m else None}
        log(f"{tool}: rc={r.returncode} errors={results[tool]['errors']}")
    return results


# ------------------------------------------------------------------------------------------
# 5. Benchmarks.


def bench(out_dir: Path, warmup: int, reps: int, quick: bool) -> list[dict]:
    import mha_ext
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    core = mha_ext._core
    has_binding = hasattr(core, "cuda_last_kernel_ms")

    def mha_kernel_ms(fn):
        """(wall ms, kernel ms, copy ms) of one mha_ext call."""
        if has_binding:
            t0 = time.perf_counter()
            fn()
            wall = (time.perf_counter() - t0) * 1e3
            copy = core.cuda_last_copy_ms() if hasattr(core, "cuda_last_copy_ms") else None
            return wall, core.cuda_last_kernel_ms(), copy
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            fn()
            wall = (time.perf_counter() - t0) * 1e3
        kern = 0.0
        copy = 0.0
        for e in prof.events():
            dt = getattr(e, "device_time", None)
            if dt is None:
                dt = getattr(e, "cuda_time", 0.0)
            name = e.name
            if "mha::" in name or "attention_tc_kernel" in name or "attention_simt" in name:
                kern += dt / 1e3
            elif "Memcpy" in name or "memcpy" in name:
                copy += dt / 1e3
        return wall, kern, copy

    def torch_ms(fn):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    backends = {
        "torch_flash": SDPBackend.FLASH_ATTENTION,
        "torch_cudnn": SDPBackend.CUDNN_ATTENTION,
        "torch_efficient": SDPBackend.EFFICIENT_ATTENTION,
    }
    rows = []
    rng = np.random.default_rng(0)
    Ls = [1024, 2048] if quick else [1024, 2048, 4096, 8192, 16384]
    configs = []
    for D in (64, 128):
        for L in Ls:
            for causal in (False, True):
                H = 2048 // D
                B = max(1, 16384 // L)
                configs.append(("forward", B, H, H, L, L, D, causal))
    for Lk in (8192, 32768):
        configs.append(("decode", 1, 32, 32, 1, Lk, 128, False))
    # Short Lq, long Lk on the tensor-core path: few query-tile blocks, so the keys are
    # split (gridDim.y) and merged by lse; also timed unsplit (MHA_EXT_CUDA_SPLITS=1).
    for Lq, Lk in ((64, 32768), (256, 16384)):
        configs.append(("split", 1, 8, 8, Lq, Lk, 128, False))

    for kind, B, Hq, Hk, Lq, Lk, D, causal in configs:
        q = rng.standard_normal((B, Hq, Lq, D), dtype=np.float32).astype(np.float16)
        k = rng.standard_normal((B, Hk, Lk, D), dtype=np.float32).astype(np.float16)
        v = rng.standard_normal((B, Hk, Lk, D), dtype=np.float32).astype(np.float16)
        tq, tk, tv = (torch.from_numpy(x).cuda() for x in (q, k, v))
        # Validate first: mha_ext against torch's math backend on the same data (top-left
        # causal == bottom-right when Lq == Lk).
        # Two heads only: the math backend materialises the (Lq, Lk) scores.
        out = mha_ext.attention(q, k, v, causal=causal, device="cuda")
        with sdpa_kernel(SDPBackend.MATH):
            ref = F.scaled_dot_product_attention(
                tq[:, :2].float(), tk[:, :2].float(), tv[:, :2].float(), is_causal=causal
            )
        got = torch.from_numpy(out[:, :2].astype(np.float32)).cuda()
        err = float((got - ref).abs().max())
        del ref, got
        flops = 4.0 * B * Hq * Lq * Lk * D / (2 if causal and Lq == Lk else 1)
        nbytes = q.nbytes + k.nbytes + v.nbytes + q.nbytes * 1  # in + out, fp16

        def mha_call(q=q, k=k, v=v, causal=causal):
            mha_ext.attention(q, k, v, causal=causal, device="cuda")

        def torch_call(backend, tq=tq, tk=tk, tv=tv, causal=causal):
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)

        usable = {}
        for name, be in backends.items():
            try:
                torch_call(be)
                torch.cuda.synchronize()
                usable[name] = be
            except RuntimeError as e:
                log(f"{name} unavailable for {kind} B={B} H={Hq} L={Lq}x{Lk} D={D}: {e}")
        samples = {"mha_ext_kernel": [], "mha_ext_wall": [], "mha_ext_copy": []}
        if kind == "split":
            samples["mha_ext_unsplit_kernel"] = []
        samples.update({n: [] for n in usable})
        for _ in range(warmup):
            mha_call()
            for be in usable.values():
                torch_call(be)
        torch.cuda.synchronize()
        for _ in range(reps):  # interleaved
            wall, kern, copy = mha_kernel_ms(mha_call)
            samples["mha_ext_wall"].append(wall)
            samples["mha_ext_kernel"].append(kern)
            if copy is not None:
                samples["mha_ext_copy"].append(copy)
            if kind == "split":
                os.environ["MHA_EXT_CUDA_SPLITS"] = "1"
                try:
                    samples["mha_ext_unsplit_kernel"].append(mha_kernel_ms(mha_call)[1])
                finally:
                    del os.environ["MHA_EXT_CUDA_SPLITS"]
            for n, be in usable.items():
                samples[n].append(torch_ms(lambda be=be: torch_call(be)))
        row = {
            "kind": kind,
            "B": B,
            "Hq": Hq,
            "Hk": Hk,
            "Lq": Lq,
            "Lk": Lk,
            "D": D,
            "causal": causal,
            "max_abs_err_vs_torch_math": err,
            "flops": flops,
            "bytes": nbytes,
            "warmup": warmup,
            "reps": reps,
        }
        for n, s in samples.items():
            if not s:
                continue
            ms = statistics.median(s)
            row[f"{n}_ms"] = ms
            if n != "mha_ext_copy" and ms > 0:
                row[f"{n}_tflops"] = flops / ms / 1e9
                row[f"{n}_gbps"] = nbytes / ms / 1e6
        rows.append(row)
        log(
            f"{kind:7s} B={B:2d} H={Hq:2d} L={Lq}x{Lk} D={D} causal={causal!s:5s} "
            f"err={err:.1e} mha_ext kernel {row.get('mha_ext_kernel_ms', 0):.3f} ms "
            + " ".join(f"{n} {row.get(n + '_ms', float('nan')):.3f}" for n in usable)
            + (f" unsplit {row['mha_ext_unsplit_kernel_ms']:.3f}" if kind == "split" else "")
        )
        del tq, tk, tv
        torch.cuda.empty_cache()
    return rows


def write_reports(
    out_dir: Path, info: dict, tests: dict, sanitizers: dict, rows: list[dict]
) -> None:
    try:
        import torch

        gpu = torch.cuda.get_device_name()
        torch_version = torch.__version__
    except Exception:  # noqa: BLE001 - report without torch
        gpu, torch_version = "unknown_gpu", None
    tag = re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_")
    data = {
        "gpu": gpu,
        "torch": torch_version,
        "build_info": info,
        "tests": tests,
        "sanitizers": sanitizers,
        "bench": rows,
    }
    (out_dir / f"gpu_check_{tag}.json").write_text(json.dumps(data, indent=2))
    lines = [
        f"# mha_ext GPU check on {gpu}",
        "",
        f"- build: {info}",
        f"- torch: {torch_version}",
        f"- tests/test_cuda.py: rc={tests.get('returncode')} {tests.get('summary', '')}",
        f"- sanitizers: {sanitizers}",
        "",
        (
            "Forward fp16: TFLOP/s (FLOPs = 4·B·H·Lq·Lk·D, halved for causal). mha_ext "
            "kernel-only; its copy time (host<->device) and whole-call wall time in ms."
        ),
        "",
        (
            "| D | L | causal | BxH | mha_ext kernel | flash | cuDNN | efficient | "
            "mha_ext copy ms | mha_ext wall ms | max err |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(row, key):
        x = row.get(key)
        return "—" if x is None else f"{x:.1f}"

    for r in rows:
        if r["kind"] != "forward":
            continue
        lines.append(
            f"| {r['D']} | {r['Lq']} | {r['causal']} | {r['B']}x{r['Hq']} | "
            f"{f(r, 'mha_ext_kernel_tflops')} | {f(r, 'torch_flash_tflops')} | "
            f"{f(r, 'torch_cudnn_tflops')} | {f(r, 'torch_efficient_tflops')} | "
            f"{f(r, 'mha_ext_copy_ms')} | {f(r, 'mha_ext_wall_ms')} | "
            f"{r['max_abs_err_vs_torch_math']:.1e} |"
        )
    lines += [
        "",
        "Decode (Lq = 1, fp16, D = 128, H = 32): GB/s over q + K + V + out bytes.",
        "",
        "| Lk | mha_ext kernel | flash | cuDNN | efficient | mha_ext kernel ms |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["kind"] != "decode":
            continue
        lines.append(
            f"| {r['Lk']} | {f(r, 'mha_ext_kernel_gbps')} | {f(r, 'torch_flash_gbps')} | "
            f"{f(r, 'torch_cudnn_gbps')} | {f(r, 'torch_efficient_gbps')} | "
            f"{r.get('mha_ext_kernel_ms', float('nan')):.3f} |"
        )
    (out_dir / f"gpu_check_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--driver", action="store_true", help="(internal) sanitizer driver")
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--skip-sanitizer", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--quick", action="store_true", help="benchmark L in {1k, 2k} only")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    if args.driver:
        driver()
        return
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    ensure_deps()
    if not args.skip_build:
        build()
    info = import_mha()
    tests = {} if args.skip_tests else run_tests(out_dir)
    sanitizers = {} if args.skip_sanitizer else run_sanitizers(out_dir)
    rows = [] if args.skip_bench else bench(out_dir, args.warmup, args.reps, args.quick)
    write_reports(out_dir, info, tests, sanitizers, rows)
    failed = tests.get("returncode", 0) != 0 or any(
        v.get("returncode", 0) != 0 for v in sanitizers.values() if isinstance(v, dict)
    )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
