"""python -m mha_ext: print the build, check a masked attention on each device, time it.

Every device that is not checked is listed with the reason (no CUDA backend in this build, or
no GPU visible). Each step prints its name before it runs, so a slow machine shows progress.
"""

from __future__ import annotations

import sys
import time
from functools import partial
from typing import Callable

import numpy as np

import mha_ext


def _reference(q, k, v, mask, scale):
    """float64 softmax(q kᵀ scale, mask) v, written the obvious way."""
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    s = np.einsum("bhid,bhjd->bhij", q, k) * scale
    s = np.where(mask, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    p = np.exp(s - np.where(np.isfinite(m), m, 0.0))
    denom = p.sum(axis=-1, keepdims=True)
    p = np.divide(p, denom, out=np.zeros_like(p), where=denom > 0)
    return np.einsum("bhij,bhjd->bhid", p, v)


def _numpy_attention(q, k, v, mask, scale):
    """What a NumPy user writes: float32 scores, softmax, weighted sum."""
    s = (q @ np.swapaxes(k, -1, -2)) * np.float32(scale)
    s = np.where(mask, s, np.float32(-np.inf))
    s = np.exp(s - s.max(axis=-1, keepdims=True))
    s /= s.sum(axis=-1, keepdims=True)
    return s @ v


def _median_ms(fn: Callable[[], object], repeat: int = 7) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def main() -> int:
    info = mha_ext.build_info()
    print(f"mha_ext {info['version']}")
    print(f"  SIMD path      : {info['simd']}")
    print(f"  OpenMP         : {info['openmp']} ({info['max_threads']} threads)")
    archs = ", ".join(info["cuda_archs"]) or "-"
    print(f"  CUDA           : built={info['cuda_built']} archs={archs} "
          f"available={info['cuda_available']}")
    print(f"  compiler       : {info['compiler']}")

    rng = np.random.default_rng(0)
    B, H, L, D = 2, 4, 256, 64
    q, k, v = (rng.standard_normal((B, H, L, D), dtype=np.float32) for _ in range(3))
    # Padding mask: batch 1 has 200 real tokens, combined with a causal mask.
    lengths = np.array([L, 200])
    mask = (np.arange(L)[None, :] < lengths[:, None])[:, None, None, :]
    causal = np.tril(np.ones((L, L), dtype=bool))
    full_mask = mask & causal
    scale = 1.0 / np.sqrt(D)
    ref = _reference(q, k, v, full_mask, scale)

    devices = ["cpu"]
    if info["cuda_available"]:
        devices.append("cuda")
    elif info["cuda_built"]:
        skipped = "CUDA backend built, but no GPU or driver is visible (cuda_available() is False)"
    else:
        skipped = ("this build has no CUDA backend (no nvcc at build time, or MHA_EXT_CUDA=OFF; "
                   "rebuild with nvcc on the PATH to add it)")
    ok = True
    print(f"\nmasked causal attention, q/k/v {q.shape} float32, padding mask + causal")
    for device in devices:
        print(f"  {device:5s} ", end="", flush=True)
        out = mha_ext.attention(q, k, v, mask=mask, causal="top_left", device=device)
        err = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
        good = err < 1e-5
        ok &= good
        print(f"max relative error vs float64 reference: {err:.2e} "
              f"{'OK' if good else 'FAILED'}")
    if "cuda" not in devices:
        print(f"  cuda  skipped: {skipped}")

    print("\ntiming (median of 7, ms; same process, same threads)")
    rows = [((1, 8, L2, 64), f"{(1, 8, L2, 64)} causal") for L2 in (256, 1024)]
    w = max(len("shape"), *(len(label) for _, label in rows))
    print(f"  {'shape':<{w}s} {'mha_ext':>9s} {'numpy':>9s} {'speedup':>8s}")
    for shape, label in rows:
        # the label first, so a slow step shows what it is busy with
        print(f"  {label:<{w}s} ", end="", flush=True)
        q2, k2, v2 = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
        m2 = np.tril(np.ones(shape[2:3] * 2, dtype=bool))
        mha_ext.attention(q2, k2, v2, causal=True)
        t_ext = _median_ms(partial(mha_ext.attention, q2, k2, v2, causal=True))
        t_np = _median_ms(partial(_numpy_attention, q2, k2, v2, m2, 0.125))
        print(f"{t_ext:9.2f} {t_np:9.2f} {t_np / t_ext:7.1f}x")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
