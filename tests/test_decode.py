"""The single-query-row path (decode, and the one-row tail task of a longer query).

A task with one query row takes its own path in the CPU kernel: scores along the keys, a
softmax vectorised over keys and P.V streamed four value rows at a time, with K prefetched
ahead. These tests pin it against the float64 reference over what that path handles itself:
key counts around the 64-key tile and the 4-key groups, head dims that are not multiples of
the vector width, Dv != D, GQA, every mask kind, -inf bias, Inf/NaN values at hidden keys,
the low-precision dtypes (converted rows, no prefetch) and the weights/lse outputs.
"""

from __future__ import annotations

import mha_ext
import ml_dtypes
import numpy as np
import pytest
from reference import assert_out_close, attention_ref, random_inputs

LK = [1, 3, 4, 5, 63, 64, 65, 130, 1000]


@pytest.mark.parametrize("lk", LK)
@pytest.mark.parametrize(("d", "dv"), [(128, 128), (13, 13), (64, 24), (1, 7)])
def test_one_row_matches_reference(rng, lk, d, dv):
    q, k, v = random_inputs(rng, (2, 4, 1, d), (2, 2, lk, d), (2, 2, lk, dv))
    out, w, lse = mha_ext.attention(q, k, v, return_weights=True, return_lse=True)
    ref = attention_ref(q, k, v)
    np.testing.assert_allclose(out, ref[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(w, ref[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse, ref[2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lq", [97, 193, 1025])  # 96/192-row tiles leave a one-row tail task
def test_one_row_tail_task(rng, lq):
    q, k, v = random_inputs(rng, (1, 2, lq, 40), (1, 2, 150, 40), (1, 2, 150, 40))
    for kw in ({}, {"causal": True}, {"window": (30, 0)}):
        out = mha_ext.attention(q, k, v, **kw)
        assert_out_close(out, q, k, v, **kw)


def _mask_kinds(rng, b, h, lk):
    key_mask = rng.random((b, 1, 1, lk)) < 0.6
    key_mask[..., 0] = True
    bias = rng.standard_normal((b, h, 1, lk))
    bias[..., 1::7] = -np.inf
    return [
        {"mask": key_mask},
        {"mask": np.zeros((b, 1, 1, lk), bool)},  # every key hidden: output 0, lse -inf
        {"bias": bias},
        {"key_lengths": np.array([lk, max(lk // 3, 0)][:b])},
        {"causal": True},
        {"causal": "top_left"},  # one query at position 0 sees key 0 only
        {"window": (17, 0)},
        {"window": (5, 3), "causal": "top_left"},
        {"mask": key_mask, "bias": bias, "key_lengths": np.array([lk, lk // 2][:b])},
    ]


@pytest.mark.parametrize("lk", [1, 65, 300])
def test_one_row_masks(rng, lk):
    q, k, v = random_inputs(rng, (2, 4, 1, 24), (2, 4, lk, 24), (2, 4, lk, 24))
    for kw in _mask_kinds(rng, 2, 4, lk):
        res = mha_ext.attention(q, k, v, return_weights=True, return_lse=True, **kw)
        ref = attention_ref(q, k, v, **kw)
        for got, exp, name in zip(res, ref, ("out", "weights", "lse")):
            np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-6, err_msg=f"{name} {kw}")


def test_one_row_nonfinite_values_at_hidden_keys(rng):
    """Inf/NaN in V (and K) at hidden keys must not reach the output (0 * inf = NaN)."""
    lk = 140
    q, k, v = random_inputs(rng, (1, 2, 1, 16), (1, 2, lk, 16), (1, 2, lk, 16))
    mask = np.ones((1, 1, 1, lk), bool)
    for j, val in ((3, np.inf), (70, np.nan), (139, -np.inf)):
        mask[..., j] = False
        v[:, :, j, 5] = val
        k[:, :, j, 2] = val
    for kw in ({"mask": mask}, {"key_lengths": np.array([3])}):
        out = mha_ext.attention(q, k, v, **kw)
        assert np.isfinite(out).all(), kw
        assert_out_close(out, q, k, v, **kw)
    # A -inf bias gives p = 0 too (with finite keys: inf + -inf would be a NaN score, which
    # poisons the row by the documented NaN rule).
    k_finite = np.nan_to_num(k, nan=0.5, posinf=0.5, neginf=0.5)
    bias = np.where(mask, 0.0, -np.inf)
    out = mha_ext.attention(q, k_finite, v, bias=bias)
    assert np.isfinite(out).all()
    # The same keys hidden by the mask: the reference's 0 * inf guard knows masks only.
    assert_out_close(out, q, k_finite, v, mask=mask)


def test_one_row_nan_at_a_visible_key_poisons_only_its_row(rng):
    q, k, v = random_inputs(rng, (1, 3, 1, 16), (1, 3, 100, 16), (1, 3, 100, 16))
    k[0, 1, 50, 0] = np.nan
    out, lse = mha_ext.attention(q, k, v, return_lse=True)
    assert np.isnan(out[0, 1]).all()
    assert np.isnan(lse[0, 1]).all()
    assert np.isfinite(out[0, [0, 2]]).all()


def test_one_row_large_logits_stay_finite(rng):
    q, k, v = random_inputs(rng, (1, 1, 1, 8), (1, 1, 200, 8), (1, 1, 200, 8))
    out = mha_ext.attention(q, k, v, scale=3e3)
    assert np.isfinite(out).all()
    assert_out_close(out, q, k, v, scale=3e3)


@pytest.mark.parametrize(
    "dtype", [np.float64, np.float16, ml_dtypes.bfloat16], ids=["f64", "f16", "bf16"]
)
@pytest.mark.parametrize("lk", [5, 64, 257])
def test_one_row_dtypes(rng, dtype, lk):
    q, k, v = random_inputs(rng, (2, 4, 1, 40), (2, 2, lk, 40), (2, 2, lk, 40), dtype)
    mask = rng.random((2, 1, 1, lk)) < 0.7
    mask[..., 0] = True
    for kw in ({}, {"mask": mask}, {"causal": True}):
        out = mha_ext.attention(q, k, v, **kw)
        assert_out_close(out, q, k, v, **kw)


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_one_row_strided_views(rng, layout):
    """Keys read in place through strides (blhd layout, stepped and negative-stride views)."""
    base = rng.standard_normal((2, 3 * 90, 4, 32)).astype(np.float32)
    k = base[:, ::3]  # (B, L, H, D) with a stepped L axis
    v = base[:, ::-3]
    q = rng.standard_normal((2, 1, 4, 32)).astype(np.float32)
    if layout == "bhld":
        q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    out = mha_ext.attention(q, k, v, layout=layout)
    assert_out_close(out, q, k, v, layout=layout)


def test_one_row_threads_identical(rng):
    q, k, v = random_inputs(rng, (1, 8, 1, 64), (1, 8, 3000, 64), (1, 8, 3000, 64))
    ref = mha_ext.attention(q, k, v, num_threads=1)
    for n in (2, 3):
        np.testing.assert_array_equal(mha_ext.attention(q, k, v, num_threads=n), ref)
