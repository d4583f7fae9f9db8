"""The layers of SPEC section 5 against PyTorch / Keras modules and a float64 NumPy reference.

Polarity reminder: PyTorch's bool masks mean True = hidden, ours True = may attend, so every
PyTorch bool mask ``m`` is passed to our layers as ``~m``. Keras' masks already match ours.
"""

from __future__ import annotations

import math
import os

import mha_ext
import numpy as np
import pytest
from mha_ext import _nn

torch = pytest.importorskip("torch")
nn = torch.nn

TOL = {"rtol": 1e-4, "atol": 1e-4}
TOL64 = {"rtol": 1e-10, "atol": 1e-10}


@pytest.fixture(autouse=True, scope="module")
def _torch_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _t(x):
    return torch.from_numpy(np.ascontiguousarray(x))


def _randomize(module, rng, scale=0.3):
    """Random weights everywhere (biases included; LayerNorm weights around 1)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            a = rng.standard_normal(p.shape) * scale
            if "norm" in name and name.endswith("weight"):
                a += 1.0
            p.copy_(torch.from_numpy(a))
    return module.eval()


def _pad_mask(rng, b, lk):
    """Ours: bool (B, Lk), True = real token; every row keeps at least its first key."""
    lengths = rng.integers(1, lk + 1, size=b)
    lengths[0] = lk
    return np.arange(lk)[None, :] < lengths[:, None]


def _attn_mask(rng, shape):
    """Ours: bool, True = may attend; key 0 always visible so no row is empty."""
    m = rng.random(shape) > 0.35
    m[..., 0] = True
    return m


# ------------------------------------------------------------------------------------------
# MultiHeadAttention vs torch.nn.MultiheadAttention


MHA_CASES = ["plain", "bool_mask", "head_mask", "float_mask", "kpm", "mask_kpm", "causal"]


@pytest.mark.parametrize("case", MHA_CASES)
@pytest.mark.parametrize(
    ("kdim", "vdim", "bias"), [(None, None, True), (6, 10, True), (None, None, False)]
)
def test_mha_matches_torch(rng, case, kdim, vdim, bias):
    b, e, h = 3, 16, 4
    cross = kdim is not None
    lq, lk = (5, 7) if cross else (6, 6)
    mod = nn.MultiheadAttention(
        e, h, bias=bias, kdim=kdim, vdim=vdim, batch_first=True, dtype=torch.float64
    )
    _randomize(mod, rng)
    ours = mha_ext.MultiHeadAttention(e, h, kdim=kdim, vdim=vdim, bias=bias).load_torch(
        mod.state_dict()
    )
    q = rng.standard_normal((b, lq, e)).astype(np.float32)
    if cross:
        k = rng.standard_normal((b, lk, kdim)).astype(np.float32)
        v = rng.standard_normal((b, lk, vdim)).astype(np.float32)
    else:
        k = v = q
    kw, tkw = {}, {}
    if case in ("bool_mask", "mask_kpm"):
        m = _attn_mask(rng, (lq, lk))
        kw["mask"], tkw["attn_mask"] = m, _t(~m)
    if case == "head_mask":  # torch: (B*H, Lq, Lk); ours: (B, H, Lq, Lk)
        m = _attn_mask(rng, (b, h, lq, lk))
        kw["mask"], tkw["attn_mask"] = m, _t(~m.reshape(b * h, lq, lk))
    if case == "float_mask":
        f = rng.standard_normal((lq, lk))
        f[rng.random((lq, lk)) < 0.3] = -np.inf
        f[:, 0] = 0.5
        kw["attn_bias"], tkw["attn_mask"] = f, _t(f)
    if case in ("kpm", "mask_kpm"):
        p = _pad_mask(rng, b, lk)
        kw["key_padding_mask"], tkw["key_padding_mask"] = p, _t(~p)
    if case == "causal":  # torch's triangle is top-left aligned (equal to ours when Lq == Lk)
        kw["causal"] = "top_left" if lq != lk else True
        tkw["attn_mask"] = _t(np.triu(np.ones((lq, lk), bool), 1))
    for need, avg in ((False, True), (True, True), (True, False)):
        with torch.no_grad():
            t_out, t_w = mod(
                _t(q.astype(np.float64)),
                _t(k.astype(np.float64)),
                _t(v.astype(np.float64)),
                need_weights=need,
                average_attn_weights=avg,
                **tkw,
            )
        out, w = ours(q, k, v, need_weights=need, average_weights=avg, **kw)
        assert out.dtype == np.float32
        assert out.shape == (b, lq, e)
        np.testing.assert_allclose(out, _np(t_out), **TOL)
        if need:
            assert w.shape == ((b, lq, lk) if avg else (b, h, lq, lk))
            np.testing.assert_allclose(w, _np(t_w), **TOL)
        else:
            assert w is None


def test_mha_float64_and_unbatched(rng):
    e, h, lq, lk = 12, 3, 4, 9
    mod = _randomize(nn.MultiheadAttention(e, h, batch_first=True, dtype=torch.float64), rng)
    ours = mha_ext.MultiHeadAttention(e, h, dtype=np.float64).load_torch(mod)
    q = rng.standard_normal((lq, e))
    kv = rng.standard_normal((lk, e))
    p = np.ones(lk, bool)
    p[6:] = False
    with torch.no_grad():
        t_out, t_w = mod(_t(q), _t(kv), _t(kv), key_padding_mask=_t(~p), average_attn_weights=False)
    out, w = ours(q, kv, key_padding_mask=p, need_weights=True, average_weights=False)
    assert out.dtype == np.float64
    assert out.shape == (lq, e)
    assert w.shape == (h, lq, lk)
    np.testing.assert_allclose(out, _np(t_out), **TOL64)
    np.testing.assert_allclose(w, _np(t_w), **TOL64)


def test_mha_tensor_state_dict_and_float32_module(rng):
    """A float32 torch module, its tensors passed as they are."""
    e, h = 8, 2
    mod = _randomize(nn.MultiheadAttention(e, h, batch_first=True), rng)
    ours = mha_ext.MultiHeadAttention(e, h).load_torch(dict(mod.state_dict()))
    x = rng.standard_normal((2, 5, e)).astype(np.float32)
    with torch.no_grad():
        ref = _np(mod(_t(x), _t(x), _t(x), need_weights=False)[0])
    np.testing.assert_allclose(ours(x)[0], ref, **TOL)


def test_mha_empty_row_gives_output_bias(rng):
    e, h = 8, 2
    ours = mha_ext.MultiHeadAttention(e, h, seed=3)
    ours.b_o = rng.standard_normal(e).astype(np.float32)
    x = rng.standard_normal((1, 3, e)).astype(np.float32)
    m = np.ones((3, 3), bool)
    m[1] = False
    out, w = ours(x, mask=m, need_weights=True)
    np.testing.assert_array_equal(out[0, 1], ours.b_o)
    np.testing.assert_array_equal(w[0, 1], 0)
    assert np.isfinite(out).all()


# ------------------------------------------------------------------------------------------
# GQA and score functions vs a float64 NumPy reference


def _mha_ref(layer, q_in, k_in, v_in, visible, score_fn):
    """float64 multi-head attention written out: project, split, repeat KV heads, softmax."""
    f = np.float64
    h, hk, hd = layer.num_heads, layer.num_kv_heads, layer.head_dim

    def proj(x, w, bb):
        y = x.astype(f) @ w.astype(f)
        return y if bb is None else y + bb.astype(f)

    b, lq, lk = q_in.shape[0], q_in.shape[1], k_in.shape[1]
    q = proj(q_in, layer.w_q, layer.b_q).reshape(b, lq, h, hd).transpose(0, 2, 1, 3)
    k = proj(k_in, layer.w_k, layer.b_k).reshape(b, lk, hk, hd).transpose(0, 2, 1, 3)
    v = proj(v_in, layer.w_v, layer.b_v).reshape(b, lk, hk, hd).transpose(0, 2, 1, 3)
    k = np.repeat(k, h // hk, axis=1)
    v = np.repeat(v, h // hk, axis=1)
    s = score_fn(q, k)
    s = np.where(visible, s, -np.inf)
    s = np.exp(s - s.max(-1, keepdims=True))
    p = s / s.sum(-1, keepdims=True)
    o = (p @ v).transpose(0, 2, 1, 3).reshape(b, lq, h * hd)
    return o @ layer.w_o.astype(f) + layer.b_o.astype(f), p


def _rand_biases(layer, rng):
    for name in ("b_q", "b_k", "b_v", "b_o"):
        cur = getattr(layer, name)
        setattr(layer, name, (rng.standard_normal(cur.shape) * 0.3).astype(cur.dtype))


@pytest.mark.parametrize(("h", "hk"), [(4, 2), (6, 1), (4, 4)])
def test_gqa_matches_numpy_reference(rng, h, hk):
    e, b, lq, lk = 24, 2, 5, 8
    layer = mha_ext.MultiHeadAttention(e, h, num_kv_heads=hk, kdim=10, vdim=7, seed=11)
    hd = e // h
    assert layer.w_k.shape == (10, hk * hd)
    assert layer.w_v.shape == (7, hk * hd)
    _rand_biases(layer, rng)
    q = rng.standard_normal((b, lq, e)).astype(np.float32)
    k = rng.standard_normal((b, lk, 10)).astype(np.float32)
    v = rng.standard_normal((b, lk, 7)).astype(np.float32)
    m = _attn_mask(rng, (b, 1, lq, lk))
    p = _pad_mask(rng, b, lk)
    out, w = layer(
        q, k, v, mask=m, key_padding_mask=p, causal=True, need_weights=True, average_weights=False
    )
    vis = m & p[:, None, None, :]
    vis = vis & (np.arange(lk)[None, :] <= np.arange(lq)[:, None] + (lk - lq))
    ref, ref_w = _mha_ref(layer, q, k, v, vis, lambda q, k: q @ k.swapaxes(-1, -2) / math.sqrt(hd))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(w, ref_w, rtol=1e-5, atol=1e-5)


def test_layer_score_objects_match_reference(rng):
    e, h, b, lq, lk, a = 12, 3, 2, 4, 6, 5
    hd = e // h
    x = rng.standard_normal((b, lq, e))
    y = rng.standard_normal((b, lk, e))
    vis = np.ones((1, 1, lq, lk), bool)
    wg = rng.standard_normal((hd, hd))
    wq, wk, wa = (rng.standard_normal(s) for s in ((hd, a), (hd, a), (a,)))
    wc = rng.standard_normal((2 * hd, a))
    cases = [
        ("dot", lambda q, k: q @ k.swapaxes(-1, -2)),
        (mha_ext.General(wg), lambda q, k: q @ wg @ k.swapaxes(-1, -2)),
        (
            mha_ext.Additive(wq, wk, wa),
            lambda q, k: np.tanh((q @ wq)[..., :, None, :] + (k @ wk)[..., None, :, :]) @ wa,
        ),
        (
            mha_ext.Concat(wc, wa),
            lambda q, k: (
                np.tanh((q @ wc[:hd])[..., :, None, :] + (k @ wc[hd:])[..., None, :, :]) @ wa
            ),
        ),
    ]
    for score, fn in cases:
        layer = mha_ext.MultiHeadAttention(e, h, score=score, dtype=np.float64, seed=5)
        _rand_biases(layer, rng)
        out, _ = layer(x, y)
        ref, _ = _mha_ref(layer, x, y, y, vis, fn)
        np.testing.assert_allclose(out, ref, **TOL64)


# ------------------------------------------------------------------------------------------
# Transformer layers vs torch


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("masks", ["none", "padding", "causal_padding", "bool_mask"])
def test_encoder_layer_matches_torch(rng, norm_first, activation, masks):
    d, h, f, b, length = 16, 4, 32, 3, 7
    mod = nn.TransformerEncoderLayer(
        d,
        h,
        f,
        dropout=0.0,
        activation=activation,
        norm_first=norm_first,
        batch_first=True,
        dtype=torch.float64,
    )
    _randomize(mod, rng)
    ours = mha_ext.TransformerEncoderLayer(
        d, h, f, activation=activation, norm_first=norm_first
    ).load_torch(mod.state_dict())
    x = rng.standard_normal((b, length, d)).astype(np.float32)
    kw, tkw = {}, {}
    if masks in ("padding", "causal_padding"):
        p = _pad_mask(rng, b, length)
        kw["key_padding_mask"], tkw["src_key_padding_mask"] = p, _t(~p)
    if masks == "causal_padding":
        kw["causal"] = True
        tkw["src_mask"] = _t(np.triu(np.ones((length, length), bool), 1))
        tkw["is_causal"] = True
    if masks == "bool_mask":
        m = _attn_mask(rng, (length, length))
        kw["mask"], tkw["src_mask"] = m, _t(~m)
    with torch.no_grad():
        ref = _np(mod(_t(x.astype(np.float64)), **tkw))
    out = ours(x, **kw)
    assert out.dtype == np.float32
    assert out.shape == x.shape
    if "key_padding_mask" in kw:
        # Padded positions of the output are defined as 0 (torch computes them anyway).
        p = kw["key_padding_mask"]
        np.testing.assert_array_equal(out[~p], 0)
        out, ref = out[p], ref[p]
    np.testing.assert_allclose(out, ref, **TOL)


def test_encoder_layer_no_bias_float64(rng):
    d, h, f = 8, 2, 12
    mod = nn.TransformerEncoderLayer(
        d,
        h,
        f,
        dropout=0.0,
        bias=False,
        batch_first=True,
        layer_norm_eps=1e-6,
        activation="gelu",
        dtype=torch.float64,
    )
    _randomize(mod, rng)
    ours = mha_ext.TransformerEncoderLayer(
        d, h, f, bias=False, layer_norm_eps=1e-6, activation="gelu", dtype=np.float64
    ).load_torch(mod)
    assert ours.b_1 is None
    assert ours.norm1_bias is None
    x = rng.standard_normal((2, 5, d))
    with torch.no_grad():
        ref = _np(mod(_t(x)))
    np.testing.assert_allclose(ours(x), ref, **TOL64)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_decoder_layer_matches_torch(rng, norm_first, activation):
    d, h, f, b, lt, ls = 16, 4, 24, 3, 6, 9
    mod = nn.TransformerDecoderLayer(
        d,
        h,
        f,
        dropout=0.0,
        activation=activation,
        norm_first=norm_first,
        batch_first=True,
        dtype=torch.float64,
    )
    _randomize(mod, rng)
    ours = mha_ext.TransformerDecoderLayer(
        d, h, f, activation=activation, norm_first=norm_first
    ).load_torch(mod.state_dict())
    tgt = rng.standard_normal((b, lt, d)).astype(np.float32)
    mem = rng.standard_normal((b, ls, d)).astype(np.float32)
    tp = _pad_mask(rng, b, lt)
    mp = _pad_mask(rng, b, ls)
    mm = _attn_mask(rng, (lt, ls))
    causal = _t(np.triu(np.ones((lt, lt), bool), 1))  # torch bool: True = hidden
    t64 = _t(tgt.astype(np.float64))
    m64 = _t(mem.astype(np.float64))
    with torch.no_grad():
        ref = _np(
            mod(
                t64,
                m64,
                tgt_mask=causal,
                tgt_is_causal=True,
                tgt_key_padding_mask=_t(~tp),
                memory_key_padding_mask=_t(~mp),
                memory_mask=_t(~mm),
            )
        )
        ref_plain = _np(mod(t64, m64))
    out = ours(
        tgt,
        mem,
        tgt_causal=True,
        tgt_key_padding_mask=tp,
        memory_key_padding_mask=mp,
        memory_mask=mm,
    )
    np.testing.assert_array_equal(out[~tp], 0)  # padded target positions are 0
    np.testing.assert_allclose(out[tp], ref[tp], **TOL)
    np.testing.assert_allclose(ours(tgt, mem), ref_plain, **TOL)


def test_decoder_unbatched_float64(rng):
    d, h, f = 8, 2, 10
    mod = _randomize(
        nn.TransformerDecoderLayer(d, h, f, dropout=0.0, batch_first=True, dtype=torch.float64),
        rng,
    )
    ours = mha_ext.TransformerDecoderLayer(d, h, f, dtype=np.float64).load_torch(mod)
    tgt, mem = rng.standard_normal((4, d)), rng.standard_normal((6, d))
    with torch.no_grad():
        ref = _np(mod(_t(tgt), _t(mem)))
    np.testing.assert_allclose(ours(tgt, mem), ref, **TOL64)


# ------------------------------------------------------------------------------------------
# GELU / erf


def test_erf_and_gelu_accuracy():
    xs = np.concatenate([np.linspace(-9, 9, 20001), [0.0, -0.0, 2.5, -2.5, 1e-8, 30, -30]])
    ref = np.array([math.erf(x) for x in xs])
    np.testing.assert_allclose(_nn.erf(xs), ref, rtol=0, atol=5e-15)
    g_ref = np.array([0.5 * x * math.erfc(-x / math.sqrt(2)) for x in xs])
    # Relative error of the negative tail: erfc = 1 - erf for |z| < 2.5 (≤ 2e-12 measured).
    np.testing.assert_allclose(_nn.gelu(xs), g_ref, rtol=5e-12, atol=1e-300)
    x32 = xs.astype(np.float32)
    g32 = _nn.gelu(x32)
    assert g32.dtype == np.float32
    g32_ref = [0.5 * x * math.erfc(-x / math.sqrt(2)) for x in x32.astype(np.float64)]
    np.testing.assert_allclose(g32, g32_ref, rtol=1.2e-7, atol=1e-45)  # float32 rounding
    # torch's float32 GELU loses relative precision in the negative tail: absolute check.
    np.testing.assert_allclose(g32, _np(torch.nn.functional.gelu(_t(x32))), rtol=0, atol=1e-6)
    assert np.isnan(_nn.gelu(np.array([np.nan]))).all()
    np.testing.assert_array_equal(_nn.gelu(np.array([np.inf, -np.inf])), [np.inf, 0.0])


# ------------------------------------------------------------------------------------------
# Keras (3, torch backend): MultiHeadAttention, AdditiveAttention, Attention(concat)


@pytest.fixture(scope="module")
def keras():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    k = pytest.importorskip("keras")
    if k.backend.backend() != "torch":
        pytest.skip(f"keras runs on the {k.backend.backend()!r} backend, these tests use torch")
    return k


def _assign(layer, arrays):
    for var, a in zip(layer.weights, arrays):
        var.assign(a)


@pytest.mark.parametrize("use_bias", [True, False])
def test_mha_load_keras(rng, keras, use_bias):
    e, h, b, lq, lk, kd, vd = 12, 3, 2, 4, 6, 5, 7
    hd = e // h
    km = keras.layers.MultiHeadAttention(num_heads=h, key_dim=hd, use_bias=use_bias)
    q = rng.standard_normal((b, lq, e)).astype(np.float32)
    k = rng.standard_normal((b, lk, kd)).astype(np.float32)
    v = rng.standard_normal((b, lk, vd)).astype(np.float32)
    km(q, v, key=k)  # builds the weights
    ws = [(rng.standard_normal(tuple(w.shape)) * 0.3).astype(np.float32) for w in km.weights]
    _assign(km, ws)
    mask = _attn_mask(rng, (b, lq, lk))
    ref_out, ref_w = km(q, v, key=k, attention_mask=mask, return_attention_scores=True)
    ours = mha_ext.MultiHeadAttention(e, h, kdim=kd, vdim=vd, bias=use_bias).load_keras(ws)
    out, w = ours(q, k, v, mask=mask[:, None], need_weights=True, average_weights=False)
    np.testing.assert_allclose(out, _np(ref_out), **TOL)
    np.testing.assert_allclose(w, _np(ref_w), **TOL)


KERAS_DTYPES = ["float64", "float32"]


# Keras on the torch backend computes in float32 even for dtype="float64" layers (measured
# error ~1e-7), so our float64 run is held to 1e-5.
KERAS_TOL = {"float64": {"rtol": 1e-5, "atol": 1e-5}, "float32": TOL}


@pytest.mark.parametrize("dtype", KERAS_DTYPES)
def test_keras_additive_attention(rng, keras, dtype):
    """Keras: s = Σ_a scale_a · tanh(q_a + k_a), i.e. Additive(W_q = I, W_k = I, w = scale)."""
    b, tq, tv, d = 2, 5, 7, 6
    tol = KERAS_TOL[dtype]
    layer = keras.layers.AdditiveAttention(use_scale=True, dtype=dtype)
    q = rng.standard_normal((b, tq, d)).astype(dtype)
    v = rng.standard_normal((b, tv, d)).astype(dtype)
    k = rng.standard_normal((b, tv, d)).astype(dtype)
    layer([q, v, k])
    scale = rng.standard_normal(d).astype(dtype)
    _assign(layer, [scale])
    vmask = _pad_mask(rng, b, tv)
    eye = np.eye(d, dtype=dtype)
    score = mha_ext.Additive(eye, eye, scale)
    for causal in (False, True):
        ref, ref_w = layer(
            [q, v, k], mask=[None, vmask], return_attention_scores=True, use_causal_mask=causal
        )
        # Keras' causal mask is row >= col: top-left alignment.
        out, w = mha_ext.attention(
            q[:, None],
            k[:, None],
            v[:, None],
            score=score,
            mask=vmask[:, None, None, :],
            causal="top_left" if causal else False,
            return_weights=True,
        )
        np.testing.assert_allclose(out[:, 0], _np(ref), **tol)
        np.testing.assert_allclose(w[:, 0], _np(ref_w), **tol)


@pytest.mark.parametrize("dtype", KERAS_DTYPES)
def test_keras_concat_attention(rng, keras, dtype):
    """Keras: s = c · Σ_a tanh(scale · (q_a + k_a)) with scalars c (concat_score_weight) and
    scale: Concat(W = [scale·I; scale·I], w = c·1), equally Additive(scale·I, scale·I, c·1)."""
    b, tq, tv, d = 2, 4, 6, 5
    tol = KERAS_TOL[dtype]
    layer = keras.layers.Attention(use_scale=True, score_mode="concat", dtype=dtype)
    q = rng.standard_normal((b, tq, d)).astype(dtype)
    v = rng.standard_normal((b, tv, d)).astype(dtype)
    layer([q, v])
    s, c = 0.7, -1.3
    _assign(layer, [np.asarray(s, dtype), np.asarray(c, dtype)])
    vmask = _pad_mask(rng, b, tv)
    ref, ref_w = layer([q, v], mask=[None, vmask], return_attention_scores=True)
    eye = np.eye(d, dtype=dtype)
    wvec = np.full(d, c, dtype)
    for score in (
        mha_ext.Concat(np.vstack([s * eye, s * eye]), wvec),
        mha_ext.Additive(s * eye, s * eye, wvec),
    ):
        out, w = mha_ext.attention(
            q[:, None],
            v[:, None],
            v[:, None],
            score=score,
            mask=vmask[:, None, None, :],
            return_weights=True,
        )
        np.testing.assert_allclose(out[:, 0], _np(ref), **tol)
        np.testing.assert_allclose(w[:, 0], _np(ref_w), **tol)


# ------------------------------------------------------------------------------------------
# Construction, determinism and errors


def test_init_shapes_and_seed():
    a = mha_ext.MultiHeadAttention(16, 4, kdim=6, vdim=5, num_kv_heads=2, seed=7)
    b = mha_ext.MultiHeadAttention(16, 4, kdim=6, vdim=5, num_kv_heads=2, seed=7)
    c = mha_ext.MultiHeadAttention(16, 4, kdim=6, vdim=5, num_kv_heads=2, seed=8)
    assert a.w_q.shape == (16, 16)
    assert a.w_k.shape == (6, 8)
    assert a.w_v.shape == (5, 8)
    assert a.w_o.shape == (16, 16)
    assert a.b_k.shape == (8,)
    assert a.w_q.dtype == np.float32
    np.testing.assert_array_equal(a.w_v, b.w_v)
    assert not np.array_equal(a.w_v, c.w_v)
    bound = math.sqrt(6 / (16 + 16))
    assert np.abs(a.w_q).max() <= bound
    e1 = mha_ext.TransformerDecoderLayer(8, 2, 12, seed=1, dtype=np.float64)
    e2 = mha_ext.TransformerDecoderLayer(8, 2, 12, seed=1, dtype=np.float64)
    np.testing.assert_array_equal(e1.multihead_attn.w_k, e2.multihead_attn.w_k)
    np.testing.assert_array_equal(e1.w_2, e2.w_2)
    assert e1.w_1.shape == (8, 12)
    assert e1.w_1.dtype == np.float64
    assert e1.norm3_weight.shape == (8,)


@pytest.mark.parametrize(
    ("kwargs", "exc", "word"),
    [
        ({"embed_dim": 10, "num_heads": 3}, ValueError, "embed_dim"),
        ({"embed_dim": 0, "num_heads": 1}, ValueError, "embed_dim"),
        ({"embed_dim": 8, "num_heads": 2.0}, TypeError, "num_heads"),
        ({"embed_dim": 8, "num_heads": 4, "num_kv_heads": 3}, ValueError, "num_kv_heads"),
        ({"embed_dim": 8, "num_heads": 2, "kdim": -1}, ValueError, "kdim"),
        ({"embed_dim": 8, "num_heads": 2, "dtype": np.float16}, TypeError, "dtype"),
        ({"embed_dim": 8, "num_heads": 2, "score": "cosine"}, ValueError, "score"),
        ({"embed_dim": 8, "num_heads": 2, "bias": 1}, TypeError, "bias"),
        ({"embed_dim": 8, "num_heads": 2, "seed": 1.5}, TypeError, "seed"),
    ],
)
def test_mha_constructor_errors(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        mha_ext.MultiHeadAttention(**kwargs)


def test_call_errors(rng):
    layer = mha_ext.MultiHeadAttention(8, 2, kdim=4, seed=0)
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    k = rng.standard_normal((2, 5, 4)).astype(np.float32)
    v = rng.standard_normal((2, 5, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="query"):
        layer(x[0, 0])
    with pytest.raises(ValueError, match="key"):
        layer(x, x, v)
    with pytest.raises(ValueError, match="value"):
        layer(x, k, v[:, :4])
    with pytest.raises(TypeError, match="query"):
        layer(x.astype(bool), k, v)
    with pytest.raises(TypeError, match=r"mask.*m == 0"):
        layer(x, k, v, mask=np.ones((3, 5)))
    with pytest.raises(ValueError, match="mask"):
        layer(x, k, v, mask=np.ones((3, 4), bool))
    with pytest.raises(ValueError, match="key_padding_mask"):
        layer(x, k, v, key_padding_mask=np.ones((2, 4), bool))
    with pytest.raises(TypeError, match="key_padding_mask"):
        layer(x, k, v, key_padding_mask=np.ones((2, 5), np.int8))
    with pytest.raises(TypeError, match="attn_bias"):
        layer(x, k, v, attn_bias=np.ones((3, 5), bool))
    with pytest.raises(ValueError, match="causal"):
        layer(x, k, v, causal="upper")
    with pytest.raises(TypeError, match="need_weights"):
        layer(x, k, v, need_weights="yes")
    enc = mha_ext.TransformerEncoderLayer(8, 2, 16, seed=0)
    with pytest.raises(ValueError, match="src"):
        enc(x[..., :4])
    dec = mha_ext.TransformerDecoderLayer(8, 2, 16, seed=0)
    with pytest.raises(ValueError, match="memory"):
        dec(x, x[:1])
    with pytest.raises(TypeError, match="tgt_mask"):
        dec(x, x, tgt_mask=np.zeros((3, 3)))
    with pytest.raises(ValueError, match="memory_key_padding_mask"):
        dec(x, x, memory_key_padding_mask=np.ones((2, 2), bool))
    with pytest.raises(ValueError, match="tgt_causal"):
        dec(x, x, tgt_causal="yes")


def test_layer_constructor_errors():
    with pytest.raises(ValueError, match="activation"):
        mha_ext.TransformerEncoderLayer(8, 2, activation="swish")
    with pytest.raises(ValueError, match="d_model"):
        mha_ext.TransformerEncoderLayer(9, 2)
    with pytest.raises(ValueError, match="layer_norm_eps"):
        mha_ext.TransformerDecoderLayer(8, 2, layer_norm_eps=-1.0)
    with pytest.raises(TypeError, match="norm_first"):
        mha_ext.TransformerDecoderLayer(8, 2, norm_first="yes")
    with pytest.raises(ValueError, match="dim_feedforward"):
        mha_ext.TransformerEncoderLayer(8, 2, 0)


def test_load_errors(rng):
    mod = _randomize(nn.MultiheadAttention(8, 2, batch_first=True), rng)
    sd = {k: _np(v) for k, v in mod.state_dict().items()}
    layer = mha_ext.MultiHeadAttention(8, 2)
    with pytest.raises(ValueError, match=r"missing key 'out_proj\.weight'"):
        layer.load_torch({k: v for k, v in sd.items() if k != "out_proj.weight"})
    with pytest.raises(ValueError, match="unexpected keys"):
        layer.load_torch({**sd, "extra": np.zeros(1)})
    with pytest.raises(ValueError, match="in_proj_weight"):
        mha_ext.MultiHeadAttention(4, 2).load_torch(sd)
    with pytest.raises(ValueError, match="bias=False"):
        mha_ext.MultiHeadAttention(8, 2, bias=False).load_torch(sd)
    with pytest.raises(ValueError, match="num_kv_heads"):
        mha_ext.MultiHeadAttention(8, 2, num_kv_heads=1).load_torch(sd)
    with pytest.raises(ValueError, match="bias_k"):
        layer.load_torch({**sd, "bias_k": np.zeros((1, 1, 8))})
    with pytest.raises(TypeError, match="state_dict"):
        layer.load_torch([1, 2])
    with pytest.raises(ValueError, match="weights"):
        layer.load_keras([np.zeros((8, 2, 4))] * 3)
    with pytest.raises(ValueError, match="query/kernel"):
        layer.load_keras([np.zeros((8, 2, 3))] + [np.zeros(1)] * 7)
    enc = mha_ext.TransformerEncoderLayer(8, 2, 16)
    with pytest.raises(ValueError, match=r"'self_attn\.in_proj_weight'"):
        enc.load_torch(sd)
    enc_sd = {"self_attn." + k: v for k, v in sd.items()}
    with pytest.raises(ValueError, match=r"'linear1\.weight'"):
        enc.load_torch(enc_sd)
