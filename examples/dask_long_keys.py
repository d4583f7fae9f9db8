"""64 query rows attending over a 2-million-key sequence sharded across Dask workers.

Starts a ``distributed.LocalCluster`` (two worker processes), generates the keys and values on
the workers in 64 MB chunks, so no process ever holds the whole sequence, and runs
``mha_ext.dask.attention``: each worker attends to the chunks it holds, and the partial
results are merged by their lse in a tree. Prints the dashboard address while it runs, then
checks the result against one in-process call on the gathered data (small enough here).

    pip install ".[dask]" && python examples/dask_long_keys.py [--keys 2000000]
"""

from __future__ import annotations

import argparse
import logging
import time

import dask.array as da
import distributed
import mha_ext
import mha_ext.dask
import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keys", type=int, default=2_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-check", action="store_true", help="skip the in-process comparison")
    args = p.parse_args()
    H, Lq, D = 1, 64, args.dim
    chunk = max(1, (64 << 20) // (4 * D))  # 64 MB of float32 keys per chunk

    with distributed.LocalCluster(n_workers=args.workers, threads_per_worker=1,
                                  dashboard_address=":0", silence_logs=logging.ERROR) as cluster, \
            distributed.Client(cluster) as client:
        print(f"dashboard: {client.dashboard_link}", flush=True)
        gen = da.random.default_rng(0)
        k = gen.standard_normal((1, H, args.keys, D), chunks=(1, H, chunk, D), dtype=np.float32)
        v = k.map_blocks(lambda x: np.tanh(x) * 2.0, dtype=np.float32)  # v_j next to k_j
        k, v = client.persist([k, v])
        distributed.wait([k, v])
        q = np.random.default_rng(1).standard_normal((1, H, Lq, D)).astype(np.float32)
        print(f"keys: {args.keys:,} x {D} float32 in {k.numblocks[2]} chunks of {chunk:,} "
              f"(k and v {k.nbytes / 2**20:.0f} MB each) on {args.workers} workers")
        t = time.perf_counter()
        out, lse = mha_ext.dask.attention(da.from_array(q, chunks=q.shape), k, v,
                                          return_lse=True)
        out, lse = client.compute([out, lse], sync=True)
        dt = time.perf_counter() - t
        gflop = 4 * H * Lq * args.keys * D / 1e9
        print(f"mha_ext.dask.attention: {dt * 1e3:.0f} ms ({gflop / dt:.1f} GFLOP/s), "
              f"out {out.shape}, lse range [{lse.min():.2f}, {lse.max():.2f}]")
        if not args.no_check:
            kn, vn = client.compute([k, v], sync=True)
            t = time.perf_counter()
            one = mha_ext.attention(q, kn, vn)
            dt1 = time.perf_counter() - t
            # float64 reference: softmax(q k^T / sqrt(D)) v
            s = (q[0, 0].astype(np.float64) @ kn[0, 0].T.astype(np.float64)) / np.sqrt(D)
            s = np.exp(s - s.max(axis=1, keepdims=True))
            ref = (s @ vn[0, 0].astype(np.float64)) / s.sum(axis=1, keepdims=True)
            err_dask = float(np.max(np.abs(out[0, 0] - ref)))
            err_one = float(np.max(np.abs(one[0, 0] - ref)))
            print(f"one in-process call: {dt1 * 1e3:.0f} ms; max error vs float64: "
                  f"dask {err_dask:.2e}, in-process {err_one:.2e}")
            assert err_dask <= 2 * err_one + 1e-6, (err_dask, err_one)
            print("CHECK OK")


if __name__ == "__main__":
    main()
