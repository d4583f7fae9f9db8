"""S2Attention (S2-MLPv2 block): float64 NumPy reference, PyTorch oracle, the tutorial's bugs."""

from __future__ import annotations

import math

import mha_ext
import numpy as np
import pytest
from mha_ext import _core

# (B, C, H, W): H or W = 1, C = 4, 6, 64, C not a multiple of 4, C < 4.
SHAPES = [
    (2, 4, 5, 3),
    (1, 6, 1, 7),
    (3, 10, 4, 1),
    (2, 64, 6, 5),
    (1, 13, 3, 4),
    (1, 1, 3, 3),
    (2, 2, 2, 3),
    (1, 3, 4, 2),
    (2, 8, 1, 1),
]


# ------------------------------------------------------------------------------------------
# Float64 NumPy reference, written the obvious way: copy each branch, then assign every
# quarter from the *unshifted* branch (out of place). Axis 1 of (B, H, W, C) is the row i.


def _quarters(c):
    return [(0, c // 4), (c // 4, c // 2), (c // 2, 3 * c // 4), (3 * c // 4, c)]


def _shift_rows(dst, src, lo, hi, step):
    """dst[:, i] = src[:, i - step] where that row exists (step = +1: from the row above)."""
    if step == 1:
        dst[:, 1:, :, lo:hi] = src[:, :-1, :, lo:hi]
    else:
        dst[:, :-1, :, lo:hi] = src[:, 1:, :, lo:hi]


def _shift_cols(dst, src, lo, hi, step):
    if step == 1:
        dst[:, :, 1:, lo:hi] = src[:, :, :-1, lo:hi]
    else:
        dst[:, :, :-1, lo:hi] = src[:, :, 1:, lo:hi]


def shift1_ref(x):
    out = x.copy()
    (a, b), (c, d), (e, f), (g, h) = _quarters(x.shape[-1])
    _shift_rows(out, x, a, b, +1)
    _shift_rows(out, x, c, d, -1)
    _shift_cols(out, x, e, f, +1)
    _shift_cols(out, x, g, h, -1)
    return out


def shift2_ref(x):
    out = x.copy()
    (a, b), (c, d), (e, f), (g, h) = _quarters(x.shape[-1])
    _shift_cols(out, x, a, b, +1)
    _shift_cols(out, x, c, d, -1)
    _shift_rows(out, x, e, f, +1)
    _shift_rows(out, x, g, h, -1)
    return out


_erf = np.vectorize(math.erf, otypes=[np.float64])


def gelu_ref(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def branches_ref(y):
    """The three branches after the shifts, (B, 3, H, W, C), from y (B, H, W, 3C)."""
    c = y.shape[-1] // 3
    return np.stack([shift1_ref(y[..., :c]), shift2_ref(y[..., c : 2 * c]), y[..., 2 * c :]], 1)


def s2_ref(layer, x):
    f = {n: np.asarray(getattr(layer, n), np.float64) for n in ("w1", "b1", "w_sa1", "w_sa2")}
    w2, b2 = np.asarray(layer.w2, np.float64), np.asarray(layer.b2, np.float64)
    xcl = np.asarray(x, np.float64).transpose(0, 2, 3, 1)  # (B, H, W, C)
    bsz, c = xcl.shape[0], xcl.shape[-1]
    y = xcl @ f["w1"] + f["b1"]
    s = branches_ref(y)  # (B, 3, H, W, C)
    a = s.sum(axis=(1, 2, 3))  # (B, C)
    hat = (gelu_ref(a @ f["w_sa1"]) @ f["w_sa2"]).reshape(bsz, 3, c)
    e = np.exp(hat - hat.max(axis=1, keepdims=True))
    bar = e / e.sum(axis=1, keepdims=True)  # (B, 3, C)
    z = (bar[:, :, None, None, :] * s).sum(axis=1)
    return (z @ w2 + b2).transpose(0, 3, 1, 2)


# ------------------------------------------------------------------------------------------
# Against the NumPy reference


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_reference(rng, shape, dtype):
    layer = mha_ext.S2Attention(shape[1], dtype=dtype, seed=rng)
    x = rng.standard_normal(shape).astype(dtype)
    out = layer(x)
    assert out.shape == shape
    assert out.dtype == dtype
    assert out.flags.c_contiguous
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out, s2_ref(layer, x), rtol=tol, atol=tol)


def test_larger_image_float32(rng):
    layer = mha_ext.S2Attention(32, seed=rng)
    x = rng.standard_normal((2, 32, 24, 20)).astype(np.float32)
    np.testing.assert_allclose(layer(x), s2_ref(layer, x), rtol=1e-5, atol=1e-5)


def test_strided_input(rng):
    layer = mha_ext.S2Attention(6, dtype=np.float64, seed=rng)
    base = rng.standard_normal((2, 6, 10, 14))
    x = base[:, ::-1, ::2, 1::3]  # reversed channels, strided rows and columns
    np.testing.assert_allclose(layer(x), s2_ref(layer, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("c", [1, 2, 3, 6, 10, 64])
@pytest.mark.parametrize("hw", [(1, 1), (1, 5), (4, 1), (3, 6)])
def test_native_shifts_exact(rng, c, hw):
    """One-hot branch weights (logits 0 / -inf) return one shifted branch, bit for bit."""
    h, w = hw
    y = rng.standard_normal((2, h, w, 3 * c))
    want = branches_ref(y)
    for k in range(3):
        logits = np.full((2, 3 * c), -np.inf)
        logits[:, k * c : (k + 1) * c] = 0.0
        np.testing.assert_array_equal(_core.s2_attention(y, logits), want[:, k])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_native_sums_and_combine(rng, dtype):
    c = 10
    base = rng.standard_normal((3, 9, 7, 3 * c + 2)).astype(dtype)
    y = base[:, ::2, :, 1 : 3 * c + 1]  # strided (B, H, W) axes, offset channels
    s = branches_ref(y.astype(np.float64))
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(_core.s2_attention(y), s.sum(axis=(1, 2, 3)), rtol=tol, atol=tol)
    logits = rng.standard_normal((3, 3 * c)).astype(dtype)
    e = np.exp(logits.astype(np.float64).reshape(3, 3, c))
    bar = e / e.sum(axis=1, keepdims=True)
    want = (bar[:, :, None, None, :] * s).sum(axis=1)
    np.testing.assert_allclose(_core.s2_attention(y, logits), want, rtol=tol, atol=tol)


def test_thread_count_does_not_change_result(rng):
    y = rng.standard_normal((2, 16, 16, 3 * 64)).astype(np.float32)
    logits = rng.standard_normal((2, 3 * 64)).astype(np.float32)
    np.testing.assert_array_equal(_core.s2_attention(y, num_threads=1), _core.s2_attention(y))
    np.testing.assert_array_equal(
        _core.s2_attention(y, logits, num_threads=1), _core.s2_attention(y, logits)
    )


def test_input_not_modified(rng):
    layer = mha_ext.S2Attention(8, seed=rng)
    x = rng.standard_normal((2, 8, 5, 6)).astype(np.float32)
    keep = x.copy()
    out = layer(x)
    np.testing.assert_array_equal(x, keep)
    x.flags.writeable = False  # a read-only input is fine: nothing writes it
    np.testing.assert_array_equal(layer(x), out)
    y = rng.standard_normal((2, 5, 6, 24)).astype(np.float32)
    y.flags.writeable = False
    keep = y.copy()
    _core.s2_attention(y)
    _core.s2_attention(y, np.zeros((2, 24), np.float32))
    np.testing.assert_array_equal(y, keep)


def test_empty_sizes(rng):
    layer = mha_ext.S2Attention(4, seed=rng)
    assert layer(np.zeros((0, 4, 3, 3), np.float32)).shape == (0, 4, 3, 3)
    assert layer(np.zeros((2, 4, 0, 3), np.float32)).shape == (2, 4, 0, 3)
    np.testing.assert_array_equal(_core.s2_attention(np.ones((2, 0, 3, 12))), np.zeros((2, 4)))


def test_split_attention_width_follows_channels():
    layer = mha_ext.S2Attention(24, seed=0)
    assert layer.w_sa1.shape == (24, 24)
    assert layer.w_sa2.shape == (24, 72)
    assert mha_ext.S2Attention(24, seed=0)(np.ones((1, 24, 2, 2))).shape == (1, 24, 2, 2)


def test_integer_input_is_converted(rng):
    layer = mha_ext.S2Attention(4, dtype=np.float64, seed=rng)
    x = rng.integers(-3, 4, size=(1, 4, 3, 3))
    np.testing.assert_allclose(layer(x), s2_ref(layer, x), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------
# Errors


def test_errors():
    layer = mha_ext.S2Attention(4)
    with pytest.raises(ValueError, match=r"x: expected 4 dimensions"):
        layer(np.zeros((4, 3, 3), np.float32))
    with pytest.raises(ValueError, match=r"x: expected C = channels = 4"):
        layer(np.zeros((1, 5, 3, 3), np.float32))
    with pytest.raises(ValueError, match=r"x: expected C = channels = 4"):
        layer(np.zeros((1, 3, 3, 4), np.float32))  # channels last is not accepted
    for bad in (np.zeros((1, 4, 2, 2), bool), np.zeros((1, 4, 2, 2), complex)):
        with pytest.raises(TypeError, match=r"x: expected a real numeric array"):
            layer(bad)
    with pytest.raises(ValueError, match=r"channels: expected a positive int"):
        mha_ext.S2Attention(0)
    with pytest.raises(TypeError, match=r"channels"):
        mha_ext.S2Attention(4.0)
    with pytest.raises(TypeError, match=r"dtype"):
        mha_ext.S2Attention(4, dtype=np.int32)
    layer.w_sa2 = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match=r"w_sa2: expected shape \(4, 12\)"):
        layer(np.zeros((1, 4, 2, 2), np.float32))


def test_native_errors():
    y = np.zeros((1, 2, 2, 6), np.float32)
    with pytest.raises(TypeError, match=r"x: expected a float32 or float64 array"):
        _core.s2_attention(np.zeros((1, 2, 2, 6), np.int32))
    with pytest.raises(TypeError, match=r"x: expected a float32 or float64 array"):
        _core.s2_attention(np.zeros((1, 2, 2, 6), np.float16))
    with pytest.raises(ValueError, match=r"x: expected 4 dimensions"):
        _core.s2_attention(np.zeros((2, 2, 6), np.float32))
    with pytest.raises(ValueError, match=r"x: the last axis must hold 3\*C"):
        _core.s2_attention(np.zeros((1, 2, 2, 7), np.float32))
    with pytest.raises(ValueError, match=r"x: the last axis must hold 3\*C"):
        _core.s2_attention(np.zeros((1, 2, 2, 0), np.float32))
    with pytest.raises(ValueError, match=r"logits: expected shape \(B, 3\*C\) = \(1, 6\)"):
        _core.s2_attention(y, np.zeros((1, 2), np.float32))
    with pytest.raises(TypeError, match=r"logits: expected dtype float32"):
        _core.s2_attention(y, np.zeros((1, 6), np.float64))
    with pytest.raises(ValueError, match=r"num_threads"):
        _core.s2_attention(y, num_threads=0)


# ------------------------------------------------------------------------------------------
# PyTorch: the reference module layout with a correct (out-of-place) shift, and the tutorial's
# in-place shift, whose overlapping slice copies read rows that were already shifted.

# (di, dj) per quarter: shifted[i, j] = x[i - di, j - dj], clamped into the image.
_TABLE1 = [(1, 0), (-1, 0), (0, 1), (0, -1)]
_TABLE2 = [(0, 1), (0, -1), (1, 0), (-1, 0)]


def _torch_modules():
    torch = pytest.importorskip("torch")
    nn = torch.nn

    def shift(t, table):
        # Gather with clamped indices into a new tensor: t is only read.
        _, h, w, c = t.shape
        parts = []
        for (lo, hi), (di, dj) in zip(_quarters(c), table):
            rows = torch.clamp(torch.arange(h) - di, 0, h - 1)
            cols = torch.clamp(torch.arange(w) - dj, 0, w - 1)
            parts.append(t[:, rows][:, :, cols][..., lo:hi])
        return torch.cat(parts, dim=-1)

    class SplitAttention(nn.Module):
        def __init__(self, channels, k=3):
            super().__init__()
            self.k = k
            self.mlp1 = nn.Linear(channels, channels, bias=False)
            self.gelu = nn.GELU()
            self.mlp2 = nn.Linear(channels, channels * k, bias=False)

        def forward(self, branches):  # (B, K, H, W, C)
            b, k, _, _, c = branches.shape
            a = branches.sum(dim=(1, 2, 3))
            bar = torch.softmax(self.mlp2(self.gelu(self.mlp1(a))).reshape(b, k, c), dim=1)
            return (bar[:, :, None, None, :] * branches).sum(dim=1)

    class TorchS2(nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.mlp1 = nn.Linear(channels, 3 * channels)
            self.mlp2 = nn.Linear(channels, channels)
            self.split_attention = SplitAttention(channels)

        def forward(self, x):
            c = x.shape[1]
            y = self.mlp1(x.permute(0, 2, 3, 1))
            s = torch.stack(
                [shift(y[..., :c], _TABLE1), shift(y[..., c : 2 * c], _TABLE2), y[..., 2 * c :]],
                dim=1,
            )
            return self.mlp2(self.split_attention(s)).permute(0, 3, 1, 2)

    return torch, TorchS2


@pytest.mark.parametrize("shape", [(2, 4, 5, 3), (1, 10, 1, 6), (2, 16, 7, 8)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_torch(rng, shape, dtype):
    torch, TorchS2 = _torch_modules()
    torch.manual_seed(int(rng.integers(2**31)))
    tdt = torch.float32 if dtype == np.float32 else torch.float64
    module = TorchS2(shape[1]).to(tdt).eval()
    layer = mha_ext.S2Attention(shape[1], dtype=dtype).load_torch(module.state_dict())
    x = rng.standard_normal(shape).astype(dtype)
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(layer(x), want, rtol=tol, atol=tol)
    np.testing.assert_allclose(layer(x), s2_ref(layer, x), rtol=tol, atol=tol)


def _tutorial_inplace_shift1(t):
    """The tutorial's shift1: slice assignments inside one tensor (a view of the projection)."""
    _, h, w, c = t.shape
    t[:, 1:, :, : c // 4] = t[:, : h - 1, :, : c // 4]
    t[:, : h - 1, :, c // 4 : c // 2] = t[:, 1:, :, c // 4 : c // 2]
    t[:, :, 1:, c // 2 : 3 * c // 4] = t[:, :, : w - 1, c // 2 : 3 * c // 4]
    t[:, :, : w - 1, 3 * c // 4 :] = t[:, :, 1:, 3 * c // 4 :]
    return t


def test_inplace_tutorial_shift_is_wrong(rng):
    """Pins the aliasing bug: the in-place shift differs from the out-of-place one; we don't."""
    torch, _ = _torch_modules()
    c = 8
    y = rng.standard_normal((1, 6, 5, 3 * c))
    correct = branches_ref(y)[:, 0]
    one_hot = np.concatenate([np.zeros((1, c)), np.full((1, 2 * c), -np.inf)], axis=1)
    ours = _core.s2_attention(y, one_hot)
    np.testing.assert_array_equal(ours, correct)
    t = torch.from_numpy(y.copy())
    try:
        tutorial = _tutorial_inplace_shift1(t[..., :c]).numpy()
    except RuntimeError:  # a torch that detects the overlap refuses the tutorial code outright
        return
    # torch 2.x copies the overlapping slices in order, so a forward shift reads rows it has
    # already shifted (quarter 0 smears row 0 down the image).
    assert np.abs(tutorial - correct).max() > 0.1


def test_load_torch_errors():
    torch, TorchS2 = _torch_modules()
    sd = TorchS2(8).state_dict()
    layer = mha_ext.S2Attention(8)
    # The tutorial's fixed SplitAttention width (512) does not fit channels = 8.
    bad = dict(sd)
    bad["split_attention.mlp1.weight"] = torch.zeros(512, 512)
    with pytest.raises(ValueError, match=r"split_attention.mlp1.weight"):
        layer.load_torch(bad)
    missing = {k: v for k, v in sd.items() if k != "mlp2.bias"}
    with pytest.raises(ValueError, match=r"missing key 'mlp2.bias'"):
        layer.load_torch(missing)
    with pytest.raises(ValueError, match=r"unexpected keys"):
        layer.load_torch({**sd, "extra": torch.zeros(1)})
    with pytest.raises(TypeError, match=r"state_dict"):
        layer.load_torch([1, 2])
    assert layer.load_torch(TorchS2(8)) is layer  # the module itself is accepted
