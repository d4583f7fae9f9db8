"""Arrays from other libraries: the one rule of mha_ext.attention (see _attention.py).

NumPy arrays as they are; objects with ``__dlpack__`` on the CPU shared without a copy; objects
with ``__array__`` through ``np.asarray``; q, k, v as lists or scalars refused; masked arrays
refused everywhere; a tensor that requires grad refused with the fix in the message.
"""

from __future__ import annotations

import numpy as np
import pytest

import mha_ext
from reference import attention_ref

B, H, L, D = 2, 3, 9, 8


@pytest.fixture
def qkv(rng):
    return tuple(rng.standard_normal((B, H, L, D), dtype=np.float32) for _ in range(3))


def _close(out, q, k, v, **kw):
    np.testing.assert_allclose(out, attention_ref(q, k, v, **kw)[0], rtol=1e-5, atol=1e-5)


class DLPackOnly:
    """A JAX-free stand-in for a foreign CPU tensor: only the DLPack protocol, counted."""

    def __init__(self, a, device=(1, 0)):
        self.a, self.device, self.calls = a, device, 0

    def __dlpack__(self, **kwargs):
        self.calls += 1
        return self.a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.device


class ArrayOnly:
    """An object that only implements ``__array__``."""

    def __init__(self, a):
        self.a = a

    def __array__(self, dtype=None, copy=None):
        return self.a if dtype is None else self.a.astype(dtype)


# --- the protocols ------------------------------------------------------------------------


def test_dlpack_object_is_shared_without_copy(qkv):
    q, k, v = qkv
    wrapped = [DLPackOnly(x) for x in qkv]
    out = mha_ext.attention(*wrapped)
    assert type(out) is np.ndarray
    assert all(w.calls == 1 for w in wrapped)
    _close(out, q, k, v)
    # np.from_dlpack of a NumPy-backed capsule is a view of the same memory
    assert np.shares_memory(np.from_dlpack(wrapped[0]), q)


def test_dlpack_gpu_memory_is_refused(qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match=r"^k: .*device memory.*DLPack device type 2"):
        mha_ext.attention(q, DLPackOnly(k, device=(2, 0)), v)


def test_array_protocol_object(qkv):
    q, k, v = qkv
    out = mha_ext.attention(ArrayOnly(q), ArrayOnly(k), ArrayOnly(v), mask=ArrayOnly(
        np.ones((L, L), bool)))
    _close(out, q, k, v)


def test_ndarray_subclass_is_viewed(qkv):
    q, k, v = qkv

    class Sub(np.ndarray):
        pass

    out = mha_ext.attention(q.view(Sub), k, v)
    assert type(out) is np.ndarray
    _close(out, q, k, v)


@pytest.mark.parametrize("name", ["q", "k", "v"])
@pytest.mark.parametrize(
    "make", [lambda a: a.tolist(), lambda a: tuple(a.tolist()), lambda a: 1.0],
    ids=["list", "tuple", "scalar"],
)
def test_qkv_sequences_and_scalars_are_refused(qkv, name, make):
    args = dict(zip("qkv", qkv))
    args[name] = make(args[name])
    with pytest.raises(TypeError, match=rf"^{name}: expected a NumPy array .*np\.asarray\({name}"):
        mha_ext.attention(args["q"], args["k"], args["v"])


def test_qkv_other_objects_are_refused(qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match=r"^v: expected a NumPy array .*got object"):
        mha_ext.attention(q, k, object())


def test_role_typed_arguments_take_sequences(qkv):
    q, k, v = qkv
    lengths = [L, 4]
    mask = np.tril(np.ones((L, L), bool))
    out = mha_ext.attention(q, k, v, key_lengths=lengths, mask=mask.tolist(),
                            bias=np.zeros((L, L)).tolist())
    _close(out, q, k, v, key_lengths=np.array(lengths), mask=mask)


@pytest.mark.parametrize("name", ["q", "k", "v", "mask", "bias", "key_lengths", "out"])
def test_masked_arrays_are_refused(qkv, name):
    q, k, v = qkv
    args = {"q": q, "k": k, "v": v}
    good = {
        "mask": np.ones((L, L), bool),
        "bias": np.zeros((L, L), np.float32),
        "key_lengths": np.array([L, L]),
        "out": np.empty_like(q),
    }
    value = args.get(name, good.get(name))
    args[name] = np.ma.masked_array(value, mask=np.zeros(np.shape(value), bool))
    with pytest.raises(TypeError, match=rf"^{name}: .*MaskedArray"):
        mha_ext.attention(**args)


def test_score_weights_follow_the_rule(rng):
    W = rng.standard_normal((D, D))
    assert isinstance(mha_ext.General(DLPackOnly(W)).W, np.ndarray)
    assert isinstance(mha_ext.General(W.tolist()).W, np.ndarray)
    with pytest.raises(TypeError, match=r"^General\.W: .*MaskedArray"):
        mha_ext.General(np.ma.masked_array(W))


# --- real torch tensors -------------------------------------------------------------------


@pytest.fixture
def torch():
    return pytest.importorskip("torch", reason="the PyTorch interop cases need torch")


def test_torch_cpu_tensors(torch, qkv):
    q, k, v = qkv
    tq, tk, tv = (torch.from_numpy(x) for x in qkv)
    out = mha_ext.attention(tq, tk, tv, causal=True)
    assert type(out) is np.ndarray and out.dtype == np.float32
    _close(out, q, k, v, causal=True)
    # non-contiguous tensors (a transposed view) are read through their strides
    tkt = torch.from_numpy(np.ascontiguousarray(k.swapaxes(1, 2))).transpose(1, 2)
    _close(mha_ext.attention(tq, tkt, tv), q, k, v)
    # torch bool masks and int lengths too (True = may attend, as SDPA)
    m = torch.from_numpy(np.tril(np.ones((L, L), bool)))
    _close(mha_ext.attention(tq, tk, tv, mask=m, key_lengths=torch.tensor([L, 5])), q, k, v,
           mask=m.numpy(), key_lengths=np.array([L, 5]))


def test_torch_float16(torch, qkv):
    h = [x.astype(np.float16) for x in qkv]
    out = mha_ext.attention(*(torch.from_numpy(x) for x in h))
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, mha_ext.attention(*h))


@pytest.mark.parametrize("name", ["q", "k", "v", "bias"])
def test_torch_requires_grad_says_detach(torch, qkv, name):
    args = {n: torch.from_numpy(x) for n, x in zip("qkv", qkv)}
    args["bias"] = torch.zeros(L, L)
    args[name] = args[name].clone().requires_grad_(True)
    with pytest.raises(TypeError, match=rf"^{name}: .*requires grad.*{name}\.detach\(\)"):
        mha_ext.attention(**args)


def test_torch_bfloat16_names_q(torch, qkv):
    bf = [torch.from_numpy(x).to(torch.bfloat16) for x in qkv]
    with pytest.raises(TypeError, match=r"^q: .*bfloat16.*view\(torch\.int16\)"):
        mha_ext.attention(*bf)


def test_torch_bfloat16_fix_from_the_message(torch, qkv):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf = [torch.from_numpy(x).to(torch.bfloat16) for x in qkv]
    views = [t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) for t in bf]
    assert np.shares_memory(views[0], bf[0].view(torch.int16).numpy())
    out = mha_ext.attention(*views)
    ref = attention_ref(*(t.float().numpy() for t in bf))[0]
    np.testing.assert_allclose(out.astype(np.float32), ref, rtol=2e-2, atol=2e-2)


def test_torch_score_weights(torch, rng, qkv):
    q, k, v = qkv
    W = rng.standard_normal((D, D)).astype(np.float32)
    out = mha_ext.attention(q, k, v, score=mha_ext.General(torch.from_numpy(W)))
    np.testing.assert_array_equal(out, mha_ext.attention(q, k, v, score=mha_ext.General(W)))
    with pytest.raises(TypeError, match=r"^General\.W: .*requires grad"):
        mha_ext.General(torch.from_numpy(W).requires_grad_(True))
