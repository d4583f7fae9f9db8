"""python -m mha_ext: print the build, check a masked attention on every device, time it."""

from __future__ import annotations

import sys
import time

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


def _median_ms(fn, repeat=7):
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

    devices = ["cpu"] + (["cuda"] if info["cuda_available"] else [])
    ok = True
    print(f"\nmasked causal attention, q/k/v {q.shape} float32, padding mask + causal")
    for device in devices:
        out = mha_ext.attention(q, k, v, mask=mask, causal="top_left", device=device)
        err = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
        good = err < 1e-5
        ok &= good
        print(f"  {device:5s} max relative error vs float64 reference: {err:.2e} "
              f"{'OK' if good else 'FAILED'}")

    print("\ntiming (median of 7, ms; same process, same threads)")
    print(f"  {'shape':>22s} {'mha_ext':>9s} {'numpy':>9s} {'speedup':>8s}")
    for L2 in (256, 1024):
        q2, k2, v2 = (rng.standard_normal((1, 8, L2, 64), dtype=np.float32) for _ in range(3))
        m2 = np.tril(np.ones((L2, L2), dtype=bool))
        mha_ext.attention(q2, k2, v2, causal=True)
        t_ext = _median_ms(lambda q2=q2, k2=k2, v2=v2: mha_ext.attention(q2, k2, v2, causal=True))
        t_np = _median_ms(lambda q2=q2, k2=k2, v2=v2, m2=m2: _numpy_attention(q2, k2, v2, m2, 0.125))
        print(f"  {str(q2.shape) + ' causal':>22s} {t_ext:9.2f} {t_np:9.2f} {t_np / t_ext:7.1f}x")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
