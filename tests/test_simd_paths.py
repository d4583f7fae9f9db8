"""Every CPU instruction-set path (``build_info()["simd_supported"]``: amx, avx512, avx2,
generic) against the float64 reference, so a bug in one path can't hide behind another.

The ``simd`` fixture (conftest.py) runs each test once per path the machine supports; the
shapes are CPU-sized but cross every tile edge of every path: lengths that are not multiples
of the 16-row AMX tiles, the 32-key AMX reduction step or the 64-key tiles, head dims that are
odd or not multiples of 32 (the AMX path pads them), Lq != Lk, GQA, one-element axes, fully
masked rows and non-finite values at hidden keys (the AMX path's fp32 fallback).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import mha_ext
import ml_dtypes
import numpy as np
import pytest
from conftest import SIMD_PATHS
from reference import assert_out_close, attention_ref

DTYPES = [np.float32, np.float64, np.float16, ml_dtypes.bfloat16]
DTYPE_IDS = ["f32", "f64", "f16", "bf16"]

# (Lq, Lk, D, Dv): AMX tile edges (16 rows, 32-element steps), the 64-key tile, decode-like
# one-row tasks, one-element axes.
SHAPES = [
    (1, 1, 1, 1),
    (3, 5, 7, 3),
    (17, 33, 32, 16),
    (40, 100, 64, 64),
    (97, 70, 130, 24),
    (131, 257, 128, 128),
    (200, 65, 48, 80),
]


def _inputs(rng, dtype, Lq, Lk, D, Dv, B=1, Hq=4, Hk=2):
    shapes = ((B, Hq, Lq, D), (B, Hk, Lk, D), (B, Hk, Lk, Dv))
    return tuple(rng.standard_normal(s).astype(dtype) for s in shapes)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("Lq", "Lk", "D", "Dv"), SHAPES)
def test_plain_and_causal(rng, simd, dtype, Lq, Lk, D, Dv):
    q, k, v = _inputs(rng, dtype, Lq, Lk, D, Dv)
    for causal in (False, True):
        out = mha_ext.attention(q, k, v, causal=causal)
        assert_out_close(out, q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("Lq", "Lk", "D", "Dv"), [(97, 133, 64, 64), (50, 300, 80, 32)])
def test_masks_window_key_lengths(rng, simd, dtype, Lq, Lk, D, Dv):
    q, k, v = _inputs(rng, dtype, Lq, Lk, D, Dv)
    kw = {
        "mask": rng.random((1, 1, Lq, Lk)) < 0.8,
        "bias": rng.standard_normal((4, 1, Lk)),
        "causal": True,
        "window": (40, 2),
        "key_lengths": [Lk // 2],
    }
    out = mha_ext.attention(q, k, v, **kw)
    assert_out_close(out, q, k, v, **kw)
    # A bool mask alone (tiles mixed inside / masked), and key_lengths alone.
    for kw in ({"mask": rng.random((1, 4, Lq, Lk)) < 0.5}, {"key_lengths": [Lk // 3]}):
        out = mha_ext.attention(q, k, v, **kw)
        assert_out_close(out, q, k, v, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_weights_lse_and_fully_masked_rows(rng, simd, dtype):
    q, k, v = _inputs(rng, dtype, 70, 90, 64, 32)
    mask = rng.random((1, 1, 70, 90)) < 0.7
    mask[:, :, 5] = False  # fully masked rows: output 0, weights 0, lse -inf
    out, w, lse = mha_ext.attention(q, k, v, mask=mask, return_weights=True, return_lse=True)
    assert_out_close(out, q, k, v, mask=mask)
    assert np.all(out[:, :, 5].astype(np.float64) == 0)
    assert np.all(np.isneginf(lse[:, :, 5]))
    _, rw, rl = attention_ref(q, k, v, mask=mask)
    tol = {np.float64: 1e-12, np.float32: 1e-5}.get(dtype, 1e-2)
    np.testing.assert_allclose(w, rw, rtol=tol, atol=tol)
    finite = np.isfinite(rl)
    np.testing.assert_allclose(lse[finite], rl[finite], rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_blhd_views_and_gqa(rng, simd, dtype):
    Lq, Lk, D = 45, 77, 64
    q = rng.standard_normal((2, Lq, 6, 2 * D)).astype(dtype)[..., ::2]  # strided rows
    k = rng.standard_normal((2, Lk, 2, D)).astype(dtype)
    v = rng.standard_normal((2, Lk, 2, D)).astype(dtype)
    out = mha_ext.attention(q, k, v, layout="blhd", causal="bottom_right")
    assert_out_close(out, q, k, v, layout="blhd", causal="bottom_right")


@pytest.mark.parametrize(
    "dtype", [np.float32, np.float16, ml_dtypes.bfloat16], ids=["f32", "f16", "bf16"]
)
@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
def test_nonfinite_values_at_hidden_keys(rng, simd, dtype, value):
    """Inf/NaN in V rows that no query sees never reach an output (p = 0 must not meet them);
    a NaN in a visible key poisons only its own rows."""
    q, k, v = _inputs(rng, dtype, 64, 96, 64, 64, B=1, Hq=2, Hk=1)
    v[0, 0, 90] = value  # hidden by key_lengths
    v[0, 0, 30, 3] = value  # hidden by the mask below for every query
    mask = np.ones((1, 1, 64, 96), bool)
    mask[..., 30] = False
    out = mha_ext.attention(q, k, v, mask=mask, key_lengths=[80])
    assert np.isfinite(out.astype(np.float64)).all()
    clean = v.copy()  # the references multiply hidden values by 0: give them finite ones
    clean[0, 0, 90] = 0
    clean[0, 0, 30, 3] = 0
    assert_out_close(out, q, k, clean, mask=mask, key_lengths=[80])
    k2 = k.copy()
    k2[0, 0, 10, 0] = np.nan  # visible to the queries at or after 10 (causal)
    out = mha_ext.attention(q, k2[:, :, :64], v[:, :, :64], causal=True)
    bad = np.isnan(out.astype(np.float64)).any(axis=-1)
    assert bad[0, :, 10:].all() and not bad[0, :, :10].any()


def test_paths_agree(rng):
    """Every path gives the same float32 result to within float32 rounding."""
    q, k, v = _inputs(rng, np.float32, 150, 200, 64, 64)
    outs = {}
    for path in SIMD_PATHS:
        before = mha_ext._core._set_simd(path)
        try:
            outs[path] = mha_ext.attention(q, k, v, causal=True)
        finally:
            mha_ext._core._set_simd(before)
    first = outs[SIMD_PATHS[-1]]
    for path, out in outs.items():
        np.testing.assert_allclose(out, first, rtol=2e-6, atol=2e-6, err_msg=path)


def test_set_simd_rejects_unknown_paths():
    with pytest.raises(ValueError, match="simd"):
        mha_ext._core._set_simd("avx1024")
    assert mha_ext._core._set_simd(mha_ext.build_info()["simd"]) == mha_ext.build_info()["simd"]


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 paths")
def test_table_matches_the_cpu():
    """The table offers avx512 / amx exactly where /proc/cpuinfo says the CPU has them."""
    flags = _cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo")
    info = mha_ext.build_info()
    supported = info["simd_supported"]
    assert supported[-1] == "generic"
    assert ("avx2" in supported) == ({"avx2", "fma", "f16c"} <= flags)
    assert ("avx512" in supported) == ({"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags)
    has_amx = {"amx_tile", "amx_bf16", "avx512_bf16"} <= flags
    assert ("amx" in supported) == (has_amx and "simd_note" not in info), info
    if has_amx and "amx" not in supported:
        assert "arch_prctl" in info["simd_note"]
    if not os.environ.get("MHA_EXT_SIMD"):
        assert info["simd"] == supported[0]


def test_vtanh_matches_float64_tanh(simd):
    """The kernel's vectorised float32 tanh (softcap, additive score; kernel/vec.h) on this
    path: a few ulp over a dense range past the |x| = 9 clamp, tiny and denormal x exact,
    +-0 keeps its sign, +-inf -> +-1, NaN stays NaN, and never outside [-1, 1]."""
    dense = np.linspace(-12, 12, 1_200_001)
    tiny = np.geomspace(1e-44, 1.0, 20_000)
    x = np.concatenate([dense, tiny, -tiny, [8.99, 9.0, 9.01, 10.0, 15.0, 88.0, 1e30, 3.4e38]])
    x = np.concatenate([x, -x[-8:]]).astype(np.float32)
    y = mha_ext._core._tanh(x)
    assert y.dtype == np.float32 and y.shape == x.shape
    ref = np.tanh(x.astype(np.float64))
    ulp = np.spacing(np.abs(ref).astype(np.float32)).astype(np.float64)
    err = np.abs(y - ref) / ulp
    assert err.max() <= 8, (float(err.max()), float(x[err.argmax()]))
    assert np.abs(y).max() <= 1.0
    small = np.abs(x) < 1e-4  # tanh(x) = x to well under half an ulp
    np.testing.assert_array_equal(y[small], x[small])
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45], np.float32)
    ys = mha_ext._core._tanh(special)
    np.testing.assert_array_equal(ys[:4], [0.0, -0.0, 1.0, -1.0])
    assert np.signbit(ys[1]) and not np.signbit(ys[0])
    assert np.isnan(ys[4])
    np.testing.assert_array_equal(ys[5:], special[5:])
    # Every length: the tail of a partial vector goes through the same code.
    for n in range(1, 40):
        np.testing.assert_array_equal(mha_ext._core._tanh(x[:n]), y[:n])
