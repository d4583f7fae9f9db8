"""Serving and scale-out benchmark: decode, varlen, ALiBi/softcap, merge, Dask (SPEC 7).

    python benchmarks/bench_serving.py [--threads N] [--quick] [--out DIR]
                                       [--no-dask] [--no-merge] [--only decode,varlen,...]

- decode: ``attention_kvcache`` with one new token (Lq = 1, Lk = 32k, Hq = 32, Hk = 8 and 32,
  D = 128, float32): contiguous cache and paged caches of block size 16 ... 256 (blocks in a
  shuffled pool), bytes of K and V read per call against the machine's read bandwidth;
  target >= 70%. GQA (Hk = 8) must read each K/V head once per group.
- varlen: ``attention_varlen`` on a long-tailed batch (lognormal lengths, causal) against the
  same batch padded to its longest sequence (``attention`` with ``key_lengths``).
- alibi/softcap: ``attention`` forward with ``alibi_slopes`` / ``softcap`` / both against the
  plain call (same shape, causal and not); target >= 85% of the plain rate.

- merge: ``mha_ext.merge`` of 2 / 4 / 8 partial outputs against the machine's copy bandwidth
  (bytes read + written, as ``np.copyto`` into an existing array is counted); target >= 50%.
  Two rows: the plain call (a fresh result, its page faults timed) and ``out=`` a reused
  buffer (the copy's footing).
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
    """merge of 2 / 4 / 8 parts, bytes read + written against the copy bandwidth.

    Copy bandwidth is threaded ``np.copyto`` into a destination that already exists (its pages
    mapped), counted as read + write of the copied bytes. Two merge calls, interleaved:
    ``fresh``, the plain call, which allocates its result, so the time includes the first-touch
    page faults of a new 64 MB array (the kernel's zeroing of those pages, done once per call:
    a cost np.copyto's figure does not carry); ``out``, the same merge into a reused result
    buffer (``out=``, np.empty, so not cache-line aligned), on the footing of the copy.
    """
    rng = np.random.default_rng(0)
    rows = []
    shape = (4, 32, 256, 128) if quick else (8, 32, 512, 128)  # 16 / 64 MB per float32 part
    for parts in (2, 4, 8):
        outs = [rng.standard_normal(shape, dtype=np.float32) for _ in range(parts)]
        lses = [rng.standard_normal(shape[:3], dtype=np.float32) for _ in range(parts)]
        buf = np.empty(shape, np.float32)
        t = interleaved(
            {"merge": lambda o=outs, x=lses: mha_ext.merge(o, x, num_threads=threads),
             "out": lambda o=outs, x=lses, b=buf: mha_ext.merge(o, x, num_threads=threads, out=b)},
            reps,
        )
        # Bytes read (every part's out and lse) + written (the merged out and lse).
        moved = sum(o.nbytes for o in outs) + sum(x.nbytes for x in lses)
        moved += outs[0].nbytes + lses[0].nbytes
        gbps = moved / t["merge"] * 1e-9
        out_gbps = moved / t["out"] * 1e-9
        rows.append(
            {
                "parts": parts,
                "part_shape": list(shape),
                "part_mb": outs[0].nbytes / 2**20,
                "merge_ms": t["merge"] * 1e3,
                "merge_gbps": gbps,
                "out_ms": t["out"] * 1e3,
                "out_gbps": out_gbps,
                "copy_gbps": copy_gbps,
                "fraction_of_copy": gbps / copy_gbps,
                "out_fraction_of_copy": out_gbps / copy_gbps,
            }
        )
        print(f"merge {parts} parts of {shape}: fresh {t['merge'] * 1e3:.1f} ms, {gbps:.1f} GB/s "
              f"({gbps / copy_gbps:.0%} of copy {copy_gbps:.1f} GB/s); out= {t['out'] * 1e3:.1f} "
              f"ms, {out_gbps:.1f} GB/s ({out_gbps / copy_gbps:.0%})", flush=True)
        del outs, lses, buf
    return rows


def bench_decode(threads: int, reps: int, read_gbps: float, quick: bool) -> list:
    """Decode bandwidth: contiguous and paged caches (block sizes 16 ... 256)."""
    rng = np.random.default_rng(1)
    Lk = 8192 if quick else 32768
    Hq, D = 32, 128
    rows = []
    for Hk in (8, 32):
        q = rng.standard_normal((1, 1, Hq, D), dtype=np.float32)
        kc = rng.standard_normal((1, Lk, Hk, D), dtype=np.float32)
        vc = rng.standard_normal((1, Lk, Hk, D), dtype=np.float32)
        seql = np.array([Lk])
        kv_bytes = kc.nbytes + vc.nbytes
        calls = {"contiguous": lambda: mha_ext.attention_kvcache(
            q, kc, vc, seql, num_threads=threads)}
        pools = {}
        for bs in (16, 32, 64, 128, 256):
            nb = Lk // bs
            perm = rng.permutation(nb)
            kp = np.empty((nb, bs, Hk, D), np.float32)
            vp = np.empty((nb, bs, Hk, D), np.float32)
            kp[perm] = kc[0].reshape(nb, bs, Hk, D)
            vp[perm] = vc[0].reshape(nb, bs, Hk, D)
            table = perm[None].astype(np.int32)
            pools[bs] = (kp, vp, table)
            calls[f"paged_{bs}"] = lambda kp=kp, vp=vp, t=table: mha_ext.attention_kvcache(
                q, kp, vp, seql, block_table=t, num_threads=threads)
        ref = calls["contiguous"]()
        for name, fn in calls.items():  # validate first: every layout gives the same result
            err = float(np.max(np.abs(fn() - ref)))
            assert err < 1e-5, (name, err)
        t = interleaved(calls, reps)
        for name, sec in t.items():
            gbps = kv_bytes / sec * 1e-9
            rows.append({
                "Hq": Hq, "Hk": Hk, "Lk": Lk, "D": D, "cache": name,
                "block_size": int(name.split("_")[1]) if name.startswith("paged") else None,
                "ms": sec * 1e3, "kv_mb": kv_bytes / 2**20, "gbps": gbps,
                "read_gbps": read_gbps, "fraction_of_read": gbps / read_gbps,
            })
            print(f"decode Hq={Hq} Hk={Hk} Lk={Lk} {name}: {sec * 1e3:.2f} ms, {gbps:.1f} GB/s "
                  f"({gbps / read_gbps:.0%} of read {read_gbps:.1f} GB/s)", flush=True)
        del kc, vc, pools, calls
    return rows


def bench_varlen(threads: int, reps: int, quick: bool) -> dict:
    """Long-tailed lengths: varlen against the same batch padded to its longest sequence."""
    rng = np.random.default_rng(2)
    n = 16 if quick else 32
    lens = np.clip(rng.lognormal(5.0, 1.0, n).astype(int), 8, 1024 if quick else 2048)
    lens[0] = lens.max()  # one long sequence among short ones
    H, D = 8, 64
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    total, lmax = int(cu[-1]), int(lens.max())
    q, k, v = (rng.standard_normal((total, H, D), dtype=np.float32) for _ in range(3))
    pad = [np.zeros((n, lmax, H, D), np.float32) for _ in range(3)]
    for b in range(n):
        for x, src in zip(pad, (q, k, v)):
            x[b, : lens[b]] = src[cu[b] : cu[b + 1]]
    # Padded as a padded batch runs: tokens at the start of each row, key padding through
    # key_lengths, top-left causal (= per-sequence causal for Lq = Lk); the padding query rows
    # are computed like real ones.
    calls = {
        "varlen": lambda: mha_ext.attention_varlen(q, k, v, cu, cu, causal=True,
                                                   num_threads=threads),
        "padded": lambda: mha_ext.attention(pad[0], pad[1], pad[2], causal="top_left",
                                            key_lengths=lens, layout="blhd",
                                            num_threads=threads),
    }
    a, b_ = calls["varlen"](), calls["padded"]()
    err = max(float(np.max(np.abs(a[cu[b] : cu[b + 1]] - b_[b, : lens[b]])))
              for b in range(n))
    assert err < 1e-4, err
    t = interleaved(calls, reps)
    flops = sum(2.0 * H * int(x) * int(x) * D for x in lens)  # causal: half of 4 H L^2 D
    res = {
        "sequences": n, "lengths": lens.tolist(), "total_tokens": total, "longest": lmax,
        "padded_tokens": n * lmax, "H": H, "D": D, "causal": True,
        "varlen_ms": t["varlen"] * 1e3, "padded_ms": t["padded"] * 1e3,
        "speedup": t["padded"] / t["varlen"], "varlen_gflops": flops / t["varlen"] * 1e-9,
        "max_abs_diff": err,
    }
    print(f"varlen {n} seqs ({total} tokens, longest {lmax}): {res['varlen_ms']:.1f} ms vs "
          f"padded {res['padded_ms']:.1f} ms ({res['speedup']:.2f}x)", flush=True)
    return res


def bench_alibi_softcap(threads: int, reps: int, quick: bool) -> list:
    """ALiBi / softcap / both against the plain forward (same shape and threads)."""
    rng = np.random.default_rng(3)
    B, H, L, D = 1, 8, (1024 if quick else 2048), 64
    q, k, v = (rng.standard_normal((B, H, L, D), dtype=np.float32) for _ in range(3))
    slopes = 2.0 ** (-8.0 * np.arange(1, H + 1) / H)
    rows = []
    for causal in (False, True):
        calls = {
            "plain": lambda c=causal: mha_ext.attention(q, k, v, causal=c, num_threads=threads),
            "alibi": lambda c=causal: mha_ext.attention(q, k, v, causal=c, alibi_slopes=slopes,
                                                        num_threads=threads),
            "softcap": lambda c=causal: mha_ext.attention(q, k, v, causal=c, softcap=30.0,
                                                          num_threads=threads),
            "alibi+softcap": lambda c=causal: mha_ext.attention(
                q, k, v, causal=c, alibi_slopes=slopes, softcap=30.0, num_threads=threads),
        }
        t = interleaved(calls, reps)
        flops = 4.0 * B * H * L * L * D * (0.5 if causal else 1.0)
        for name, sec in t.items():
            rows.append({"L": L, "H": H, "D": D, "causal": causal, "variant": name,
                         "ms": sec * 1e3, "gflops": flops / sec * 1e-9,
                         "fraction_of_plain": t["plain"] / sec})
            print(f"{'causal' if causal else 'full'} L={L} {name}: {sec * 1e3:.1f} ms, "
                  f"{flops / sec * 1e-9:.1f} GFLOP/s ({t['plain'] / sec:.0%} of plain)",
                  flush=True)
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
        "# mha_ext serving benchmark (decode, varlen, ALiBi/softcap, merge, Dask)",
        "",
        (f"- CPU: {m['cpu']['model']} ({m['cpu']['usable_cpus']} usable CPUs, flags "
        f"{', '.join(m['cpu']['flags'])}); path in use: simd {m['mha_ext']['simd']}"),
        f"- threads: {res['threads']}; numpy {m['numpy']}, mha_ext {m['mha_ext']['version']}",
        f"- copy bandwidth (read + write): {res['copy_gbps']:.1f} GB/s",
        "- timing: one warm-up per side, then interleaved rounds, median",
        "",
        f"- read bandwidth: {res['read_gbps']:.1f} GB/s ({res['ceilings'].get('read_bandwidth_method')})",
    ]
    if res.get("decode"):
        lines += [
            "",
            "## decode, Lq = 1 (target >= 70% of read bandwidth)",
            "",
            "| Hq | Hk | Lk | D | cache | ms | K+V MB | GB/s | of read |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in res["decode"]:
            lines.append(f"| {r['Hq']} | {r['Hk']} | {r['Lk']} | {r['D']} | {r['cache']} | "
                         f"{r['ms']:.2f} | {r['kv_mb']:.0f} | {r['gbps']:.1f} | "
                         f"{r['fraction_of_read']:.0%} |")
    if res.get("varlen"):
        r = res["varlen"]
        lines += [
            "",
            "## varlen vs the same batch padded to its longest sequence (causal)",
            "",
            (f"{r['sequences']} sequences, lognormal lengths, {r['total_tokens']} tokens, longest "
             f"{r['longest']} ({r['padded_tokens']} padded tokens), H={r['H']} D={r['D']}."),
            "",
            "| varlen ms | padded ms | speedup | varlen GFLOP/s | max abs diff |",
            "|---|---|---|---|---|",
            (f"| {r['varlen_ms']:.1f} | {r['padded_ms']:.1f} | {r['speedup']:.2f}x | "
             f"{r['varlen_gflops']:.1f} | {r['max_abs_diff']:.1e} |"),
        ]
    if res.get("alibi_softcap"):
        lines += [
            "",
            "## ALiBi / softcap vs plain (target >= 85% of the plain rate)",
            "",
            "| L | H | D | causal | variant | ms | GFLOP/s | of plain |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in res["alibi_softcap"]:
            lines.append(f"| {r['L']} | {r['H']} | {r['D']} | {r['causal']} | {r['variant']} | "
                         f"{r['ms']:.1f} | {r['gflops']:.1f} | {r['fraction_of_plain']:.0%} |")
    lines += [
        "",
        "## merge (target >= 50% of copy bandwidth)",
        "",
        ("Copy: threaded np.copyto into an existing array, read + write. fresh: the plain call, "
         "whose new result's first-touch page faults are in its time; out=: into a reused "
         "buffer, as the copy is."),
        "",
        "| parts | part MB | fresh ms | fresh GB/s | of copy | out= ms | out= GB/s | of copy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res.get("merge", []):
        lines.append(f"| {r['parts']} | {r['part_mb']:.0f} | {r['merge_ms']:.1f} | "
                     f"{r['merge_gbps']:.1f} | {r['fraction_of_copy']:.0%} | "
                     f"{r.get('out_ms', float('nan')):.1f} | {r.get('out_gbps', float('nan')):.1f} | "
                     f"{r.get('out_fraction_of_copy', float('nan')):.0%} |")
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

    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    ax = axes[2:]
    if res.get("decode"):
        a = axes[0]
        for hk in sorted({r["Hk"] for r in res["decode"]}):
            rs = [r for r in res["decode"] if r["Hk"] == hk]
            a.plot([r["cache"].replace("paged_", "") for r in rs], [r["gbps"] for r in rs],
                   "o-", label=f"Hk={hk}")
        a.axhline(res["read_gbps"], color="k", ls="--", label="read bandwidth")
        a.axhline(0.7 * res["read_gbps"], color="r", ls=":", label="target 70%")
        a.set_xlabel("cache (paged: block size)")
        a.set_ylabel("GB/s of K+V")
        a.set_title("decode Lq=1, Lk=%d, Hq=32, D=128" % res["decode"][0]["Lk"])
        a.legend(fontsize=7)
    if res.get("alibi_softcap"):
        a = axes[1]
        for c in (False, True):
            rs = [r for r in res["alibi_softcap"] if r["causal"] == c]
            a.plot([r["variant"] for r in rs], [r["fraction_of_plain"] for r in rs], "o-",
                   label="causal" if c else "full")
        a.axhline(0.85, color="r", ls=":", label="target 85%")
        a.set_ylabel("rate / plain rate")
        a.set_title("ALiBi / softcap")
        a.legend(fontsize=7)
    parts = [r["parts"] for r in res.get("merge", [])]
    xs = np.arange(len(parts))
    ax[0].bar(xs - 0.2, [r["merge_gbps"] for r in res.get("merge", [])], 0.4,
              label="merge (fresh result)")
    ax[0].bar(xs + 0.2, [r.get("out_gbps", 0.0) for r in res.get("merge", [])], 0.4,
              label="merge out= (reused)")
    ax[0].set_xticks(xs, [str(p) for p in parts])
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
    p.add_argument("--no-merge", action="store_true")
    p.add_argument("--only", default="", help="comma list of decode,varlen,alibi (default all)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    control = bf.set_threads(args.threads)
    machine = bf.machine_description(args.threads, {k: v for k, v in control.items() if k != "_keep"})
    ceil = bf.measure_ceilings(args.threads, 3, 256 << 20)
    res = {"machine": machine, "threads": args.threads, "copy_gbps": ceil["copy_bandwidth_gbps"],
           "ceilings": ceil}
    res["read_gbps"] = ceil["read_bandwidth_gbps"]
    only = set(filter(None, args.only.split(",")))
    if not only or "decode" in only:
        res["decode"] = bench_decode(args.threads, args.reps, res["read_gbps"], args.quick)
    if not only or "varlen" in only:
        res["varlen"] = bench_varlen(args.threads, args.reps, args.quick)
    if not only or "alibi" in only:
        res["alibi_softcap"] = bench_alibi_softcap(args.threads, args.reps, args.quick)
    if not args.no_merge:
        res["merge"] = bench_merge(args.threads, args.reps, ceil["copy_bandwidth_gbps"],
                                   args.quick)
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
