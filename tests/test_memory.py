"""Peak memory of the tiled kernels: no Lq x Lk (x A) buffer may appear.

Each case runs in a fresh subprocess that allocates its inputs and output first, then reads
the peak resident set (VmHWM) before and after the call: the growth is what the kernel itself
needed (scratch, threads' stacks and first-touch of library code).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

_CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import mha_ext

    def peak_mb():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
        raise RuntimeError("no VmHWM")

    cfg = json.loads(sys.argv[1])
    rng = np.random.default_rng(0)
    B, H, L, D = cfg["B"], cfg["H"], cfg["L"], cfg["D"]
    q, k, v = (rng.standard_normal((B, H, L, D), dtype=np.float32) for _ in range(3))
    out = np.empty_like(q)
    out.fill(0.0)  # map its pages now: the output is not the kernel's extra memory
    score = None
    if cfg.get("A"):
        A = cfg["A"]
        score = mha_ext.Additive(
            rng.standard_normal((D, A)).astype(np.float32) / 8,
            rng.standard_normal((D, A)).astype(np.float32) / 8,
            rng.standard_normal(A).astype(np.float32) / 8,
        )
    # A tiny call first, so the library's own first-touch costs are in the baseline.
    mha_ext.attention(q[:, :, :8], k[:, :, :8], v[:, :, :8], score=score)
    before = peak_mb()
    mha_ext.attention(q, k, v, score=score, causal=cfg.get("causal", False), out=out)
    after = peak_mb()
    assert np.isfinite(out).all()
    print(json.dumps({"growth_mb": after - before}))
    """
)


def _growth_mb(cfg: dict) -> float:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(cfg)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])["growth_mb"]


def test_additive_score_memory_is_tiled():
    """Lq = Lk = 4096, A = 128: a NumPy broadcast of q W_q + k W_k needs 8 GiB per head."""
    growth = _growth_mb({"B": 1, "H": 1, "L": 4096, "D": 64, "A": 128})
    assert growth < 64, f"additive attention grew the peak RSS by {growth:.1f} MB"


@pytest.mark.parametrize("causal", [False, True])
def test_long_sequence_memory(causal):
    """SPEC section 7: L = 16k with D = 64 runs in < 64 MB beyond inputs and output.

    Two heads instead of eight keep the test short; the kernel's scratch is per thread, not
    per head, so the bound is the same.
    """
    growth = _growth_mb({"B": 1, "H": 2, "L": 16384, "D": 64, "causal": causal})
    assert growth < 64, f"L=16384 grew the peak RSS by {growth:.1f} MB"
