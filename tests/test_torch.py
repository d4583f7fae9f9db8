"""Cross-checks against torch.nn.functional.scaled_dot_product_attention (CPU, float32)."""

from __future__ import annotations

import mha_ext
import numpy as np
import pytest
from reference import random_inputs

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _sdpa(q, k, v, **kw):
    with torch.no_grad():
        t = F.scaled_dot_product_attention(
            torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), **kw
        )
    return t.numpy()


def _close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("Lq", "Lk", "D"), [(1, 1, 16), (7, 97, 64), (97, 97, 80), (130, 33, 128)])
def test_plain(rng, Lq, Lk, D):
    q, k, v = random_inputs(rng, (2, 4, Lq, D), (2, 4, Lk, D), (2, 4, Lk, D))
    _close(mha_ext.attention(q, k, v), _sdpa(q, k, v))


def test_dv_differs(rng):
    q, k, v = random_inputs(rng, (2, 3, 20, 32), (2, 3, 30, 32), (2, 3, 30, 12))
    _close(mha_ext.attention(q, k, v), _sdpa(q, k, v))


@pytest.mark.parametrize("mshape", [(30,), (20, 30), (2, 1, 1, 30), (1, 4, 20, 30)], ids=str)
def test_bool_mask_same_polarity(rng, mshape):
    q, k, v = random_inputs(rng, (2, 4, 20, 32), (2, 4, 30, 32), (2, 4, 30, 16))
    mask = rng.random(mshape) < 0.7
    mask[..., 0] = True  # no fully masked rows: SDPA's convention there is not under test
    full = np.ascontiguousarray(np.broadcast_to(mask, (2, 4, 20, 30)))  # SDPA needs >= 2-D
    _close(mha_ext.attention(q, k, v, mask=mask), _sdpa(q, k, v, attn_mask=torch.from_numpy(full)))


def test_float_mask_as_bias(rng):
    q, k, v = random_inputs(rng, (2, 4, 20, 32), (2, 4, 30, 32), (2, 4, 30, 16))
    bias = rng.standard_normal((1, 4, 20, 30)).astype(np.float32)
    bias[rng.random(bias.shape) < 0.3] = -np.inf
    bias[..., 0] = 0.0
    _close(mha_ext.attention(q, k, v, bias=bias), _sdpa(q, k, v, attn_mask=torch.from_numpy(bias)))


@pytest.mark.parametrize(("Lq", "Lk"), [(20, 20), (10, 40), (40, 10), (97, 97)])
def test_is_causal_is_top_left(rng, Lq, Lk):
    q, k, v = random_inputs(rng, (2, 4, Lq, 32), (2, 4, Lk, 32), (2, 4, Lk, 32))
    _close(mha_ext.attention(q, k, v, causal="top_left"), _sdpa(q, k, v, is_causal=True))
    if Lq == Lk:  # both alignments agree on square problems
        _close(mha_ext.attention(q, k, v, causal=True), _sdpa(q, k, v, is_causal=True))


def test_bottom_right_via_explicit_mask(rng):
    Lq, Lk = 10, 40
    q, k, v = random_inputs(rng, (2, 4, Lq, 32), (2, 4, Lk, 32), (2, 4, Lk, 32))
    tri = np.arange(Lk)[None, :] <= np.arange(Lq)[:, None] + (Lk - Lq)
    _close(mha_ext.attention(q, k, v, causal=True), _sdpa(q, k, v, attn_mask=torch.from_numpy(tri)))


@pytest.mark.parametrize(("Hq", "Hk"), [(8, 2), (8, 1), (6, 3)])
def test_enable_gqa(rng, Hq, Hk):
    q, k, v = random_inputs(rng, (2, Hq, 33, 64), (2, Hk, 45, 64), (2, Hk, 45, 64))
    _close(mha_ext.attention(q, k, v), _sdpa(q, k, v, enable_gqa=True))
    _close(
        mha_ext.attention(q, k, v, causal="top_left"),
        _sdpa(q, k, v, enable_gqa=True, is_causal=True),
    )


@pytest.mark.parametrize("scale", [0.05, 1.0, 2.5])
def test_scale(rng, scale):
    q, k, v = random_inputs(rng, (2, 4, 20, 32), (2, 4, 30, 32), (2, 4, 30, 32))
    _close(mha_ext.attention(q, k, v, scale=scale), _sdpa(q, k, v, scale=scale))
    _close(mha_ext.attention(q, k, v, score="dot", scale=scale), _sdpa(q, k, v, scale=scale))


def test_blhd_layout_vs_torch(rng):
    q, k, v = random_inputs(rng, (2, 20, 4, 32), (2, 30, 2, 32), (2, 30, 2, 32))
    out = mha_ext.attention(q, k, v, layout="blhd", causal="top_left")
    t = _sdpa(
        *(np.ascontiguousarray(x.swapaxes(1, 2)) for x in (q, k, v)),
        is_causal=True,
        enable_gqa=True,
    )
    _close(out, t.swapaxes(1, 2))


def test_mask_and_bias_combined(rng):
    q, k, v = random_inputs(rng, (2, 4, 20, 32), (2, 4, 30, 32), (2, 4, 30, 16))
    mask = rng.random((2, 1, 20, 30)) < 0.7
    mask[..., 0] = True
    bias = rng.standard_normal((4, 1, 30)).astype(np.float32)
    combined = np.where(mask, bias, -np.inf).astype(np.float32)
    _close(
        mha_ext.attention(q, k, v, mask=mask, bias=bias),
        _sdpa(q, k, v, attn_mask=torch.from_numpy(combined)),
    )
