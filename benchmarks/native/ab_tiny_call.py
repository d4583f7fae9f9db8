"""A/B of the tiny-call overhead of two installed builds of mha_ext, in one process.

Usage: python benchmarks/native/ab_tiny_call.py OLD_SITE NEW_SITE [--calls 100000] [--rounds 7]

OLD_SITE and NEW_SITE are folders that each hold an installed ``mha_ext`` package (e.g. the
``--target`` of ``pip install``). Both are copied under the names ``mha_ext_a`` and
``mha_ext_b`` into a temporary folder and imported side by side, so both sides run in the same
process, interleaved round by round: each round times ``--calls`` calls of
``attention(q, q, q)`` with q (1, 1, 16, 16) float32 on each side. Prints the per-call median
over the rounds (microseconds), the ratio of the medians and the median of the per-round
ratios (robust to a machine whose load drifts between rounds).
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--calls", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mha_ab_"))
    try:
        for name, site in (("mha_ext_a", args.old), ("mha_ext_b", args.new)):
            shutil.copytree(Path(site) / "mha_ext", tmp / name)
        sys.path.insert(0, str(tmp))
        old = importlib.import_module("mha_ext_a")
        new = importlib.import_module("mha_ext_b")
        q = np.random.default_rng(0).standard_normal((1, 1, 16, 16)).astype(np.float32)
        np.testing.assert_array_equal(old.attention(q, q, q), new.attention(q, q, q))
        times: dict[str, list[float]] = {"old": [], "new": []}
        for f in (old.attention, new.attention):  # warm-up
            for _ in range(1000):
                f(q, q, q)
        for r in range(args.rounds):
            order = (("old", old.attention), ("new", new.attention))
            for label, f in order if r % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    f(q, q, q)
                times[label].append((time.perf_counter() - t0) / args.calls * 1e6)
        med = {k: statistics.median(v) for k, v in times.items()}
        ratios = [n / o for n, o in zip(times["new"], times["old"])]
        print(f"tiny call (1, 1, 16, 16) float32, {args.calls} calls x {args.rounds} rounds, "
              "interleaved, one process")
        for k in ("old", "new"):
            print(f"  {k}: median {med[k]:.3f} us/call  (rounds: "
                  + ", ".join(f"{x:.2f}" for x in times[k]) + ")")
        print(f"  new / old = {med['new'] / med['old']:.3f} (ratio of medians), "
              f"{statistics.median(ratios):.3f} (median of per-round ratios)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
