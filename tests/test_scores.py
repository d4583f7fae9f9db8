"""Score functions (SPEC section 3): scaled dot, dot, General, Additive, Concat, against the
float64 reference, alone and with every mask, GQA, layouts, weights and lse."""

from __future__ import annotations

import mha_ext
import ml_dtypes
import numpy as np
import pytest
from reference import attention_ref, max_abs_err, random_inputs


def _general(rng, D, Dk):
    return mha_ext.General(rng.standard_normal((D, Dk)) / np.sqrt(D))


def _additive(rng, D, Dk, A):
    return mha_ext.Additive(
        rng.standard_normal((D, A)) / np.sqrt(D),
        rng.standard_normal((Dk, A)) / np.sqrt(Dk),
        rng.standard_normal(A),
    )


def _concat(rng, D, Dk, A):
    return mha_ext.Concat(
        rng.standard_normal((D + Dk, A)) / np.sqrt(D + Dk), rng.standard_normal(A)
    )


def _make_score(rng, kind, D, Dk, A=12):
    if kind == "general":
        return _general(rng, D, Dk)
    if kind == "additive":
        return _additive(rng, D, Dk, A)
    if kind == "concat":
        return _concat(rng, D, Dk, A)
    return kind


def _tol(dtype):
    return 1e-12 if dtype == np.float64 else 1e-5


def _check_all(res, ref, dtype=np.float32):
    tol = _tol(dtype)
    for got, exp, name in zip(res, ref, ("out", "weights", "lse")):
        assert got.shape == exp.shape, name
        np.testing.assert_allclose(got, exp, rtol=tol, atol=tol, err_msg=name)


# ------------------------------------------------------------------------------------------
# Dot products and default scales.


def test_scaled_dot_and_dot_default_scales(rng, device):
    D = 48
    q, k, v = random_inputs(rng, (2, 4, 21, D), (2, 2, 33, D), (2, 2, 33, 16))
    base = mha_ext.attention(q, k, v, device=device)
    for kw in ({"score": "scaled_dot"}, {"scale": 1 / np.sqrt(D)}, {"score": None}):
        np.testing.assert_allclose(
            mha_ext.attention(q, k, v, device=device, **kw), base, rtol=1e-6, atol=1e-6
        )
    np.testing.assert_allclose(
        base, attention_ref(q, k, v, scale=1 / np.sqrt(D))[0], rtol=1e-5, atol=1e-5
    )
    dot = mha_ext.attention(q, k, v, score="dot", device=device)
    np.testing.assert_allclose(dot, attention_ref(q, k, v, scale=1.0)[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        dot, mha_ext.attention(q, k, v, scale=1.0, device=device), rtol=1e-6, atol=1e-6
    )
    np.testing.assert_allclose(
        mha_ext.attention(q, k, v, score="dot", scale=0.2, device=device),
        attention_ref(q, k, v, scale=0.2)[0],
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("kind", ["scaled_dot", "dot", "general", "additive", "concat"])
def test_default_scale(rng, kind):
    """Default scale: 1/sqrt(D) for the scaled dot, 1 for every other score."""
    D = 16
    q, k, v = random_inputs(rng, (1, 2, 9, D), (1, 2, 13, D), (1, 2, 13, 8))
    score = _make_score(rng, kind, D, D)
    _, lse_default = mha_ext.attention(q, k, v, score=score, return_lse=True)
    expected_scale = 0.25 if kind == "scaled_dot" else 1.0
    _, lse = mha_ext.attention(q, k, v, score=score, scale=expected_scale, return_lse=True)
    np.testing.assert_allclose(lse_default, lse, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scale", [0.0, -0.7, 3.0, 1e-3])
@pytest.mark.parametrize("kind", ["scaled_dot", "general", "additive", "concat"])
def test_explicit_scale(rng, kind, scale):
    D, Dk = 16, 16
    q, k, v = random_inputs(rng, (2, 2, 11, D), (2, 2, 17, Dk), (2, 2, 17, 8))
    score = _make_score(rng, kind, D, Dk)
    res = mha_ext.attention(
        q, k, v, score=score, scale=scale, return_weights=True, return_lse=True, causal=True
    )
    _check_all(res, attention_ref(q, k, v, score=score, scale=scale, causal=True))
    if scale == 0.0:
        w = res[1]
        nvis = (np.arange(17)[None, :] <= np.arange(11)[:, None] + 6).sum(-1)
        np.testing.assert_allclose(w.max(-1), np.broadcast_to(1.0 / nvis, w.shape[:-1]), rtol=1e-6)


# ------------------------------------------------------------------------------------------
# General, Additive, Concat against the reference.


@pytest.mark.parametrize(("D", "Dk"), [(16, 16), (16, 24), (24, 5), (1, 1), (80, 130)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_general(rng, device, D, Dk, dtype):
    q, k, v = random_inputs(rng, (2, 4, 37, D), (2, 2, 70, Dk), (2, 2, 70, 12), dtype=dtype)
    score = _general(rng, D, Dk)
    res = mha_ext.attention(
        q, k, v, score=score, return_weights=True, return_lse=True, device=device
    )
    _check_all(res, attention_ref(q, k, v, score=score), dtype)


def test_general_identity_is_dot(rng):
    q, k, v = random_inputs(rng, (1, 2, 15, 16), (1, 2, 19, 16), (1, 2, 19, 8))
    a = mha_ext.attention(q, k, v, score=mha_ext.General(np.eye(16)))
    b = mha_ext.attention(q, k, v, score="dot")
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("D", "Dk", "A"),
    [(16, 16, 12), (16, 24, 1), (24, 5, 33), (1, 1, 4), (64, 64, 64), (130, 17, 20)],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind", ["additive", "concat"])
def test_additive_concat(rng, device, kind, D, Dk, A, dtype):
    q, k, v = random_inputs(rng, (2, 4, 37, D), (2, 2, 70, Dk), (2, 2, 70, 12), dtype=dtype)
    score = _make_score(rng, kind, D, Dk, A)
    res = mha_ext.attention(
        q, k, v, score=score, return_weights=True, return_lse=True, device=device
    )
    _check_all(res, attention_ref(q, k, v, score=score), dtype)


def test_concat_equals_additive_split(rng):
    D, Dk, A = 16, 12, 9
    q, k, v = random_inputs(rng, (1, 2, 25, D), (1, 2, 31, Dk), (1, 2, 31, 8))
    c = _concat(rng, D, Dk, A)
    a = mha_ext.Additive(c.W[:D], c.W[D:], c.w)
    np.testing.assert_allclose(
        mha_ext.attention(q, k, v, score=c),
        mha_ext.attention(q, k, v, score=a),
        rtol=1e-6,
        atol=1e-6,
    )


def test_additive_single_row_exact(rng):
    """One query, a handful of keys, written out by hand (guards the reference too)."""
    D, A = 4, 3
    q, k, v = random_inputs(rng, (1, D), (5, D), (5, 2), dtype=np.float64)
    Wq, Wk, w = rng.standard_normal((D, A)), rng.standard_normal((D, A)), rng.standard_normal(A)
    s = np.array([w @ np.tanh(q[0] @ Wq + k[j] @ Wk) for j in range(5)])
    p = np.exp(s - s.max())
    p /= p.sum()
    out, weights = mha_ext.attention(
        q, k, v, score=mha_ext.Additive(Wq, Wk, w), return_weights=True
    )
    np.testing.assert_allclose(weights[0], p, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out[0], p @ v, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------
# Every score with masks, causal, windows, key_lengths, GQA, layouts.

KINDS = ["scaled_dot", "dot", "general", "additive", "concat"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("causal", [False, True, "top_left"])
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_scores_with_masks(rng, device, kind, causal, layout):
    B, Hq, Hk, Lq, Lk, D, Dk = 2, 6, 3, 53, 81, 16, 16 if kind in ("scaled_dot", "dot") else 10
    shapes = [(B, Hq, Lq, D), (B, Hk, Lk, Dk), (B, Hk, Lk, 8)]
    if layout == "blhd":
        shapes = [(s[0], s[2], s[1], s[3]) for s in shapes]
    q, k, v = random_inputs(rng, *shapes)
    score = _make_score(rng, kind, D, Dk)
    bias = rng.standard_normal((Hq, Lq, 1))
    bias[0, 5] = -np.inf  # a row hidden by the bias
    kw = {
        "mask": rng.random((B, 1, Lq, Lk)) < 0.8,
        "bias": bias,
        "causal": causal,
        "window": (40, 5),
        "key_lengths": [Lk, 30],
        "layout": layout,
        "score": score,
    }
    res = mha_ext.attention(q, k, v, return_weights=True, return_lse=True, device=device, **kw)
    ref = attention_ref(q, k, v, **kw)
    _check_all(res, ref)
    assert not any(np.isnan(x).any() for x in res)


@pytest.mark.parametrize("kind", ["general", "additive", "concat"])
@pytest.mark.parametrize("rank", [2, 3])
def test_scores_low_rank(rng, kind, rank):
    D, Dk = 16, 24
    shapes = [(3, 19, D), (3, 23, Dk), (3, 23, 8)] if rank == 3 else [(19, D), (23, Dk), (23, 8)]
    q, k, v = random_inputs(rng, *shapes)
    score = _make_score(rng, kind, D, Dk)
    res = mha_ext.attention(q, k, v, score=score, causal=True, return_weights=True, return_lse=True)
    _check_all(res, attention_ref(q, k, v, score=score, causal=True))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16], ids=["f16", "bf16"])
def test_scores_low_precision(rng, kind, dtype):
    """Low precision: our error at most 2x that of the float64 result rounded to the dtype
    (the best any implementation can do), plus a float32-eps floor."""
    D, Dk = 32, 32 if kind in ("scaled_dot", "dot") else 20
    q, k, v = random_inputs(rng, (2, 4, 41, D), (2, 2, 67, Dk), (2, 2, 67, 16), dtype=dtype)
    score = _make_score(rng, kind, D, Dk)
    out, w, lse = mha_ext.attention(
        q, k, v, score=score, causal=True, return_weights=True, return_lse=True
    )
    assert out.dtype == np.dtype(dtype)
    assert w.dtype == np.float32
    assert lse.dtype == np.float32
    ref_out, ref_w, ref_lse = attention_ref(q, k, v, score=score, causal=True)
    rounded = ref_out.astype(dtype)
    floor = 4 * np.finfo(np.float32).eps * np.abs(ref_out).max()
    assert max_abs_err(out, ref_out) <= 2 * max_abs_err(rounded, ref_out) + floor
    np.testing.assert_allclose(w, ref_w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_score_float32_params_and_int_params(rng):
    """Score weights of any real dtype are accepted (converted to the accumulation type)."""
    q, k, v = random_inputs(rng, (1, 2, 9, 4), (1, 2, 11, 4), (1, 2, 11, 4))
    W = rng.integers(-2, 3, size=(4, 4))
    for Wx in (W, W.astype(np.float32), W.astype(np.float16)):
        out = mha_ext.attention(q, k, v, score=mha_ext.General(Wx))
        np.testing.assert_allclose(
            out, attention_ref(q, k, v, score=("general", W))[0], rtol=1e-5, atol=1e-5
        )
