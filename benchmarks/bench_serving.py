"""Serving and scale-out benchmark: merge bandwidth and Dask overhead (SPEC section 7).

    python benchmarks/bench_serving.py [--threads N] [--quick] [--out DIR]

- merge: ``mha_ext.merge`` of 2 / 4 / 8 partial outputs against the machine's copy bandwidth
  (bytes read + written, as ``np.copyto`` is counted); target >= 50%.
- dask: ``mha_ext.dask.attention`` on a 2-process ``distributed.LocalCluster`` (one thread per
  worker, so 2 threads in all) with key chunks of >= 64 MB that live on the workers, against
  one in-process ``mha_ext.attention`` call with 2 threads on the same data; target <= 1.3x
  the in-process time, and the same result.

Both sides of each comparison run in this process, interleaved, median of --reps samples
(one warm-up each first). Writes serving.json, serving.md and serving.png to --out (default
benchmarks/results/<machine folder>/).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_forward as bf
import mha_ext


def interleaved(fns: dict, reps: int) -> dict:
    """Median seconds of each callable, one warm-up each, then `reps` interleaved rounds."""
    for fn in fns.values():
        fn()
    samples = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t)
    return {name: statistics.median(s) for name, s in samples.items()}


def bench_merge(threads: int, reps: int, copy_gbps: float, quick: bool) -> list:
    rng = np.random.default_rng(0)
    rows = []
    shape = (4, 32, 256, 128) if quick else (8, 32, 512, 128)  # 16 / 64 MB per float32 part
    for parts in (2, 4, 8):
        outs = [rng.standard_normal(shape, dtype=np.float32) for _ in range(parts)]
        lses = [rng.standard_normal(shape[:3], dtype=np.float32) for _ in range(parts)]
        t = interleaved(
            {"merge": lambda o=outs, x=lses: mha_ext.merge(o, x, num_threads=threads)}, reps
        )
        # Bytes read (every part's out and lse) + written (the merged out and lse).
        moved = sum(o.nbytes for o in outs) + sum(x.nbytes for x in lses)
        moved += outs[0].nbytes + lses[0].nbytes
        gbps = moved / t["merge"] * 1e-9
        rows.append(
            {
                "parts": parts,
                "part_shape": list(shape),
                "part_mb": outs[0].nbytes / 2**20,
                "merge_ms": t["merge"] * 1e3,
                "merge_gbps": gbps,
                "copy_gbps": copy_gbps,
                "fraction_of_copy": gbps / copy_gbps,
            }
        )
        print(f"merge {parts} parts of {shape}: {t['merge'] * 1e3:.1f} ms, {gbps:.1f} GB/s "
              f"({gbps / copy_gbps:.0%} of copy {copy_gbps:.1f} GB/s)", flush=True)
        del outs, lses
    return rows


def bench_dask(reps: int, quick: bool) -> dict:
    import dask.array as da
    import distributed
    import mha_ext.dask

    B, H, Lq, D = 1, 8, 256, 64
    chunk_keys = (64 << 20) // (H * D * 4)  # 64 MB of float32 keys per chunk
    nchunks = 2 if quick else 8
    Lk = chunk_keys * nchunks
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None, silence_logs=logging.ERROR) as cluster, \
            distributed.Client(cluster) as client:
        gen = da.random.default_rng(3)
        k = gen.standard_normal((B, H, Lk, D), chunks=(1, H, chunk_keys, D), dtype=np.float32)
        v = k.map_blocks(lambda x: np.tanh(x), dtype=np.float32)
        k, v = client.persist([k, v])
        distributed.wait([k, v])
        kn, vn = client.compute([k, v], sync=True)
        q = np.random.default_rng(4).standard_normal((B, H, Lq, D)).astype(np.float32)
        dq = da.from_array(q, chunks=q.shape)
        graph_out = mha_ext.dask.attention(dq, k, v, num_threads=1)
        holder = {}

        def run_dask():
            holder["dask"] = client.compute(graph_out, sync=True)

        def run_local():
            holder["local"] = mha_ext.attention(q, kn, vn, num_threads=2)

        t = interleaved({"dask": run_dask, "in_process": run_local}, reps)
        err = float(np.max(np.abs(holder["dask"] - holder["local"])))
    flops = 4.0 * B * H * Lq * Lk * D
    res = {
        "shape": {"B": B, "H": H, "Lq": Lq, "Lk": Lk, "D": D},
        "key_chunk_mb": chunk_keys * H * D * 4 / 2**20,
        "key_chunks": nchunks,
        "workers": 2,
        "threads_per_worker": 1,
        "in_process_threads": 2,
        "dask_ms": t["dask"] * 1e3,
        "in_process_ms": t["in_process"] * 1e3,
        "ratio": t["dask"] / t["in_process"],
        "dask_gflops": flops / t["dask"] * 1e-9,
        "in_process_gflops": flops / t["in_process"] * 1e-9,
        "max_abs_diff": err,
    }
    print(f"dask {res['dask_ms']:.0f} ms vs in-process {res['in_process_ms']:.0f} ms: "
          f"{res['ratio']:.2f}x, max diff {err:.1e}", flush=True)
    return res


def write_markdown(res: dict, path: Path) -> None:
    m = res["machine"]
    lines = [
        "# mha_ext serving benchmark (merge, Dask)",
        "",
        (f"- CPU: {m['cpu']['model']} ({m['cpu']['usable_cpus']} usable CPUs, flags "
        f"{', '.join(m['cpu']['flags'])}); path in use: simd {m['mha_ext']['simd']}"),
        f"- threads: {res['threads']}; numpy {m['numpy']}, mha_ext {m['mha_ext']['version']}",
        f"- copy bandwidth (read + write): {res['copy_gbps']:.1f} GB/s",
        "- timing: one warm-up per side, then interleaved rounds, median",
        "",
        "## merge (target >= 50% of copy bandwidth)",
        "",
        "| parts | part MB | ms | GB/s | of copy |",
        "|---|---|---|---|---|",
    ]
    for r in res["merge"]:
        lines.append(f"| {r['parts']} | {r['part_mb']:.0f} | {r['merge_ms']:.1f} | "
                     f"{r['merge_gbps']:.1f} | {r['fraction_of_copy']:.0%} |")
    d = res.get("dask")
    if d:
        lines += [
            "",
            "## Dask on a 2-process LocalCluster (target <= 1.3x one in-process call)",
            "",
            (f"Shape B={d['shape']['B']} H={d['shape']['H']} Lq={d['shape']['Lq']} "
            f"Lk={d['shape']['Lk']:,} D={d['shape']['D']}, {d['key_chunks']} key chunks of "
            f"{d['key_chunk_mb']:.0f} MB living on the workers; 1 thread per worker vs 2 "
            "in-process threads."),
            "",
            "| dask ms | in-process ms | ratio | max abs diff |",
            "|---|---|---|---|",
            (f"| {d['dask_ms']:.0f} | {d['in_process_ms']:.0f} | {d['ratio']:.2f}x | "
            f"{d['max_abs_diff']:.1e} |"),
        ]
    path.write_text("\n".join(lines) + "\n")


def write_plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    parts = [r["parts"] for r in res["merge"]]
    ax[0].bar([str(p) for p in parts], [r["merge_gbps"] for r in res["merge"]], label="merge")
    ax[0].axhline(res["copy_gbps"], color="k", ls="--", label="copy bandwidth")
    ax[0].axhline(0.5 * res["copy_gbps"], color="r", ls=":", label="target 50%")
    ax[0].set_xlabel("parts")
    ax[0].set_ylabel("GB/s (read + write)")
    ax[0].set_title("mha_ext.merge")
    ax[0].legend()
    d = res.get("dask")
    if d:
        ax[1].bar(["in-process (2 threads)", "dask (2 workers)"], [d["in_process_ms"], d["dask_ms"]])
        ax[1].axhline(1.3 * d["in_process_ms"], color="r", ls=":", label="target 1.3x")
        ax[1].set_ylabel("ms")
        ax[1].set_title(f"Dask, {d['key_chunks']} key chunks of {d['key_chunk_mb']:.0f} MB")
        ax[1].legend()
    fig.suptitle(res["machine"]["cpu"]["model"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-dask", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    control = bf.set_threads(args.threads)
    machine = bf.machine_description(args.threads, {k: v for k, v in control.items() if k != "_keep"})
    ceil = bf.measure_ceilings(args.threads, 3, 256 << 20)
    res = {"machine": machine, "threads": args.threads, "copy_gbps": ceil["copy_bandwidth_gbps"],
           "ceilings": ceil}
    res["merge"] = bench_merge(args.threads, args.reps, ceil["copy_bandwidth_gbps"], args.quick)
    if not args.no_dask:
        res["dask"] = bench_dask(max(3, args.reps - 2), args.quick)
    out = args.out or Path(__file__).resolve().parent / "results" / bf.machine_folder(machine["cpu"])
    out.mkdir(parents=True, exist_ok=True)
    prefix = "quick_" if args.quick else ""
    (out / f"{prefix}serving.json").write_text(json.dumps(res, indent=2, default=str))
    write_markdown(res, out / f"{prefix}serving.md")
    write_plot(res, out / f"{prefix}serving.png")
    print(f"wrote {out}/{prefix}serving.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
