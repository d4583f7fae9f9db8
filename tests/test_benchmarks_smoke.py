"""Smoke test of the benchmark suite's validation path (benchmarks/bench_forward.py).

No timing assertions: it only checks that the suite builds its inputs and calls correctly and
that its validation (mha_ext vs PyTorch SDPA vs naive NumPy) agrees on one small problem.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_forward


@pytest.mark.parametrize(
    "cfg",
    [
        bench_forward.forward_config(D=16, L=64, causal=False, heads=2),
        bench_forward.forward_config(D=16, L=64, causal=True, heads=2),
        bench_forward.Config("key_lengths", 1, 2, 2, 64, 64, 16, pad=0.25),
        bench_forward.Config("mask", 1, 2, 2, 64, 64, 16, pad=0.25),
        bench_forward.Config("decode", 1, 4, 2, 1, 96, 16),
    ],
    ids=lambda c: c.name,
)
def test_validate_small_config(cfg):
    check = bench_forward.validate(cfg, threads=1, seed=0)
    assert set(check["max_abs_err"]) == {"torch", "numpy"}
    assert check["ok"], check["max_abs_err"]


def test_naive_attention_matches_float64_reference():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 5, 8), dtype=np.float32) for _ in range(3))
    mask = np.array([True, True, False, True, True])
    got = bench_forward.naive_attention(q, k, v, causal=True, mask=mask)
    s = np.einsum("bhid,bhjd->bhij", q.astype(np.float64), k.astype(np.float64)) / np.sqrt(8)
    visible = np.tril(np.ones((5, 5), dtype=bool)) & mask
    s = np.where(visible, s, -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(got, p @ v.astype(np.float64), rtol=1e-5, atol=1e-5)


def test_flop_and_byte_counts():
    cfg = bench_forward.forward_config(D=64, L=1024, causal=False)
    assert cfg.flops == 4 * 1 * 8 * 1024 * 1024 * 64
    assert bench_forward.forward_config(D=64, L=1024, causal=True).flops == cfg.flops / 2
    kl = bench_forward.Config("key_lengths", 1, 8, 8, 2048, 2048, 64, pad=0.125)
    assert kl.visible_keys == 1792
    dec = bench_forward.Config("decode", 1, 32, 32, 1, 32768, 128)
    assert dec.kv_bytes == 2 * 32 * 32768 * 128 * 4


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True])
def test_backward_bench_validates_small_case(dtype, causal):
    import bench_backward

    calls = bench_backward.make_case(dtype, 64, 16, causal, threads=1)
    assert bench_backward.validate(calls, dtype)["ok"]
    assert bench_backward.flops(64, 16, True) == 2.5 * 4 * 8 * 64 * 64 * 16 / 2
