"""Backward-pass benchmark for mha_ext (SPEC section 7, the "CPU backward" row).

Usage::

    python benchmarks/bench_backward.py [--quick] [--threads N] [--reps 3] [--out DIR]

For fp32 and bf16, D in {64, 128}, L in {512, 1024, 2048, 4096} (B = 1, H = 8), causal and
not: ``mha_ext.attention_backward`` against PyTorch's ``scaled_dot_product_attention``
backward (``torch.autograd.grad`` on a kept graph), and forward + backward for both. First a
validation call of every side (mha_ext's gradients against torch's, which is also the
warmup), then every repetition runs each side once in a rotating order; the median over the
repetitions is reported. Same thread count for both (``torch.set_num_threads`` and
``num_threads``). FLOPs are counted the FlashAttention way: backward = 2.5 x the forward's
4 * B * H * Lq * Lk * D, halved for causal.

Peak extra memory is measured in fresh processes (VmHWM after a clear_refs reset): the
backward alone at L = 16k, H = 8, D = 64 for mha_ext (beyond inputs, out, lse, dout and the
three gradients it returns), and both sides at L = 4096.

Results: ``backward.json``, ``backward.md`` and ``backward_gflops.png`` under
``benchmarks/results/<machine folder>/`` (bench_forward.machine_folder()).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_forward as bf  # noqa: E402  (machine description, thread control, folders)

DIMS = (64, 128)
LENS = (512, 1024, 2048, 4096)
QUICK_LENS = (512, 2048)
DTYPES = ("float32", "bfloat16")
B, H = 1, 8
MEMORY = {"L": 16384, "H": 8, "D": 64}


def flops(L, D, causal, backward=True):
    f = 4.0 * B * H * L * L * D / (2 if causal else 1)
    return f * (2.5 if backward else 1.0)


def make_case(dtype, L, D, causal, threads, seed=0):
    import ml_dtypes
    import mha_ext
    import torch

    rng = np.random.default_rng(seed)
    q, k, v, g = (rng.standard_normal((B, H, L, D), dtype=np.float32) for _ in range(4))
    tdt = torch.float32 if dtype == "float32" else torch.bfloat16
    tq, tk, tv = (torch.from_numpy(x).to(tdt).requires_grad_() for x in (q, k, v))
    tg = torch.from_numpy(g).to(tdt)
    if dtype == "bfloat16":
        q, k, v, g = (x.astype(ml_dtypes.bfloat16) for x in (q, k, v, g))
    out, lse = mha_ext.attention(q, k, v, causal=causal, return_lse=True, num_threads=threads)
    F = torch.nn.functional
    graph = {"out": F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)}

    def ours_bwd():
        return mha_ext.attention_backward(g, q, k, v, out, lse, causal=causal,
                                          num_threads=threads)

    def ours_both():
        o, s = mha_ext.attention(q, k, v, causal=causal, return_lse=True, num_threads=threads)
        return mha_ext.attention_backward(g, q, k, v, o, s, causal=causal, num_threads=threads)

    def torch_bwd():
        return torch.autograd.grad(graph["out"], (tq, tk, tv), tg, retain_graph=True)

    def torch_both():
        o = F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
        return torch.autograd.grad(o, (tq, tk, tv), tg)

    return {"mha_ext_bwd": ours_bwd, "torch_bwd": torch_bwd, "mha_ext_fwd_bwd": ours_both,
            "torch_fwd_bwd": torch_both}


def validate(calls, dtype):
    ours = [np.asarray(x, dtype=np.float32) for x in calls["mha_ext_bwd"]()]
    theirs = [x.float().numpy() for x in calls["torch_bwd"]()]
    err = max(float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))
              for a, b in zip(ours, theirs))
    limit = 1e-4 if dtype == "float32" else 5e-2
    return {"max_rel_diff": err, "ok": err <= limit}


def run_case(dtype, L, D, causal, threads, reps, log):
    calls = make_case(dtype, L, D, causal, threads)
    check = validate(calls, dtype)
    names = list(calls)
    times = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            t = time.perf_counter()
            calls[n]()
            times[n].append(time.perf_counter() - t)
    med = {n: statistics.median(ts) for n, ts in times.items()}
    row = {
        "dtype": dtype, "L": L, "D": D, "causal": causal, "validation": check,
        "ms": {n: 1e3 * m for n, m in med.items()},
        "gflops": {n: (flops(L, D, causal) + (flops(L, D, causal, False) if "fwd" in n else 0))
                   / m / 1e9 for n, m in med.items()},
        "speedup_bwd": med["torch_bwd"] / med["mha_ext_bwd"],
        "speedup_fwd_bwd": med["torch_fwd_bwd"] / med["mha_ext_fwd_bwd"],
    }
    log(f"{dtype:8s} D={D:3d} L={L:5d} causal={causal!s:5s}  bwd {row['ms']['mha_ext_bwd']:8.1f} "
        f"ms vs torch {row['ms']['torch_bwd']:8.1f} ms ({row['speedup_bwd']:.2f}x); fwd+bwd "
        f"{row['speedup_fwd_bwd']:.2f}x; validation {check['max_rel_diff']:.1e}")
    return row


def memory_child(side, L, H_, D, threads, causal):
    """Fresh process: peak RSS growth of one backward call beyond its inputs and outputs."""
    rng = np.random.default_rng(3)
    q, k, v, g = (rng.standard_normal((1, H_, L, D), dtype=np.float32) for _ in range(4))
    if side == "mha_ext":
        import mha_ext

        out, lse = mha_ext.attention(q, k, v, causal=causal, return_lse=True,
                                     num_threads=threads)

        def run():
            return mha_ext.attention_backward(g, q, k, v, out, lse, causal=causal,
                                              num_threads=threads)
    else:
        import torch

        torch.set_num_threads(threads)
        tq, tk, tv = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
        tg = torch.from_numpy(g)

        def run():
            return torch.autograd.grad(o, (tq, tk, tv), tg)
    Path("/proc/self/clear_refs").write_text("5")
    rss0, hwm0 = bf._status_kb("VmRSS"), bf._status_kb("VmHWM")
    t0 = time.perf_counter()
    grads = run()
    seconds = time.perf_counter() - t0
    hwm1 = bf._status_kb("VmHWM")
    returned = sum(x.nbytes for x in grads) if side == "mha_ext" else sum(
        x.numel() * x.element_size() for x in grads)
    extra = (hwm1 - max(rss0, hwm0)) * 1024 - returned
    return {"side": side, "shape": [1, H_, L, D], "causal": causal, "threads": threads,
            "inputs_mb": 6 * q.nbytes / 2**20, "gradients_mb": returned / 2**20,
            "extra_mb": max(extra, 0) / 2**20, "seconds": seconds}


def measure_memory(side, L, threads, causal=True):
    cmd = [sys.executable, __file__, "--memory-child", side, str(L), str(MEMORY["H"]),
           str(MEMORY["D"]), str(threads), str(int(causal))]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    if res.returncode != 0:
        return {"side": side, "L": L, "error": res.stderr[-2000:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def geomean(xs):
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def summarise(rows, memory):
    out = {}
    for dtype in DTYPES:
        sp = [r["speedup_bwd"] for r in rows if r["dtype"] == dtype]
        if sp:
            out[dtype] = {"geomean": geomean(sp), "min": min(sp),
                          "pass": geomean(sp) >= 1.5 and min(sp) >= 1.0}
    m = next((x for x in memory if x.get("side") == "mha_ext" and x.get("shape", [0, 0, 0])[2]
              == MEMORY["L"]), None)
    if m and "extra_mb" in m:
        out["memory_16k"] = {"extra_mb": m["extra_mb"], "pass": m["extra_mb"] < 128}
    return out


def write_markdown(res, path):
    m = res["machine"]
    cpu = m["cpu"]
    info = m["mha_ext"]
    lines = [
        "# mha_ext backward benchmark" + (" (quick)" if res["quick"] else ""),
        "",
        f"- CPU: {cpu['model']} ({cpu['usable_cpus']} usable CPUs, flags "
        f"{', '.join(cpu['flags'])})",
        f"- SIMD path in use: {info.get('simd')} (supported: "
        f"{', '.join(info.get('simd_supported', []))}), compiler {info.get('compiler')}",
        f"- threads: {m['threads']} for both sides; torch {m.get('torch')}, numpy {m['numpy']}",
        f"- load average before / after: {res['load_before']} / {res['load_after']}; "
        f"total {res['seconds']:.0f} s",
        f"- timing: validation call (= warmup), then {res['reps']} interleaved repetitions in "
        "rotating order, median",
        "",
        "## SPEC section 7: CPU backward",
        "",
        "| target | goal | measured | status |",
        "|---|---|---|---|",
    ]
    s = res["summary"]
    for dtype in DTYPES:
        if dtype in s:
            x = s[dtype]
            lines.append(f"| {dtype} backward vs torch SDPA backward | geomean >= 1.5x, min >= "
                         f"1.0x | geomean {x['geomean']:.2f}x, min {x['min']:.2f}x | "
                         f"{'pass' if x['pass'] else 'FAIL'} |")
    if "memory_16k" in s:
        x = s["memory_16k"]
        lines.append(f"| extra memory, backward L=16k H=8 D=64 | < 128 MB | {x['extra_mb']:.1f} "
                     f"MB | {'pass' if x['pass'] else 'FAIL'} |")
    if (path.parent / "backward_profile.md").exists():
        lines += ["", "Where the time goes and what closes the gap: `backward_profile.md`."]
    lines += ["", "## Backward and forward + backward, B = 1, H = 8 (ms median; GFLOP/s)", "",
              "| dtype | D | L | causal | mha_ext bwd ms | GF/s | torch bwd ms | GF/s | bwd "
              "speedup | mha_ext fwd+bwd ms | torch fwd+bwd ms | fwd+bwd speedup |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        ms, gf = r["ms"], r["gflops"]
        lines.append(
            f"| {r['dtype']} | {r['D']} | {r['L']} | {r['causal']} | {ms['mha_ext_bwd']:.1f} | "
            f"{gf['mha_ext_bwd']:.1f} | {ms['torch_bwd']:.1f} | {gf['torch_bwd']:.1f} | "
            f"{r['speedup_bwd']:.2f}x | {ms['mha_ext_fwd_bwd']:.1f} | {ms['torch_fwd_bwd']:.1f} | "
            f"{r['speedup_fwd_bwd']:.2f}x |")
    lines += ["", "## Peak extra memory of one backward call (fresh process)", "",
              "| side | shape | causal | extra MB | inputs MB | returned gradients MB | s |",
              "|---|---|---|---|---|---|---|"]
    for x in res["memory"]:
        if "error" in x:
            lines.append(f"| {x['side']} | L={x['L']} | | error | | | |")
        else:
            lines.append(f"| {x['side']} | {x['shape']} | {x['causal']} | {x['extra_mb']:.1f} | "
                         f"{x['inputs_mb']:.0f} | {x['gradients_mb']:.0f} | {x['seconds']:.1f} |")
    lines += ["", "Rerun: `python benchmarks/bench_backward.py` (add `--quick` for L 512 and 2048 "
              "only)."]
    path.write_text("\n".join(lines) + "\n")


def write_plot(res, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(DTYPES), figsize=(11, 4), sharey=True)
    for ax, dtype in zip(axes, DTYPES):
        for D in DIMS:
            for causal in (False, True):
                rows = [r for r in res["rows"] if r["dtype"] == dtype and r["D"] == D
                        and r["causal"] == causal]
                if not rows:
                    continue
                Ls = [r["L"] for r in rows]
                label = f"D={D}{' causal' if causal else ''}"
                ls = "--" if causal else "-"
                (line,) = ax.plot(Ls, [r["gflops"]["mha_ext_bwd"] for r in rows], ls,
                                  marker="o", label=f"mha_ext {label}")
                ax.plot(Ls, [r["gflops"]["torch_bwd"] for r in rows], ls, marker="x",
                        color=line.get_color(), alpha=0.5, label=f"torch {label}")
        ax.set(xscale="log", xlabel="L", title=f"backward, {dtype}, B=1 H=8")
        ax.minorticks_off()
        ax.set_xticks(list(LENS), [str(x) for x in LENS])
    axes[0].set_ylabel("GFLOP/s (2.5 x forward FLOPs)")
    axes[-1].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{res['machine']['cpu']['model']}, {res['machine']['threads']} threads, "
                 f"simd {res['machine']['mha_ext'].get('simd')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--memory-child", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        side, L, H_, D, threads, causal = args.memory_child
        print(json.dumps(memory_child(side, int(L), int(H_), int(D), int(threads),
                                      bool(int(causal)))))
        return 0
    threads = args.threads or bf.cpu_description()["usable_cpus"]
    control = bf.set_threads(threads)
    t0 = time.time()
    res = {"quick": args.quick, "reps": args.reps, "load_before": bf.load_average()}
    res["machine"] = bf.machine_description(threads, {k: v for k, v in control.items()
                                                      if not k.startswith("_")})
    lens = QUICK_LENS if args.quick else LENS
    rows = []
    for dtype in DTYPES:
        for D in DIMS:
            for causal in (False, True):
                for L in lens:
                    rows.append(run_case(dtype, L, D, causal, threads, args.reps,
                                         lambda s: print(s, flush=True)))
    res["rows"] = rows
    memory = []
    if not args.no_memory:
        for side, L in (("mha_ext", MEMORY["L"]), ("mha_ext", 4096), ("torch", 4096)):
            memory.append(measure_memory(side, L, threads))
            print("memory", memory[-1], flush=True)
    res["memory"] = memory
    res["summary"] = summarise(rows, memory)
    res["load_after"] = bf.load_average()
    res["seconds"] = time.time() - t0
    folder = Path(args.out) / res["machine"]["cpu"]["machine_folder"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "backward.json").write_text(json.dumps(res, indent=1, default=str))
    write_markdown(res, folder / "backward.md")
    write_plot(res, folder / "backward_gflops.png")
    print(json.dumps(res["summary"], indent=1))
    print(f"written to {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
