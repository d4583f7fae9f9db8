"""The native layer kernels (csrc/cpu/nn_cpu.cpp) against float64 references, and the packed
layer paths against the padded ones and torch."""

from __future__ import annotations

import math
import tracemalloc

import mha_ext
import numpy as np
import pytest
from mha_ext import _core, _nn
from mha_ext.layers import Packing, encoder_stack

torch = pytest.importorskip("torch")


def _gelu_ref(x):
    return np.array([0.5 * v * math.erfc(-v / math.sqrt(2)) for v in np.asarray(x, np.float64)])


def _tanh_ref(x):
    # x/2 (1 + tanh u) = x / (1 + exp(-2u)): the same value without the cancellation of
    # 1 + tanh(u) in the negative tail.
    c = math.sqrt(2 / math.pi)
    out = []
    for v in np.asarray(x, np.float64):
        a = -2 * c * (v + 0.044715 * v**3)
        out.append(0.0 if a > 700 else v / (1 + math.exp(a)))
    return np.array(out)


def _grid(rng):
    return np.concatenate(
        [np.linspace(-30, 30, 30001), rng.standard_normal(20001) * 3, [0.0, -0.0, 2.5 * 2**0.5]]
    )


def _ulps(got32, ref64):
    r = ref64.astype(np.float32)
    keep = np.abs(ref64) > np.finfo(np.float32).tiny
    return (np.abs(got32.astype(np.float64) - ref64) / np.spacing(np.abs(r)))[keep].max()


def test_simd_clone_reported():
    assert _core.nn_simd() in ("x86-64-v4", "x86-64-v3", "x86-64", "portable")


def test_gelu_float32_within_one_ulp_and_float64(rng):
    xs = _grid(rng)
    ref = _gelu_ref(xs)
    np.testing.assert_allclose(_nn.gelu(xs), ref, rtol=5e-12, atol=2e-15)
    x32 = xs.astype(np.float32)
    g32 = _nn.gelu(x32)
    assert g32.dtype == np.float32
    assert _ulps(g32, _gelu_ref(x32)) <= 1.0  # measured: 0.5 (correctly rounded)


def test_gelu_tanh_and_relu_and_erf(rng):
    xs = _grid(rng)
    np.testing.assert_allclose(_nn.gelu(xs, "tanh"), _tanh_ref(xs), rtol=1e-13, atol=4e-15)
    x32 = xs.astype(np.float32)
    assert _ulps(_nn.gelu(x32, approximate="tanh"), _tanh_ref(x32.astype(np.float64))) <= 1.0
    np.testing.assert_array_equal(_nn.relu(x32), np.maximum(x32, 0))
    np.testing.assert_allclose(_nn.erf(xs), [math.erf(v) for v in xs], rtol=0, atol=1e-15)
    t = torch.nn.functional.gelu(torch.from_numpy(x32), approximate="tanh").numpy()
    np.testing.assert_allclose(_nn.gelu(x32, "tanh"), t, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_special_values(dtype):
    x = np.array([np.nan, np.inf, -np.inf, 0.0, -1e30, 1e30], dtype)
    for f in (_nn.gelu, _nn.gelu_tanh):
        y = f(x)
        assert np.isnan(y[0])
        np.testing.assert_array_equal(y[1:], np.array([np.inf, 0, 0, 0, 1e30], dtype))
    r = _nn.relu(x)
    assert np.isnan(r[0])
    np.testing.assert_array_equal(r[1:], np.array([np.inf, 0, 0, 0, 1e30], dtype))
    np.testing.assert_array_equal(_nn.erf(np.array([np.inf, -np.inf])), [1.0, -1.0])


@pytest.mark.parametrize("act", ["none", "relu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 2049), (130, 384)])
def test_bias_act_shapes_and_strided_rows(rng, act, shape):
    x = rng.standard_normal(shape)
    b = rng.standard_normal(shape[1])
    ref = {"none": lambda v: v, "relu": lambda v: np.maximum(v, 0)}.get(act)
    want = ref(x + b) if ref else (_gelu_ref if act == "gelu" else _tanh_ref)((x + b).ravel())
    np.testing.assert_allclose(_nn._bias_act(x, b, act).ravel(), np.ravel(want), rtol=1e-13,
                               atol=1e-14)
    # A row-strided view (rows of a wider buffer) is read in place, and out may alias x.
    wide = np.zeros((shape[0], shape[1] + 5))
    wide[:, : shape[1]] = x
    view = wide[:, : shape[1]]
    _nn._bias_act(view, b, act, out=view)
    np.testing.assert_allclose(view.ravel(), np.ravel(want), rtol=1e-13, atol=1e-14)
    assert (wide[:, shape[1]:] == 0).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cols", [1, 7, 384, 1000])
def test_layer_norm_with_residual(rng, dtype, cols):
    x = rng.standard_normal((33, cols)).astype(dtype) * 3 + 1
    r = rng.standard_normal((33, cols)).astype(dtype)
    w = rng.standard_normal(cols).astype(dtype)
    b = rng.standard_normal(cols).astype(dtype)
    s = (x + r).astype(np.float64)
    ref = (s - s.mean(-1, keepdims=True)) / np.sqrt(s.var(-1, keepdims=True) + 1e-5) * w + b
    tol = 1e-5 if dtype == np.float32 else 1e-12
    out = _nn.layer_norm(x, w, b, 1e-5, residual=r)
    assert out.dtype == dtype
    np.testing.assert_allclose(out, ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(_nn.layer_norm(x, None, None, 1e-5),
                               _nn.layer_norm(x, np.ones(cols), np.zeros(cols), 1e-5), rtol=0,
                               atol=0)
    t = torch.nn.functional.layer_norm(torch.from_numpy(x + r), (cols,), torch.from_numpy(w),
                                       torch.from_numpy(b), 1e-5).numpy()
    np.testing.assert_allclose(out, t, rtol=tol, atol=tol)


def test_add_norm_pre_norm_form(rng):
    x, y = rng.standard_normal((2, 9, 16))
    yb, w, b = rng.standard_normal((3, 16))
    s_out, n_out = np.empty_like(x), np.empty_like(x)
    _nn._add_norm(x, y, yb, w, b, 1e-6, sum_out=s_out, out=n_out)
    np.testing.assert_array_equal(s_out, x + (y + yb))
    s = s_out
    ref = (s - s.mean(-1, keepdims=True)) / np.sqrt(s.var(-1, keepdims=True) + 1e-6) * w + b
    np.testing.assert_allclose(n_out, ref, rtol=1e-12, atol=1e-12)


def test_kernel_errors():
    x = np.ones((2, 3), np.float32)
    with pytest.raises(TypeError, match="x"):
        _core.bias_act(x.astype(np.int32), None, 0, x)
    with pytest.raises(TypeError, match="bias"):
        _core.bias_act(x, np.ones(3), 0, x)
    with pytest.raises(ValueError, match="bias"):
        _core.bias_act(x, np.ones(4, np.float32), 0, x)
    with pytest.raises(ValueError, match="out"):
        _core.bias_act(x, None, 0, np.ones((3, 2), np.float32))
    with pytest.raises(ValueError, match="activation"):
        _core.bias_act(x, None, 9, x)
    with pytest.raises(ValueError, match="contiguous"):
        _core.bias_act(np.ones((3, 2), np.float32).T, None, 0, x)
    with pytest.raises(ValueError, match="eps"):
        _core.add_norm(x, None, None, None, None, -1.0, None, x)
    with pytest.raises(ValueError, match="num_threads"):
        _core.bias_act(x, None, 0, x, num_threads=0)
    # the same num_threads rule as attention (one parser): bools refused, 1..4096
    with pytest.raises(TypeError, match="num_threads"):
        _core.bias_act(x, None, 0, x, num_threads=True)
    for bad in (-1, 4097, 2**40):
        with pytest.raises(ValueError, match="num_threads: expected None"):
            _core.add_norm(x, None, None, None, None, 1e-5, None, x, num_threads=bad)
    with pytest.raises(ValueError, match="read-only"):
        ro = np.ones((2, 3), np.float32)
        ro.flags.writeable = False
        _core.bias_act(x, None, 0, ro)
    with pytest.raises(ValueError, match="approximate"):
        _nn.gelu(x, approximate="fast")


# ------------------------------------------------------------------------------------------
# Packing


def _scattered_mask(rng, b, length):
    m = rng.random((b, length)) < 0.7
    m[0] = True
    m[-1, :] = False  # a sequence without any real token
    m[1, 0] = False  # a leading pad
    return m


def test_packing_roundtrip(rng):
    m = _scattered_mask(rng, 4, 9)
    x = rng.standard_normal((4, 9, 3))
    p = Packing(m)
    assert p.num_tokens == m.sum()
    np.testing.assert_array_equal(p.lengths, m.sum(1))
    y = p.pack(x)
    np.testing.assert_array_equal(y, x[m])
    back = p.unpack(y)
    np.testing.assert_array_equal(back[m], x[m])
    np.testing.assert_array_equal(back[~m], 0)
    with pytest.raises(ValueError, match="x"):
        p.pack(x[:2])
    with pytest.raises(TypeError, match="key_padding_mask"):
        Packing(m.astype(np.int8))


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "relu", "gelu_tanh"])
def test_packed_encoder_equals_per_sequence(rng, norm_first, activation):
    """The packed path equals running each sequence alone on its real tokens."""
    layer = mha_ext.TransformerEncoderLayer(
        16, 4, 40, activation=activation, norm_first=norm_first, seed=3
    )
    m = _scattered_mask(rng, 5, 11)
    x = rng.standard_normal((5, 11, 16)).astype(np.float32)
    for causal in (False, True):
        out = layer(x, key_padding_mask=m, causal=causal)
        np.testing.assert_array_equal(out[~m], 0)
        for b in range(5):
            if m[b].any():
                alone = layer(x[b, m[b]], causal=causal)
                np.testing.assert_allclose(out[b, m[b]], alone, rtol=2e-6, atol=2e-6)


def test_packed_decoder_matches_torch(rng):
    nn = torch.nn
    d, h, f, b, lt, ls = 16, 4, 24, 3, 6, 9
    for norm_first in (False, True):
        mod = nn.TransformerDecoderLayer(d, h, f, dropout=0.0, norm_first=norm_first,
                                         batch_first=True, dtype=torch.float64).eval()
        ours = mha_ext.TransformerDecoderLayer(d, h, f, norm_first=norm_first,
                                               dtype=np.float64).load_torch(mod)
        tgt, mem = rng.standard_normal((b, lt, d)), rng.standard_normal((b, ls, d))
        tp = np.ones((b, lt), bool)
        tp[1, 4:] = False
        mp = np.ones((b, ls), bool)
        mp[0, 5:] = False
        mp[2, :2] = False
        causal = torch.triu(torch.ones(lt, lt, dtype=torch.bool), 1)
        with torch.no_grad():
            ref = mod(torch.from_numpy(tgt), torch.from_numpy(mem), tgt_mask=causal,
                      tgt_is_causal=True, tgt_key_padding_mask=torch.from_numpy(~tp),
                      memory_key_padding_mask=torch.from_numpy(~mp)).numpy()
        out = ours(tgt, mem, tgt_causal=True, tgt_key_padding_mask=tp,
                   memory_key_padding_mask=mp)
        np.testing.assert_array_equal(out[~tp], 0)
        np.testing.assert_allclose(out[tp], ref[tp], rtol=1e-10, atol=1e-10)
        only_mem = ours(tgt, mem, memory_key_padding_mask=mp)
        with torch.no_grad():
            ref2 = mod(torch.from_numpy(tgt), torch.from_numpy(mem),
                       memory_key_padding_mask=torch.from_numpy(~mp)).numpy()
        np.testing.assert_allclose(only_mem, ref2, rtol=1e-10, atol=1e-10)


def test_encoder_stack_packs_once(rng):
    layers = [mha_ext.TransformerEncoderLayer(16, 2, 32, activation="gelu", seed=i)
              for i in range(3)]
    m = _scattered_mask(rng, 4, 10)
    x = rng.standard_normal((4, 10, 16)).astype(np.float32)
    y = x
    for layer in layers:
        y = layer(y, key_padding_mask=m)
    np.testing.assert_allclose(encoder_stack(layers, x, key_padding_mask=m), y, rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_allclose(encoder_stack(layers, x[0]), layers[2](layers[1](layers[0](x[0]))),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="layers"):
        encoder_stack([layers[0], "x"], x)
    with pytest.raises(ValueError, match="packed shape"):
        layers[0].forward_packed(x[0], Packing(m))


# ------------------------------------------------------------------------------------------
# Allocations per call


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_allocation_budget(rng, norm_first):
    """After a warm-up call, one packed layer call allocates at most the output and the packing
    copies: the q/k/v projections, the attention output, the FFN hidden layer (4x wider) and
    the norms live in reused scratch buffers. Peak new memory is measured with tracemalloc
    (NumPy reports its data buffers to it)."""
    d, f, b, length = 64, 256, 4, 50
    layer = mha_ext.TransformerEncoderLayer(d, 4, f, activation="gelu", norm_first=norm_first,
                                            seed=0)
    m = np.ones((b, length), bool)
    m[:, 40:] = False
    x = rng.standard_normal((b, length, d)).astype(np.float32)
    layer(x, key_padding_mask=m)  # warm-up: scratch buffers are allocated here
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        out = layer(x, key_padding_mask=m)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    act = x.nbytes  # one (B, L, d) float32 activation
    # output (B, L, d) + packed input and packed output (N, d) each < act, + small arrays.
    assert peak <= 3 * act + 64 * 1024, (peak, act)
    # Without reuse the FFN hidden layer alone would be 4 * act.
    assert out.shape == x.shape
