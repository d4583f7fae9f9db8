"""mha_ext.torch (SPEC 6.5): the custom op, its autograd, fake impl and torch.compile."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
mt = pytest.importorskip("mha_ext.torch")


def _qkv(*shape_kv, dtype=torch.float64, hq=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, H, L, D = shape_kv
    q = torch.randn(B, hq or H, L, D, dtype=dtype, generator=g)
    k = torch.randn(B, H, L + 1, D, dtype=dtype, generator=g)
    v = torch.randn(B, H, L + 1, D, dtype=dtype, generator=g)
    return (x.requires_grad_() for x in (q, k, v))


def test_import_mha_ext_does_not_import_torch():
    code = "import sys, mha_ext; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "kw",
    [{}, {"causal": True}, {"causal": "top_left", "window": (2, 1)}, {"layout": "blhd"}],
    ids=["plain", "causal", "top_left_window", "blhd"],
)
def test_gradcheck_float64(kw):
    q, k, v = _qkv(1, 2, 5, 4, hq=4)
    if kw.get("layout") == "blhd":
        q, k, v = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: mt.attention(q, k, v, **kw), (q, k, v))


def test_gradcheck_bias_mask_general():
    q, k, v = _qkv(2, 1, 4, 3)
    g = torch.Generator().manual_seed(1)
    bias = torch.randn(1, 4, 5, dtype=torch.float64, generator=g).requires_grad_()
    W = torch.randn(3, 3, dtype=torch.float64, generator=g).requires_grad_()
    mask = torch.rand(2, 1, 4, 5, generator=g) < 0.8
    mask[..., 0] = True

    def f(q, k, v, bias, W):
        return mt.attention(q, k, v, bias=bias, mask=mask, score=mt.General(W), causal=True)

    assert torch.autograd.gradcheck(f, (q, k, v, bias, W))


@pytest.mark.parametrize("causal", [False, True, "top_left"])
def test_gradcheck_alibi_softcap(causal):
    q, k, v = _qkv(2, 2, 5, 4, hq=4)
    g = torch.Generator().manual_seed(2)
    slopes = torch.rand(2, 4, dtype=torch.float64, generator=g).requires_grad_()
    bias = torch.randn(4, 5, 6, dtype=torch.float64, generator=g).requires_grad_()

    def f(q, k, v, bias):
        return mt.attention(q, k, v, bias=bias, causal=causal, alibi_slopes=slopes,
                            softcap=0.9, key_lengths=torch.tensor([6, 4]))

    assert torch.autograd.gradcheck(f, (q, k, v, bias))
    # The slopes are constants: no gradient reaches them.
    mt.attention(q, k, v, alibi_slopes=slopes, softcap=0.9).sum().backward()
    assert slopes.grad is None


def test_alibi_softcap_match_the_explicit_math():
    q, k, v = _qkv(1, 2, 7, 8, dtype=torch.float32)
    slopes = torch.tensor([0.3, 0.1])
    out = mt.attention(q, k, v, causal=True, alibi_slopes=slopes, softcap=1.5)
    out.sum().backward()
    got = [x.grad.clone() for x in (q, k, v)]
    q2, k2, v2 = (x.detach().double().requires_grad_() for x in (q, k, v))
    s = q2 @ k2.transpose(-1, -2) / np.sqrt(8)
    s = 1.5 * torch.tanh(s / 1.5)
    i = torch.arange(7)[:, None] + 1  # bottom-right: the diagonal is i + Lk - Lq
    j = torch.arange(8)[None, :]
    s = s - slopes.double()[None, :, None, None] * (i - j).abs()
    s = s.masked_fill(j > i, -torch.inf)
    ref = torch.softmax(s, -1) @ v2
    ref.sum().backward()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(got, (q2.grad, k2.grad, v2.grad)):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


def test_opcheck():
    q, k, v = _qkv(1, 2, 6, 8, dtype=torch.float32)
    args = (q, k, v, None, None, "bottom_right", -1, -1, None, None, "scaled_dot", None,
            None, None, "bhld", None)
    torch.library.opcheck(torch.ops.mha_ext.attention.default, args)
    slopes = torch.tensor([0.25, 0.5])
    args = (q, k, v, None, None, "bottom_right", -1, -1, None, None, "scaled_dot", None,
            slopes, 2.0, "bhld", None)
    torch.library.opcheck(torch.ops.mha_ext.attention.default, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_sdpa_forward_and_grads(dtype):
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in _qkv(2, 4, 33, 16))
    out = mt.attention(q, k, v, causal=True)
    dout = torch.randn_like(out)
    out.backward(dout)
    ours = (out.detach(), q.grad, k.grad, v.grad)
    q2, k2, v2 = (x.detach().double().requires_grad_() for x in (q, k, v))
    mask = torch.ones(33, 34, dtype=torch.bool).tril(1)  # bottom-right: Lk - Lq = 1
    ref = torch.nn.functional.scaled_dot_product_attention(q2, k2, v2, attn_mask=mask)
    ref.backward(dout.double())
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for a, b in zip(ours, (ref.detach(), q2.grad, k2.grad, v2.grad)):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)


def test_last_axis_contiguous_tensors_are_not_copied():
    x = torch.randn(2, 16, 3, 8)  # (B, L, H, D) seen as bhld through a transpose
    view = x.transpose(1, 2)
    assert not view.is_contiguous()
    a = mt._np(view)
    assert a.__array_interface__["data"][0] == x.data_ptr()
    b = mt._np(torch.randn(4, 8, dtype=torch.bfloat16))
    assert b.dtype.name == "bfloat16"


# inductor itself touches torch.jit.script_method, deprecated in torch 2.13. Inductor compiles
# C++ with g++ (about 75 s on a loaded 2-core machine): that variant runs with --runslow; the
# default run traces the same graph (dynamo + AOTAutograd through the fake impls, fullgraph)
# with the aot_eager backend.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize(
    "backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)]
)
def test_trains_in_a_module_under_torch_compile(backend):
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(16, 3 * 16)

        def forward(self, x):
            q, k, v = self.proj(x).view(x.shape[0], x.shape[1], 3, 2, 8).unbind(2)
            o = mt.attention(q, k, v, causal=True, layout="blhd")
            return o.reshape(x.shape).sum(-1)

    torch.manual_seed(0)
    block = Block()
    x = torch.randn(2, 10, 16)
    eager = block(x)
    eager.sum().backward()
    g_eager = block.proj.weight.grad.clone()
    block.zero_grad()
    compiled = torch.compile(block, fullgraph=True, backend=backend)
    got = compiled(x)
    got.sum().backward()
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(block.proj.weight.grad, g_eager, rtol=1e-5, atol=1e-5)


def test_bad_inputs():
    q, k, v = _qkv(1, 1, 4, 4)
    with pytest.raises(TypeError, match="q: expected a torch.Tensor"):
        mt.attention(np.zeros((4, 4)), k, v)
    with pytest.raises(ValueError, match="causal"):
        mt.attention(q, k, v, causal="diagonal")
    with pytest.raises(ValueError, match="score"):
        mt.attention(q, k, v, score="additive")
    with pytest.raises(ValueError, match="alibi_slopes"):
        mt.attention(q, k, v, alibi_slopes=torch.ones(3))
    with pytest.raises(ValueError, match="softcap"):
        mt.attention(q, k, v, softcap=0.0)
    with pytest.raises(TypeError, match="softcap"):
        mt.attention(q, k, v, softcap="1")
