"""Masking (SPEC section 3): bool mask, bias, key_lengths, causal alignments, windows, their
combinations, empty rows and zero-size axes, plus cross-checks of the kernel variants."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mha_ext
import ml_dtypes
import numpy as np
import pytest
from mha_ext import _core
from reference import assert_out_close, attention_ref, random_inputs

DTYPES = [np.float32, np.float64, np.float16, ml_dtypes.bfloat16]
DTYPE_IDS = ["f32", "f64", "f16", "bf16"]


def _check_all(res, ref, tol=1e-5):
    """(out, weights, lse) against the reference triple."""
    for got, exp, name in zip(res, ref, ("out", "weights", "lse")):
        assert got.shape == exp.shape, name
        assert not np.isnan(got).any(), name
        np.testing.assert_allclose(got, exp, rtol=tol, atol=tol, err_msg=name)


def _run(q, k, v, device="cpu", **kw):
    return mha_ext.attention(q, k, v, return_weights=True, return_lse=True, device=device, **kw)


# ------------------------------------------------------------------------------------------
# Bool mask broadcasting.

B, HQ, HK, LQ, LK = 2, 4, 2, 19, 37


@pytest.mark.parametrize(
    "mshape",
    [
        (),
        (1,),
        (LK,),
        (LQ, LK),
        (LQ, 1),
        (HQ, 1, LK),
        (B, 1, 1, LK),
        (1, HQ, LQ, 1),
        (B, HQ, LQ, LK),
        (B, 1, LQ, LK),
        (1, 1, 1, 1),
    ],
    ids=str,
)
def test_mask_broadcast_shapes(rng, device, mshape):
    q, k, v = random_inputs(rng, (B, HQ, LQ, 16), (B, HK, LK, 16), (B, HK, LK, 8))
    mask = rng.random(mshape) < 0.6
    res = _run(q, k, v, device, mask=mask)
    _check_all(res, attention_ref(q, k, v, mask=mask))


@pytest.mark.parametrize("mshape", [(LK,), (LQ, LK), (B, 1, 1, LK), (1, HQ, LQ, 1)], ids=str)
def test_mask_zero_stride_views(rng, device, mshape):
    """np.broadcast_to views (zero strides) are read as they are, also for bias."""
    q, k, v = random_inputs(rng, (B, HQ, LQ, 16), (B, HK, LK, 16), (B, HK, LK, 8))
    small = rng.random(mshape) < 0.6
    mask = np.broadcast_to(small, (B, HQ, LQ, LK))
    assert 0 in mask.strides
    bias = np.broadcast_to(rng.standard_normal(mshape).astype(np.float32), (B, HQ, LQ, LK))
    res = _run(q, k, v, device, mask=mask, bias=bias)
    ref = attention_ref(q, k, v, mask=small, bias=np.asarray(bias))
    _check_all(res, ref)
    res_small = _run(q, k, v, device, mask=small, bias=np.ascontiguousarray(bias))
    for a, b in zip(res, res_small):
        np.testing.assert_array_equal(a, b)


def test_mask_strided_views(rng, device):
    """Transposed, negative-stride and stepped masks and biases."""
    q, k, v = random_inputs(rng, (B, HQ, LQ, 16), (B, HK, LK, 16), (B, HK, LK, 8))
    base = rng.random((LK, LQ)) < 0.7
    masks = [
        base.T,
        (rng.random((LQ, LK)) < 0.7)[::-1, ::-1],
        (rng.random((2 * LQ, 3 * LK)) < 0.7)[::2, ::3],
    ]
    biases = [
        rng.standard_normal((LK, LQ)).astype(np.float32).T,
        rng.standard_normal((LQ, LK))[::-1, ::-1],
        rng.standard_normal((2 * LQ, 3 * LK)).astype(np.float32)[::2, ::3],
    ]
    for mask, bias in zip(masks, biases):
        res = _run(q, k, v, device, mask=mask, bias=bias)
        _check_all(res, attention_ref(q, k, v, mask=mask, bias=bias))


@pytest.mark.parametrize(
    ("rank", "mshape"),
    [(3, (LQ, LK)), (3, (HQ, LQ, LK)), (3, (HQ, 1, 1)), (2, (LK,)), (2, (LQ, LK)), (2, (LQ, 1))],
)
def test_mask_low_rank_inputs(rng, rank, mshape):
    """3-D inputs broadcast masks to (Hq, Lq, Lk), 2-D ones to (Lq, Lk)."""
    if rank == 3:
        q, k, v = random_inputs(rng, (HQ, LQ, 16), (HK, LK, 16), (HK, LK, 8))
    else:
        q, k, v = random_inputs(rng, (LQ, 16), (LK, 16), (LK, 8))
    mask = rng.random(mshape) < 0.6
    bias = rng.standard_normal(mshape)
    res = _run(q, k, v, mask=mask, bias=bias)
    _check_all(res, attention_ref(q, k, v, mask=mask, bias=bias))


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_mask_axis_order_independent_of_layout(rng, layout):
    """Masks stay (B, Hq, Lq, Lk) in the blhd layout too."""
    shapes = [(B, HQ, LQ, 16), (B, HK, LK, 16), (B, HK, LK, 8)]
    if layout == "blhd":
        shapes = [(s[0], s[2], s[1], s[3]) for s in shapes]
    q, k, v = random_inputs(rng, *shapes)
    mask = rng.random((B, HQ, LQ, LK)) < 0.6
    bias = rng.standard_normal((1, HQ, 1, LK))
    res = _run(q, k, v, mask=mask, bias=bias, layout=layout)
    _check_all(res, attention_ref(q, k, v, mask=mask, bias=bias, layout=layout))


# ------------------------------------------------------------------------------------------
# Bias.


@pytest.mark.parametrize(
    "bdtype",
    [np.float32, np.float64, np.float16, np.int32, ml_dtypes.bfloat16],
    ids=["f32", "f64", "f16", "i32", "bf16"],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_bias_dtypes(rng, dtype, bdtype):
    q, k, v = random_inputs(rng, (B, HQ, LQ, 16), (B, HK, LK, 16), (B, HK, LK, 8), dtype=dtype)
    bias = (rng.standard_normal((HQ, LQ, LK)) * 3).astype(bdtype)
    res = _run(q, k, v, bias=bias)
    _check_all(res, attention_ref(q, k, v, bias=bias), tol=1e-5 if dtype == np.float32 else 1e-12)


def test_bias_with_neg_inf(rng, device):
    q, k, v = random_inputs(rng, (B, HQ, LQ, 16), (B, HK, LK, 16), (B, HK, LK, 8))
    bias = rng.standard_normal((B, HQ, LQ, LK)).astype(np.float32)
    bias[rng.random(bias.shape) < 0.5] = -np.inf
    bias[0, 1, 3, :] = -np.inf  # a row hidden by the bias alone
    bias[1, :, :, 5] = -np.inf  # a key hidden for everyone
    res = _run(q, k, v, device, bias=bias)
    ref = attention_ref(q, k, v, bias=bias)
    _check_all(res, ref)
    out, w, lse = res
    assert np.all(out[0, 1, 3] == 0)
    assert np.all(w[0, 1, 3] == 0)
    assert lse[0, 1, 3] == -np.inf
    assert np.all(w[1, :, :, 5] == 0)


@pytest.mark.parametrize("causal", [False, True])
def test_bias_alibi(rng, device, causal):
    """ALiBi: bias[h, i, j] = -slope_h * (i + Lk - Lq - j), a per-head linear distance."""
    Hq, Lq, Lk = 8, 45, 70
    q, k, v = random_inputs(rng, (B, Hq, Lq, 32), (B, 2, Lk, 32), (B, 2, Lk, 32))
    slopes = 2.0 ** (-8.0 * np.arange(1, Hq + 1) / Hq)
    dist = np.arange(Lq)[:, None] + (Lk - Lq) - np.arange(Lk)[None, :]
    bias = (-slopes[:, None, None] * np.abs(dist)[None]).astype(np.float32)
    res = _run(q, k, v, device, bias=bias, causal=causal)
    _check_all(res, attention_ref(q, k, v, bias=bias, causal=causal))


# ------------------------------------------------------------------------------------------
# key_lengths.


@pytest.mark.parametrize(
    "kdtype", [np.int64, np.int32, np.uint8, np.uint64], ids=["i64", "i32", "u8", "u64"]
)
def test_key_lengths(rng, device, kdtype):
    Bk, Lk = 4, 70
    q, k, v = random_inputs(rng, (Bk, HQ, LQ, 16), (Bk, HK, Lk, 16), (Bk, HK, Lk, 8))
    kl = np.array([0, Lk, 1, 33], dtype=kdtype)
    # Padding keys are never read: poison them.
    for b, n in enumerate(kl):
        k[b, :, int(n) :] = np.nan
        v[b, :, int(n) :] = np.inf
    res = _run(q, k, v, device, key_lengths=kl)
    ref = attention_ref(q, k, v, key_lengths=kl)
    _check_all(res, ref)
    out, w, lse = res
    assert np.all(out[0] == 0)
    assert np.all(w[0] == 0)
    assert np.all(lse[0] == -np.inf)


def test_key_lengths_list_and_low_rank(rng):
    q, k, v = random_inputs(rng, (HQ, LQ, 16), (HK, LK, 16), (HK, LK, 8))
    res = _run(q, k, v, key_lengths=np.array([11]))
    _check_all(res, attention_ref(q, k, v, key_lengths=[11]))
    q, k, v = random_inputs(rng, (LQ, 16), (LK, 16), (LK, 8))
    res = _run(q, k, v, key_lengths=[0])
    _check_all(res, attention_ref(q, k, v, key_lengths=[0]))


# ------------------------------------------------------------------------------------------
# Causal alignments.

LQ_LK = [(20, 20), (13, 50), (50, 13), (1, 64), (64, 1), (97, 130), (130, 97)]


@pytest.mark.parametrize(("Lq", "Lk"), LQ_LK)
@pytest.mark.parametrize("causal", [True, "bottom_right", "top_left"])
def test_causal(rng, device, Lq, Lk, causal):
    q, k, v = random_inputs(rng, (B, HQ, Lq, 16), (B, HK, Lk, 16), (B, HK, Lk, 8))
    res = _run(q, k, v, device, causal=causal)
    _check_all(res, attention_ref(q, k, v, causal=causal))


def test_causal_alignment_explicit(rng):
    """Bottom-right with Lq > Lk hides the first Lq - Lk rows; top-left hides nothing."""
    Lq, Lk = 10, 4
    q, k, v = random_inputs(rng, (1, 1, Lq, 8), (1, 1, Lk, 8), (1, 1, Lk, 8))
    out, w, lse = _run(q, k, v, causal=True)
    vis = w[0, 0] > 0
    expected = np.arange(Lk)[None, :] <= np.arange(Lq)[:, None] + (Lk - Lq)
    np.testing.assert_array_equal(vis, expected)
    assert np.all(out[0, 0, : Lq - Lk] == 0)
    assert np.all(lse[0, 0, : Lq - Lk] == -np.inf)
    assert np.all(np.isfinite(lse[0, 0, Lq - Lk :]))
    _, w, _ = _run(q, k, v, causal="top_left")
    np.testing.assert_array_equal(w[0, 0] > 0, np.arange(Lk)[None, :] <= np.arange(Lq)[:, None])
    # Lq < Lk: bottom-right gives the last query every key.
    q2 = q[:, :, :3]
    _, w, _ = _run(q2, k, v, causal=True)
    assert np.all(w[0, 0, -1] > 0)
    assert np.all(w[0, 0, 0, 2:] == 0)


def test_causal_with_key_lengths(rng, device):
    """Bottom-right uses the per-batch valid key count Lk_b."""
    Lq, Lk = 15, 40
    q, k, v = random_inputs(rng, (3, HQ, Lq, 16), (3, HK, Lk, 16), (3, HK, Lk, 8))
    kl = np.array([40, 20, 7])
    for causal in (True, "top_left"):
        res = _run(q, k, v, device, causal=causal, key_lengths=kl)
        _check_all(res, attention_ref(q, k, v, causal=causal, key_lengths=kl))


# ------------------------------------------------------------------------------------------
# Sliding windows.

WINDOWS = [(0, 0), (3, -1), (-1, 2), (5, 5), None, (None, 3), (2, None), (0, 40), (-1, -1)]


@pytest.mark.parametrize("window", WINDOWS, ids=str)
@pytest.mark.parametrize("causal", [False, True, "top_left"])
@pytest.mark.parametrize(("Lq", "Lk"), [(31, 31), (13, 70), (70, 13)])
def test_window(rng, device, window, causal, Lq, Lk):
    q, k, v = random_inputs(rng, (B, HQ, Lq, 16), (B, HK, Lk, 16), (B, HK, Lk, 8))
    res = _run(q, k, v, device, window=window, causal=causal)
    _check_all(res, attention_ref(q, k, v, window=window, causal=causal))


def test_window_explicit(rng):
    """(left, right) = (2, 1) on a square problem is a band around the diagonal."""
    L = 9
    q, k, v = random_inputs(rng, (1, 1, L, 8), (1, 1, L, 8), (1, 1, L, 8))
    _, w, _ = _run(q, k, v, window=(2, 1))
    d = np.arange(L)[None, :] - np.arange(L)[:, None]
    np.testing.assert_array_equal(w[0, 0] > 0, (d >= -2) & (d <= 1))
    # With Lk > Lq the band follows the bottom-right diagonal, or the top-left one.
    k2, v2 = random_inputs(rng, (1, 1, L + 4, 8), (1, 1, L + 4, 8), (1, 1, L + 4, 8))[1:]
    _, w, _ = _run(q, k2, v2, window=(0, 0))
    np.testing.assert_array_equal(np.argmax(w[0, 0], axis=-1), np.arange(L) + 4)
    _, w, _ = _run(q, k2, v2, window=(0, 0), causal="top_left")
    np.testing.assert_array_equal(np.argmax(w[0, 0], axis=-1), np.arange(L))


def test_window_with_key_lengths(rng):
    q, k, v = random_inputs(rng, (3, HQ, 12, 16), (3, HK, 40, 16), (3, HK, 40, 8))
    kl = np.array([40, 25, 5])
    for causal in (False, True, "top_left"):
        res = _run(q, k, v, window=(4, 2), causal=causal, key_lengths=kl)
        _check_all(res, attention_ref(q, k, v, window=(4, 2), causal=causal, key_lengths=kl))


# ------------------------------------------------------------------------------------------
# Everything together.


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("causal", [False, True, "top_left"])
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_all_combined(rng, device, dtype, causal, layout):
    Bc, Hq, Hk, Lq, Lk = 3, 6, 2, 57, 101
    shapes = [(Bc, Hq, Lq, 24), (Bc, Hk, Lk, 24), (Bc, Hk, Lk, 20)]
    if layout == "blhd":
        shapes = [(s[0], s[2], s[1], s[3]) for s in shapes]
    q, k, v = random_inputs(rng, *shapes, dtype=dtype)
    mask = rng.random((Bc, 1, Lq, Lk)) < 0.8
    bias = rng.standard_normal((Hq, 1, Lk))
    bias[rng.random(bias.shape) < 0.1] = -np.inf
    kw = {
        "mask": mask,
        "bias": bias,
        "causal": causal,
        "window": (30, 6),
        "key_lengths": [101, 64, 3],
        "layout": layout,
    }
    res = _run(q, k, v, device, **kw)
    _check_all(res, attention_ref(q, k, v, **kw), tol=1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16], ids=["f16", "bf16"])
def test_combined_low_precision(rng, device, dtype):
    q, k, v = random_inputs(rng, (2, 4, 57, 32), (2, 2, 101, 32), (2, 2, 101, 32), dtype=dtype)
    kw = {
        "mask": rng.random((57, 101)) < 0.8,
        "bias": rng.standard_normal((4, 1, 101)),
        "causal": True,
        "window": (40, -1),
        "key_lengths": [101, 80],
    }
    out = mha_ext.attention(q, k, v, device=device, **kw)
    assert_out_close(out, q, k, v, **kw)


# ------------------------------------------------------------------------------------------
# Empty rows and zero-size axes.


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fully_masked_rows(rng, device, dtype):
    q, k, v = random_inputs(rng, (B, HQ, LQ, 16), (B, HK, LK, 16), (B, HK, LK, 8), dtype=dtype)
    mask = rng.random((B, HQ, LQ, LK)) < 0.5
    mask[0, :, 2] = False
    mask[1, 3] = False
    bias = np.zeros((B, HQ, LQ, LK), np.float32)
    bias[0, 1, 7] = -np.inf
    out, w, lse = _run(q, k, v, device, mask=mask, bias=bias)
    empty = ~(mask & (bias > -np.inf)).any(-1)
    assert empty.sum() == HQ + LQ + 1
    assert not np.isnan(out.astype(np.float32)).any()
    assert not np.isnan(w).any()
    assert not np.isnan(lse).any()
    assert np.all(out[empty].astype(np.float32) == 0)
    assert np.all(w[empty] == 0)
    assert np.all(lse[empty] == -np.inf)
    assert np.all(np.isfinite(lse[~empty]))
    assert_out_close(out, q, k, v, mask=mask, bias=bias)


def test_everything_masked(rng):
    q, k, v = random_inputs(rng, (B, HQ, LQ, 16), (B, HK, LK, 16), (B, HK, LK, 8))
    out, w, lse = _run(q, k, v, mask=np.zeros(LK, bool))
    assert np.all(out == 0)
    assert np.all(w == 0)
    assert np.all(lse == -np.inf)
    out, w, lse = _run(q, k, v, key_lengths=[0, 0], causal=True, window=(2, 2))
    assert np.all(out == 0)
    assert np.all(w == 0)
    assert np.all(lse == -np.inf)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_lk_zero(rng, device, dtype):
    q, k, v = random_inputs(rng, (B, HQ, LQ, 16), (B, HK, 0, 16), (B, HK, 0, 8), dtype=dtype)
    for kw in (
        {},
        {"causal": True},
        {"mask": np.ones((LQ, 0), bool)},
        {"key_lengths": [0, 0]},
        {"window": (1, 1), "bias": np.zeros((0,))},
    ):
        out, w, lse = _run(q, k, v, device, **kw)
        assert out.shape == (B, HQ, LQ, 8)
        assert out.dtype == np.dtype(dtype)
        assert w.shape == (B, HQ, LQ, 0)
        assert lse.shape == (B, HQ, LQ)
        assert np.all(out.astype(np.float32) == 0)
        assert np.all(lse == -np.inf)


@pytest.mark.parametrize(
    ("qs", "ks", "vs", "outs"),
    [
        ((B, HQ, 0, 16), (B, HK, LK, 16), (B, HK, LK, 8), (B, HQ, 0, 8)),
        ((0, HQ, LQ, 16), (0, HK, LK, 16), (0, HK, LK, 8), (0, HQ, LQ, 8)),
        ((B, 0, LQ, 16), (B, HK, LK, 16), (B, HK, LK, 8), (B, 0, LQ, 8)),
        ((B, 0, LQ, 16), (B, 0, LK, 16), (B, 0, LK, 8), (B, 0, LQ, 8)),
        ((B, HQ, 0, 16), (B, HK, 0, 16), (B, HK, 0, 8), (B, HQ, 0, 8)),
        ((0, 16), (LK, 16), (LK, 8), (0, 8)),
        ((HQ, 0, 16), (HK, LK, 16), (HK, LK, 8), (HQ, 0, 8)),
    ],
)
def test_zero_size_axes(rng, device, qs, ks, vs, outs):
    q, k, v = random_inputs(rng, qs, ks, vs)
    out, w, lse = _run(q, k, v, device, causal=True)
    assert out.shape == outs
    assert out.dtype == np.float32
    rank = len(qs)
    bq, hq = ((1, 1, *qs))[-4], ((1, 1, *qs))[-3]
    full_w = (bq, hq, ((1, 1, *qs))[-2], ks[-2])
    assert w.shape == full_w[4 - rank :]
    assert lse.shape == full_w[4 - rank : 3]
    o2 = np.empty(outs, np.float32)
    assert mha_ext.attention(q, k, v, out=o2, device=device) is o2


def test_zero_size_blhd(rng):
    q, k, v = random_inputs(rng, (B, 0, HQ, 16), (B, LK, HK, 16), (B, LK, HK, 8))
    out, w, lse = _run(q, k, v, layout="blhd")
    assert out.shape == (B, 0, HQ, 8)
    assert w.shape == (B, HQ, 0, LK)
    assert lse.shape == (B, HQ, 0)


def test_dv_zero(rng, device):
    q, k, v = random_inputs(rng, (B, HQ, LQ, 16), (B, HK, LK, 16), (B, HK, LK, 0))
    out, w, lse = _run(q, k, v, device, causal=True)
    assert out.shape == (B, HQ, LQ, 0)
    ref = attention_ref(q, k, v, causal=True)
    _check_all((out, w, lse), ref)


# ------------------------------------------------------------------------------------------
# NaN / Inf propagate to the rows that see them, nowhere else.


def test_nan_propagates_only_where_visible(rng, device):
    Lq, Lk = 30, 30
    q, k, v = random_inputs(rng, (1, 2, Lq, 16), (1, 2, Lk, 16), (1, 2, Lk, 8))
    k[0, 0, 10] = np.nan
    v[0, 1, 20, 3] = np.inf
    out = mha_ext.attention(q, k, v, causal=True, device=device)
    # Head 0: rows i >= 10 see key 10 (NaN score); rows < 10 do not.
    assert np.isnan(out[0, 0, 10:]).all()
    assert np.isfinite(out[0, 0, :10]).all()
    # Head 1: rows >= 20 read v[20] (inf in column 3): only that column is non-finite.
    assert np.isfinite(out[0, 1, :20]).all()
    assert not np.isfinite(out[0, 1, 20:, 3]).any()
    assert np.isfinite(np.delete(out[0, 1, 20:], 3, axis=-1)).all()
    ref = attention_ref(q[:, :, :10], k[:, :, :10], v[:, :, :10], causal="top_left")[0]
    np.testing.assert_allclose(out[:, :1, :10], ref[:, :1], rtol=1e-5, atol=1e-5)
    # Masked away, the NaN key is harmless.
    mask = np.ones(Lk, bool)
    mask[10] = False
    out = mha_ext.attention(q, k, v, mask=mask, device=device)
    assert np.isfinite(out[0, 0]).all()


# ------------------------------------------------------------------------------------------
# Kernel variants: blocked vs naive native kernel, AVX2 vs the portable path.


def _core_call(
    q,
    k,
    v,
    *,
    mask=None,
    bias=None,
    causal=0,
    window=(-1, -1),
    key_lengths=None,
    scale=None,
    naive=False,
):
    return _core.attention(
        q,
        k,
        v,
        mask,
        bias,
        causal,
        window[0],
        window[1],
        key_lengths,
        scale,
        0,
        None,
        None,
        None,
        True,
        True,
        False,
        0,
        None,
        None,
        naive=naive,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_blocked_matches_naive_kernel(rng, dtype):
    q, k, v = random_inputs(rng, (3, 6, 101, 40), (3, 2, 133, 40), (3, 2, 133, 24), dtype=dtype)
    kw = {
        "mask": rng.random((3, 1, 101, 133)) < 0.85,
        "bias": rng.standard_normal((6, 1, 133)),
        "causal": 1,
        "window": (70, 3),
        "key_lengths": np.array([133, 90, 0]),
        "scale": 0.3,
    }
    blocked = _core_call(q, k, v, **kw)
    naive = _core_call(q, k, v, naive=True, **kw)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    for a, b, name in zip(blocked, naive, ("out", "weights", "lse")):
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        if name == "out" and dtype in (np.float16, ml_dtypes.bfloat16):
            # One rounding of nearly equal float32 values: at most one unit in the last place,
            # plus float32 rounding noise on values that cancel to almost zero.
            ulp = np.spacing(np.abs(b).astype(dtype)).astype(np.float64)
            slack = 4 * np.finfo(np.float32).eps * np.abs(b64).max()
            if dtype == ml_dtypes.bfloat16 and mha_ext.build_info()["simd"] == "amx":
                # The AMX path rounds P to bf16 for P.V (relative error <= 2^-9 per
                # probability, probabilities sum to 1): |error| <= 2^-9 max |v|, doubled.
                slack += 2.0**-8 * np.abs(v.astype(np.float64)).max()
            assert np.all(np.abs(a64 - b64) <= ulp + slack), name
        else:
            np.testing.assert_allclose(a64, b64, rtol=tol, atol=tol, err_msg=name)


_GENERIC_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from reference import assert_out_close, attention_ref
    import ml_dtypes
    import mha_ext

    assert mha_ext.build_info()["simd"] == "generic", mha_ext.build_info()
    rng = np.random.default_rng(1234)
    for dtype in (np.float32, np.float64, np.float16, ml_dtypes.bfloat16):
        for (Lq, Lk, D, Dv) in ((1, 1, 1, 1), (7, 97, 16, 80), (97, 70, 130, 16), (50, 13, 64, 64)):
            q, k, v = (rng.standard_normal(s).astype(dtype)
                       for s in ((2, 4, Lq, D), (2, 2, Lk, D), (2, 2, Lk, Dv)))
            kw = dict(mask=rng.random((2, 1, Lq, Lk)) < 0.8, bias=rng.standard_normal((4, 1, Lk)),
                      causal=True, window=(40, 2), key_lengths=[Lk, Lk // 2])
            out, w, lse = mha_ext.attention(q, k, v, return_weights=True, return_lse=True, **kw)
            assert_out_close(out, q, k, v, **kw)
            if dtype in (np.float32, np.float64):
                tol = 1e-5 if dtype == np.float32 else 1e-12
                _, rw, rl = attention_ref(q, k, v, **kw)
                np.testing.assert_allclose(w, rw, rtol=tol, atol=tol)
                np.testing.assert_allclose(lse, rl, rtol=tol, atol=tol)
    # An additive score on the portable path as well.
    q, k, v = (rng.standard_normal(s).astype(np.float32)
               for s in ((1, 2, 33, 16), (1, 2, 45, 12), (1, 2, 45, 8)))
    sc = mha_ext.Additive(rng.standard_normal((16, 9)), rng.standard_normal((12, 9)),
                          rng.standard_normal(9))
    out = mha_ext.attention(q, k, v, score=sc, causal=True)
    np.testing.assert_allclose(out, attention_ref(q, k, v, score=sc, causal=True)[0],
                               rtol=1e-5, atol=1e-5)
    print("generic ok")
    """
)


def test_generic_simd_path():
    """The portable kernel (MHA_EXT_SIMD=generic) against the reference, in a subprocess."""
    env = dict(os.environ, MHA_EXT_SIMD="generic")
    proc = subprocess.run(
        [sys.executable, "-c", _GENERIC_SCRIPT, str(Path(__file__).parent)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "generic ok" in proc.stdout
