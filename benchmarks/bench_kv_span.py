"""Head-spanning decode (issue 12) against the old (batch, head) tile loop, in one process.

    python benchmarks/bench_kv_span.py [--threads 2] [--lk 32768] [--reps 7] [--hk 8,32]
                                       [--lq 1] [--bs 16,256] [--pf]

Decode (B = 1, Lq = 1, Hq = 32, D = 128, float32) on the (B, Lk, Hk, D) cache and on paged
pools (shuffled blocks): every call runs on the new path and, with MHA_EXT_KV_SPAN=0 (read per
call), on the old one; `attention` on a (B, Hk, Lk, D) copy is the bhld reference and a
read bandwidth is the best of a threaded NumPy sum, a BLAS sgemv and torch.sum over 256 MB
(bench_forward.measure_ceilings' methods). All interleaved, round by round, median of
--reps, so the ratios hold even while the VM's bandwidth moves. Prints GB/s of K+V read and
the fraction of the read bandwidth of the same rounds. Nothing is written.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import time

import mha_ext
import numpy as np


def old_path(fn):
    def run():
        os.environ["MHA_EXT_KV_SPAN"] = "0"
        try:
            return fn()
        finally:
            del os.environ["MHA_EXT_KV_SPAN"]
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lk", type=int, default=32768)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--hk", default="8,32")
    ap.add_argument("--lq", type=int, default=1)
    ap.add_argument("--bs", default="16,256")
    args = ap.parse_args()
    th, Lk, Hq, D, Lq = args.threads, args.lk, 32, 128, args.lq
    rng = np.random.default_rng(1)
    big = np.ones((256 << 20) // 4, np.float32)
    chunks = np.array_split(big, th)
    pool = concurrent.futures.ThreadPoolExecutor(th)
    mat, vec = big.reshape(-1, 4096), np.ones(4096, np.float32)
    reads = {"read_sum": lambda: list(pool.map(np.add.reduce, chunks)),
             "read_sgemv": lambda: mat @ vec}
    try:
        import torch

        torch.set_num_threads(th)
        tbig = torch.from_numpy(big)
        reads["read_torch"] = tbig.sum
    except ImportError:
        pass
    for Hk in (int(x) for x in args.hk.split(",")):
        q = rng.standard_normal((1, Lq, Hq, D), dtype=np.float32)
        kc = rng.standard_normal((1, Lk, Hk, D), dtype=np.float32)
        vc = rng.standard_normal((1, Lk, Hk, D), dtype=np.float32)
        kb, vb = np.ascontiguousarray(kc.transpose(0, 2, 1, 3)), np.ascontiguousarray(
            vc.transpose(0, 2, 1, 3))
        qb = np.ascontiguousarray(q.transpose(0, 2, 1, 3))
        seql = np.array([Lk])
        kv_bytes = kc.nbytes + vc.nbytes
        calls = dict(reads)
        calls.update({
            "bhld": lambda: mha_ext.attention(qb, kb, vb, causal=True, num_threads=th),
            "contig": lambda: mha_ext.attention_kvcache(q, kc, vc, seql, num_threads=th),
        })
        for bs in (int(x) for x in args.bs.split(",")):
            nb = Lk // bs
            perm = rng.permutation(nb)
            kp = np.empty((nb, bs, Hk, D), np.float32)
            vp = np.empty((nb, bs, Hk, D), np.float32)
            kp[perm] = kc[0].reshape(nb, bs, Hk, D)
            vp[perm] = vc[0].reshape(nb, bs, Hk, D)
            t = perm[None].astype(np.int32)
            calls[f"paged{bs}"] = lambda kp=kp, vp=vp, t=t: mha_ext.attention_kvcache(
                q, kp, vp, seql, block_table=t, num_threads=th)
        for name in [n for n in calls if n not in reads and n != "bhld"]:
            calls[name + "_old"] = old_path(calls[name])
        ref = calls["contig"]()
        for name, fn in calls.items():
            if name not in reads:
                out = fn()
                if name == "bhld":
                    out = out.transpose(0, 2, 1, 3)
                err = float(np.max(np.abs(out - ref)))
                assert err < 1e-5, (name, err)
        samples = {n: [] for n in calls}
        for _ in range(args.reps):
            for n, fn in calls.items():
                t0 = time.perf_counter()
                fn()
                samples[n].append(time.perf_counter() - t0)
        med = {n: statistics.median(s) for n, s in samples.items()}
        read_gbps = big.nbytes / min(med[n] for n in reads) * 1e-9
        best = min(reads, key=lambda n: med[n])
        print(f"Hq={Hq} Hk={Hk} Lk={Lk} Lq={Lq} D={D} threads={th}: read {read_gbps:.1f} GB/s "
              f"({best})")
        for n in calls:
            if n in reads:
                continue
            gbps = kv_bytes / med[n] * 1e-9
            extra = ""
            if n + "_old" in med:
                extra = f"  new/old speed {med[n + '_old'] / med[n]:.2f}x"
            print(f"  {n:14s} {med[n] * 1e3:8.2f} ms {gbps:6.1f} GB/s "
                  f"{gbps / read_gbps:5.0%} of read{extra}", flush=True)
        del kc, vc, kb, vb, calls


if __name__ == "__main__":
    main()
