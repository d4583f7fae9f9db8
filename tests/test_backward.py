"""mha_ext.attention_backward (SPEC 6.4) against PyTorch autograd and finite differences.

The reference is the explicit float64 math in torch (scores, bias, the visibility matrix of
tests/reference.py, a softmax whose empty rows are 0) differentiated by autograd; SDPA itself
is checked where it applies (no mask / causal). float32 must be well under 1e-5 relative to
the largest gradient; float16 / bfloat16 within 2x the error of the same math run by torch
at that precision.
"""

from __future__ import annotations

import ml_dtypes
import mha_ext
import numpy as np
import pytest
from reference import alibi_bias, from_bhld, to_bhld, visible_mask

torch = pytest.importorskip("torch")

LOW = (np.float16, ml_dtypes.bfloat16)


def _t(x, dtype=torch.float64):
    x = np.ascontiguousarray(x)
    if x.dtype == ml_dtypes.bfloat16:
        x = x.astype(np.float32)
    return torch.tensor(x, dtype=dtype)


def torch_grads(dout, q, k, v, *, mask=None, bias=None, causal=False, window=None,
                key_lengths=None, scale=None, score=None, layout="bhld", dtype=torch.float64,
                num_threads=None, alibi_slopes=None, softcap=None):
    """(out, dq, dk, dv, dscore, dbias) by autograd on the explicit math: dscore is dW
    (General), [dW_q, dW_k, dw] (Additive), [dW, dw] (Concat) or None. The scores are
    scaled, capped (softcap * tanh(s / softcap)), then ALiBi and the bias are added."""
    rank = np.ndim(q)
    q4, k4, v4, g4 = (to_bhld(np.asarray(x), layout) for x in (q, k, v, dout))
    B, Hq, Lq, D = q4.shape
    Hk, Lk = k4.shape[1], k4.shape[2]
    tq, tk, tv = (_t(x, dtype).requires_grad_() for x in (q4, k4, v4))
    group = Hq // Hk
    kk, vv = tk.repeat_interleave(group, 1), tv.repeat_interleave(group, 1)
    tw = tadd = None
    if isinstance(score, mha_ext.General):
        tw = _t(score.W, dtype).requires_grad_()
        s = torch.einsum("bhid,de,bhje->bhij", tq, tw, kk)
    elif isinstance(score, (mha_ext.Additive, mha_ext.Concat)):
        if isinstance(score, mha_ext.Additive):
            tadd = [_t(x, dtype).requires_grad_() for x in (score.W_q, score.W_k, score.w)]
            wq, wk, wv = tadd
        else:
            tadd = [_t(x, dtype).requires_grad_() for x in (score.W, score.w)]
            wq, wk, wv = tadd[0][:D], tadd[0][D:], tadd[1]
        qa, ka = tq @ wq, kk @ wk
        s = torch.tanh(qa[:, :, :, None, :] + ka[:, :, None, :, :]) @ wv
    else:
        s = tq @ kk.transpose(-1, -2)
    if scale is None:
        scale = 1 / np.sqrt(D) if score in (None, "scaled_dot") else 1.0
    s = s * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        s = s + torch.tensor(alibi_bias(alibi_slopes, B, Hq, Lq, Lk, causal=causal,
                                        key_lengths=key_lengths), dtype=dtype)
    tb = None
    if bias is not None:
        tb = _t(bias, dtype).requires_grad_()
        bb = tb.reshape((1,) * (4 - tb.ndim) + tuple(tb.shape)) if rank == 4 else tb
        if rank < 4:
            bb = tb.reshape((1,) * (4 - tb.ndim) + tuple(tb.shape))
        s = s + bb
    vis = torch.tensor(visible_mask(B, Hq, Lq, Lk, mask=mask, rank=rank, causal=causal,
                                    window=window, key_lengths=key_lengths))
    empty = ~vis.any(-1, keepdim=True)
    s = torch.where(vis, s, torch.tensor(-torch.inf, dtype=dtype))
    s = torch.where(empty, torch.zeros((), dtype=dtype), s)
    p = torch.softmax(s, -1)
    p = torch.where(empty | ~vis, torch.zeros((), dtype=dtype), p)
    out = p @ vv
    out.backward(_t(g4, dtype))
    def back(x):
        return from_bhld(x.grad.double().numpy(), rank, layout)
    return (from_bhld(out.detach().double().numpy(), rank, layout), back(tq), back(tk),
            back(tv),
            tw.grad.double().numpy() if tw is not None
            else None if tadd is None else [x.grad.double().numpy() for x in tadd],
            None if tb is None else tb.grad.double().numpy())


def inputs(rng, B, Hq, Hk, Lq, Lk, D, Dv, dtype=np.float32, layout="bhld", rank=4):
    def make(h, L, d):
        x = rng.standard_normal((B, h, L, d))
        x = from_bhld(x, rank, layout) if rank < 4 or layout != "bhld" else x
        return x.astype(dtype)
    return make(Hq, Lq, D), make(Hk, Lk, D), make(Hk, Lk, Dv)


def run_both(rng, q, k, v, dtype=np.float32, **kw):
    out, lse = mha_ext.attention(q, k, v, return_lse=True, **kw)
    dout = rng.standard_normal(out.shape).astype(dtype)
    ours = mha_ext.attention_backward(dout, q, k, v, out, lse, **kw)
    ref = torch_grads(dout, q, k, v, **kw)
    return dout, out, lse, ours, ref


def central_diff(loss, x, eps=1e-6):
    """d loss / d x by float64 central differences, perturbing ``x`` in place entry by entry."""
    num = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        old = x[idx]
        x[idx] = old + eps
        up = loss()
        x[idx] = old - eps
        down = loss()
        x[idx] = old
        num[idx] = (up - down) / (2 * eps)
    return num


def rel_err(a, b):
    a = np.asarray(a, dtype=np.float64)
    scale = max(np.abs(b).max(), 1.0) if b.size else 1.0  # an all-zero gradient: absolute
    return float(np.abs(a - b).max() / scale) if b.size else 0.0


CASES = [
    # (B, Hq, Hk, Lq, Lk, D, Dv, options)
    (1, 1, 1, 1, 1, 8, 8, {}),
    (2, 2, 2, 7, 9, 16, 16, {}),
    (1, 4, 2, 97, 130, 80, 48, {"causal": True}),
    (2, 2, 1, 65, 33, 17, 7, {"causal": "top_left"}),
    (1, 3, 3, 70, 70, 33, 33, {"window": (5, 3)}),
    (2, 2, 2, 40, 67, 16, 16, {"key_lengths": [67, 20], "causal": True}),
    (1, 2, 2, 31, 45, 8, 8, {"mask": "random"}),
    (2, 2, 1, 30, 50, 16, 16, {"bias": "random", "mask": "random"}),
    (1, 2, 2, 20, 30, 16, 16, {"score": "dot", "scale": 0.3}),
    (1, 2, 1, 129, 131, 64, 64, {"causal": True, "num_threads": 2}),
    # ALiBi (constant slopes, no gradient) and softcap (tanh differentiated)
    (2, 4, 2, 70, 90, 32, 32, {"alibi_slopes": "random", "causal": True}),
    (2, 2, 2, 40, 67, 16, 16, {"alibi_slopes": "per_batch", "key_lengths": [67, 20],
                               "causal": "top_left"}),
    (1, 2, 2, 65, 70, 24, 24, {"softcap": 2.0, "window": (9, 4)}),
    (2, 2, 1, 30, 50, 16, 16, {"softcap": 1.5, "alibi_slopes": "random", "bias": "random",
                               "mask": "random"}),
    (1, 2, 1, 129, 131, 64, 64, {"softcap": 3.0, "alibi_slopes": "random", "causal": True,
                                 "num_threads": 2}),
]


def _options(rng, B, Hq, Lq, Lk, opts):
    opts = dict(opts)
    if opts.get("mask") == "random":
        opts["mask"] = rng.random((B, 1, Lq, Lk)) < 0.7
    if opts.get("bias") == "random":
        opts["bias"] = rng.standard_normal((Hq, Lq, Lk)).astype(np.float32)
    if opts.get("alibi_slopes") == "random":
        opts["alibi_slopes"] = rng.uniform(0.01, 0.5, Hq)
    elif opts.get("alibi_slopes") == "per_batch":
        opts["alibi_slopes"] = rng.uniform(0.01, 0.5, (B, Hq))
    return opts


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[:7]}-{sorted(c[7])}")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_autograd(rng, case, dtype):
    B, Hq, Hk, Lq, Lk, D, Dv, opts = case
    q, k, v = inputs(rng, B, Hq, Hk, Lq, Lk, D, Dv, dtype)
    kw = _options(rng, B, Hq, Lq, Lk, opts)
    _, _, _, (dq, dk, dv), ref = run_both(rng, q, k, v, dtype, **kw)
    tol = 2e-6 if dtype == np.float32 else 1e-12
    for name, got, want in (("dq", dq, ref[1]), ("dk", dk, ref[2]), ("dv", dv, ref[3])):
        assert got.dtype == dtype and got.shape == want.shape, name
        assert rel_err(got, want) < tol, (name, rel_err(got, want))


@pytest.mark.parametrize("causal", [False, True])
def test_matches_sdpa(rng, causal):
    q, k, v = inputs(rng, 2, 4, 4, 100, 100, 64, 64)
    out, lse = mha_ext.attention(q, k, v, causal=causal, return_lse=True)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    dq, dk, dv = mha_ext.attention_backward(dout, q, k, v, out, lse, causal=causal)
    tq, tk, tv = (_t(x).requires_grad_() for x in (q, k, v))
    o = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
    o.backward(_t(dout))
    for got, want in ((dq, tq.grad), (dk, tk.grad), (dv, tv.grad)):
        assert rel_err(got, want.numpy()) < 2e-6


@pytest.mark.parametrize("dtype", LOW, ids=["float16", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True])
def test_low_precision_2x_rule(rng, dtype, causal):
    q, k, v = inputs(rng, 1, 4, 2, 90, 110, 64, 64, dtype)
    out, lse = mha_ext.attention(q, k, v, causal=causal, return_lse=True)
    dout = rng.standard_normal(out.shape).astype(dtype)
    dq, dk, dv = mha_ext.attention_backward(dout, q, k, v, out, lse, causal=causal)
    ref = torch_grads(dout, q, k, v, causal=causal)
    tdt = torch.float16 if dtype == np.float16 else torch.bfloat16
    naive = torch_grads(dout, q, k, v, causal=causal, dtype=tdt)
    for i, got in ((1, dq), (2, dk), (3, dv)):
        assert got.dtype == np.dtype(dtype)
        ours = np.abs(got.astype(np.float64) - ref[i]).max()
        theirs = np.abs(naive[i] - ref[i]).max()
        assert ours <= 2 * theirs + 1e-6, (i, ours, theirs)


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
@pytest.mark.parametrize("rank", [2, 3, 4])
def test_layouts_and_ranks(rng, layout, rank):
    B = 1 if rank < 4 else 2
    H = 1 if rank == 2 else 3
    q, k, v = inputs(rng, B, H, H, 21, 19, 16, 12, layout=layout, rank=rank)
    _, _, _, (dq, dk, dv), ref = run_both(rng, q, k, v, layout=layout, causal=True)
    for got, want in ((dq, ref[1]), (dk, ref[2]), (dv, ref[3])):
        assert got.shape == want.shape
        assert rel_err(got, want) < 2e-6


def test_strided_views(rng):
    base = rng.standard_normal((2, 3, 40, 32)).astype(np.float32)
    q = base[:, :, ::2, :16]
    k = base[:, :, 5:25, 16:]
    v = np.ascontiguousarray(base[:, :, 10:30, :8])[:, ::-1]
    _, _, _, (dq, dk, dv), ref = run_both(rng, q, k, v)
    for got, want in ((dq, ref[1]), (dk, ref[2]), (dv, ref[3])):
        assert rel_err(got, want) < 2e-6


def test_empty_rows_and_padding_keys_get_zero(rng):
    q, k, v = inputs(rng, 2, 2, 2, 10, 12, 8, 8)
    # Batch 1 has no keys at all; rows 0-2 see no key through the window.
    kw = {"key_lengths": [12, 0], "causal": True, "window": (0, 0)}
    out, lse = mha_ext.attention(q, k, v, return_lse=True, **kw)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    dq, dk, dv = mha_ext.attention_backward(dout, q, k, v, out, lse, **kw)
    assert np.all(np.isfinite(dq)) and np.all(np.isfinite(dk)) and np.all(np.isfinite(dv))
    assert np.all(dq[1] == 0) and np.all(dk[1] == 0) and np.all(dv[1] == 0)
    assert np.all(dq[0, :, :0] == 0)
    ref = torch_grads(dout, q, k, v, **kw)
    for got, want in ((dq, ref[1]), (dk, ref[2]), (dv, ref[3])):
        assert rel_err(got, want) < 2e-6


def test_zero_length_axes(rng):
    q, k, v = inputs(rng, 1, 2, 2, 0, 5, 8, 8)
    out, lse = mha_ext.attention(q, k, v, return_lse=True)
    dq, dk, dv = mha_ext.attention_backward(out, q, k, v, out, lse)
    assert dq.shape == q.shape and np.all(dk == 0) and np.all(dv == 0)
    q, k, v = inputs(rng, 1, 2, 2, 4, 0, 8, 8)
    out, lse = mha_ext.attention(q, k, v, return_lse=True)
    dq, dk, dv = mha_ext.attention_backward(np.ones_like(out), q, k, v, out, lse)
    assert np.all(dq == 0) and dk.shape == k.shape


def test_nan_stays_in_its_row(rng):
    q, k, v = inputs(rng, 1, 1, 1, 16, 16, 8, 8)
    q[0, 0, 3, 2] = np.nan
    out, lse = mha_ext.attention(q, k, v, causal=True, return_lse=True)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    dq, dk, dv = mha_ext.attention_backward(dout, q, k, v, out, lse, causal=True)
    rows = np.isnan(dq[0, 0]).any(-1)
    assert rows[3] and rows.sum() == 1
    keys = np.isnan(dk[0, 0]).any(-1)
    # Row 3 sees keys 0..3 only: later keys stay finite.
    assert keys[:4].all() and not keys[4:].any()
    assert not np.isnan(dv[0, 0, 4:]).any()


def test_gqa_sums_over_the_group(rng):
    q, k, v = inputs(rng, 1, 6, 2, 20, 24, 16, 16)
    _, _, _, (_dq, dk, dv), ref = run_both(rng, q, k, v)
    assert dk.shape == k.shape
    assert rel_err(dk, ref[2]) < 2e-6 and rel_err(dv, ref[3]) < 2e-6


@pytest.mark.parametrize("bias_shape", [(4, 6), (1, 2, 4, 6), (2, 1, 1, 6), (2, 2, 4, 6)])
def test_dbias_sums_broadcast_axes(rng, bias_shape):
    q, k, v = inputs(rng, 2, 2, 2, 4, 6, 8, 8)
    bias = rng.standard_normal(bias_shape).astype(np.float32)
    out, lse = mha_ext.attention(q, k, v, bias=bias, return_lse=True)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    *_, dbias = mha_ext.attention_backward(dout, q, k, v, out, lse, bias=bias,
                                           return_dbias=True)
    ref = torch_grads(dout, q, k, v, bias=bias)[5]
    assert dbias.shape == bias_shape and dbias.dtype == np.float32
    assert rel_err(dbias, ref) < 2e-6


def test_general_score_gradient(rng):
    q = rng.standard_normal((1, 2, 30, 12)).astype(np.float32)
    k = rng.standard_normal((1, 1, 25, 9)).astype(np.float32)
    v = rng.standard_normal((1, 1, 25, 7)).astype(np.float32)
    W = rng.standard_normal((12, 9)).astype(np.float32) * 0.3
    score = mha_ext.General(W)
    _, _, _, (dq, dk, dv, dscore), ref = run_both(rng, q, k, v, score=score, causal=True)
    assert isinstance(dscore, mha_ext.General) and dscore.W.shape == W.shape
    for got, want in ((dq, ref[1]), (dk, ref[2]), (dv, ref[3]), (dscore.W, ref[4])):
        assert rel_err(got, want) < 3e-6


def _loss(q, k, v, dout, W=None, bias=None, **kw):
    score = None if W is None else mha_ext.General(W)
    out = mha_ext.attention(q, k, v, score=score, bias=bias, **kw)
    return float((out * dout).sum())


@pytest.mark.parametrize("general", [False, True])
def test_central_finite_differences(rng, general):
    q, k, v = inputs(rng, 1, 2, 1, 5, 6, 4, 3, np.float64)
    W = rng.standard_normal((4, 4)) * 0.5 if general else None
    bias = rng.standard_normal((5, 6))
    kw = {"causal": True, "window": (3, None)}
    score = None if W is None else mha_ext.General(W)
    out, lse = mha_ext.attention(q, k, v, score=score, bias=bias, return_lse=True, **kw)
    dout = rng.standard_normal(out.shape)
    grads = mha_ext.attention_backward(dout, q, k, v, out, lse, score=score, bias=bias,
                                       return_dbias=True, **kw)
    targets = [("q", q, grads[0]), ("k", k, grads[1]), ("v", v, grads[2])]
    if general:
        targets.append(("W", W, grads[3].W))
    targets.append(("bias", bias, grads[-1]))
    for name, x, g in targets:
        num = central_diff(lambda: _loss(q, k, v, dout, W, bias, **kw), x)
        np.testing.assert_allclose(g, num, rtol=1e-6, atol=1e-8, err_msg=name)


def test_bad_inputs_name_the_argument(rng):
    q, k, v = inputs(rng, 1, 2, 2, 8, 9, 16, 16)
    out, lse = mha_ext.attention(q, k, v, return_lse=True)
    bw = mha_ext.attention_backward
    with pytest.raises(ValueError, match="out: expected shape"):
        bw(out, q, k, v, out[:, :, :4], lse)
    with pytest.raises(ValueError, match="dout: expected shape"):
        bw(out[:, :1], q, k, v, out, lse)
    with pytest.raises(TypeError, match="out: expected dtype float32"):
        bw(out, q, k, v, out.astype(np.float64), lse)
    with pytest.raises(ValueError, match="lse: expected shape"):
        bw(out, q, k, v, out, lse[:, :, :3])
    with pytest.raises(ValueError, match="return_dbias"):
        bw(out, q, k, v, out, lse, return_dbias=True)
    with pytest.raises(ValueError, match="device"):
        bw(out, q, k, v, out, lse, device="cuda")
    with pytest.raises(TypeError, match="q, k, v must share"):
        bw(out, q, k.astype(np.float64), v, out, lse)
    with pytest.raises(ValueError, match="layout"):
        bw(out, q, k, v, out, lse, layout="lbhd")
    with pytest.raises(TypeError, match="dout"):
        bw([1.0], q, k, v, out, lse)


@pytest.mark.parametrize("kind", ["additive", "concat"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_additive_and_concat_gradients(rng, kind, dtype):
    B, Hq, Hk, Lq, Lk, D, Dk, Dv, A = 1, 2, 1, 70, 75, 12, 9, 7, 11
    q = rng.standard_normal((B, Hq, Lq, D)).astype(dtype)
    k = rng.standard_normal((B, Hk, Lk, Dk)).astype(dtype)
    v = rng.standard_normal((B, Hk, Lk, Dv)).astype(dtype)
    if kind == "additive":
        score = mha_ext.Additive(rng.standard_normal((D, A)) * 0.3,
                                 rng.standard_normal((Dk, A)) * 0.3, rng.standard_normal(A))
    else:
        score = mha_ext.Concat(rng.standard_normal((D + Dk, A)) * 0.3, rng.standard_normal(A))
    kw = {"score": score, "causal": True, "mask": rng.random((Lq, Lk)) < 0.8}
    _, _, _, (dq, dk, dv, dscore), ref = run_both(rng, q, k, v, dtype, **kw)
    assert type(dscore) is type(score)
    got = ([dscore.W_q, dscore.W_k, dscore.w] if kind == "additive" else [dscore.W, dscore.w])
    tol = 3e-6 if dtype == np.float32 else 1e-12
    for name, a, b in [("dq", dq, ref[1]), ("dk", dk, ref[2]), ("dv", dv, ref[3]),
                       *(("dscore", x, y) for x, y in zip(got, ref[4]))]:
        assert a.shape == b.shape, name
        # dw sums Lq * Lk * Hq float32 terms (10k here) into each entry: measured 4.9e-6.
        limit = 1e-5 if name == "dscore" and dtype == np.float32 else tol
        assert rel_err(a, b) < limit, (name, rel_err(a, b))


@pytest.mark.parametrize("kind", ["additive", "concat"])
def test_additive_finite_differences(rng, kind):
    q = rng.standard_normal((1, 1, 4, 3))
    k = rng.standard_normal((1, 1, 5, 2))
    v = rng.standard_normal((1, 1, 5, 2))
    if kind == "additive":
        params = [rng.standard_normal((3, 4)), rng.standard_normal((2, 4)), rng.standard_normal(4)]
        make = mha_ext.Additive
    else:
        params = [rng.standard_normal((5, 4)), rng.standard_normal(4)]
        make = mha_ext.Concat
    kw = {"causal": "top_left"}
    out, lse = mha_ext.attention(q, k, v, score=make(*params), return_lse=True, **kw)
    dout = rng.standard_normal(out.shape)
    grads = mha_ext.attention_backward(dout, q, k, v, out, lse, score=make(*params), **kw)
    dscore = grads[3]
    analytic = ([dscore.W_q, dscore.W_k, dscore.w] if kind == "additive"
                else [dscore.W, dscore.w])

    def loss():
        o = mha_ext.attention(q, k, v, score=make(*params), **kw)
        return float((o * dout).sum())

    for x, g in [(q, grads[0]), (k, grads[1]), (v, grads[2]), *zip(params, analytic)]:
        np.testing.assert_allclose(g, central_diff(loss, x), rtol=1e-6, atol=1e-8)


_INTERRUPT_CHILD = """
import sys, time
import numpy as np, mha_ext
rng = np.random.default_rng(0)
one = rng.standard_normal((1, 1, 16384, 64)).astype(np.float32)
x = np.broadcast_to(one, (1, 4, 16384, 64))  # four heads, one in memory
lse = np.full((1, 4, 16384), 30.0, np.float32)
print("ready", flush=True)
try:
    mha_ext.attention_backward(x, x, x, x, x, lse, num_threads=int(sys.argv[1]))
    print("finished", flush=True)
except KeyboardInterrupt:
    print("interrupted", time.monotonic(), flush=True)
q = rng.standard_normal((1, 2, 9, 8)).astype(np.float32)
out, l = mha_ext.attention(q, q, q, return_lse=True)
print("after", "ok" if np.isfinite(mha_ext.attention_backward(out, q, q, q, out, l)[0]).all()
      else "WRONG", flush=True)
"""


@pytest.mark.parametrize("threads", [1, 2])
def test_ctrl_c_interrupts_a_long_backward(threads):
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-c", _INTERRUPT_CHILD, str(threads)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(1.0)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    lines = dict(line.split(" ", 1) for line in stdout.splitlines() if " " in line)
    assert "interrupted" in lines, f"not interrupted: {stdout!r} {stderr[-2000:]}"
    assert float(lines["interrupted"]) - sent < 1.0
    assert lines["after"] == "ok"


@pytest.mark.parametrize("bias_shape", [(40, 1), (1, 200), (40, 200)])
def test_dbias_with_key_splits_and_threads(rng, bias_shape):
    # One (batch, key head) group on 2 threads: the key blocks are split between tasks, so
    # a dbias broadcast over keys is summed by both (atomically).
    q, k, v = inputs(rng, 1, 2, 1, 40, 200, 8, 8)
    bias = rng.standard_normal(bias_shape).astype(np.float32)
    out, lse = mha_ext.attention(q, k, v, bias=bias, causal=True, return_lse=True)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    *grads, dbias = mha_ext.attention_backward(dout, q, k, v, out, lse, bias=bias, causal=True,
                                               return_dbias=True, num_threads=2)
    ref = torch_grads(dout, q, k, v, bias=bias, causal=True)
    for got, want in zip([*grads, dbias], [ref[1], ref[2], ref[3], ref[5]]):
        assert rel_err(got, want) < 2e-6


# ------------------------------------------------------------------------------------------
# ALiBi and softcap: the forward's score terms, differentiated (softcap) or constant (ALiBi).


def _alibi_softcap_kw(rng, Hq):
    return {"alibi_slopes": rng.uniform(0.05, 0.6, Hq), "softcap": 1.7}


@pytest.mark.parametrize("dtype", LOW, ids=["float16", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True])
def test_alibi_softcap_low_precision_2x_rule(rng, dtype, causal):
    q, k, v = inputs(rng, 1, 4, 2, 90, 110, 64, 64, dtype)
    kw = {"causal": causal, **_alibi_softcap_kw(rng, 4)}
    out, lse = mha_ext.attention(q, k, v, return_lse=True, **kw)
    dout = rng.standard_normal(out.shape).astype(dtype)
    dq, dk, dv = mha_ext.attention_backward(dout, q, k, v, out, lse, **kw)
    ref = torch_grads(dout, q, k, v, **kw)
    tdt = torch.float16 if dtype == np.float16 else torch.bfloat16
    naive = torch_grads(dout, q, k, v, dtype=tdt, **kw)
    for i, got in ((1, dq), (2, dk), (3, dv)):
        assert got.dtype == np.dtype(dtype)
        ours = np.abs(got.astype(np.float64) - ref[i]).max()
        theirs = np.abs(naive[i] - ref[i]).max()
        assert ours <= 2 * theirs + 1e-6, (i, ours, theirs)


def test_alibi_softcap_every_simd_path(rng, simd):
    q, k, v = inputs(rng, 2, 4, 2, 75, 83, 40, 24)
    kw = {"causal": True, "window": (30, None), "key_lengths": [83, 50],
          "alibi_slopes": rng.uniform(0.05, 0.6, (2, 4)), "softcap": 2.5}
    _, _, _, (dq, dk, dv), ref = run_both(rng, q, k, v, **kw)
    for name, got, want in (("dq", dq, ref[1]), ("dk", dk, ref[2]), ("dv", dv, ref[3])):
        assert rel_err(got, want) < 2e-6, (simd, name, rel_err(got, want))


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
@pytest.mark.parametrize("score", ["general", "additive", "concat"])
def test_alibi_softcap_with_scores_and_dbias(rng, layout, score):
    B, Hq, Hk, Lq, Lk, D = 2, 2, 1, 37, 41, 12
    q, k, v = inputs(rng, B, Hq, Hk, Lq, Lk, D, 8, layout=layout)
    if score == "general":
        sc = mha_ext.General(rng.standard_normal((D, D)) * 0.3)
    elif score == "additive":
        sc = mha_ext.Additive(rng.standard_normal((D, 9)) * 0.3, rng.standard_normal((D, 9)) * 0.3,
                              rng.standard_normal(9))
    else:
        sc = mha_ext.Concat(rng.standard_normal((2 * D, 9)) * 0.3, rng.standard_normal(9))
    bias = rng.standard_normal((Hq, Lq, Lk)).astype(np.float32)
    kw = {"score": sc, "bias": bias, "causal": True, "layout": layout,
          **_alibi_softcap_kw(rng, Hq)}
    out, lse = mha_ext.attention(q, k, v, return_lse=True, **kw)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    dq, dk, dv, dscore, dbias = mha_ext.attention_backward(dout, q, k, v, out, lse,
                                                           return_dbias=True, **kw)
    ref = torch_grads(dout, q, k, v, **kw)
    got = {"general": lambda d: [d.W], "additive": lambda d: [d.W_q, d.W_k, d.w],
           "concat": lambda d: [d.W, d.w]}[score](dscore)
    want = [ref[4]] if score == "general" else ref[4]
    for name, a, b in [("dq", dq, ref[1]), ("dk", dk, ref[2]), ("dv", dv, ref[3]),
                       ("dbias", dbias, ref[5]), *(("dscore", x, y) for x, y in zip(got, want))]:
        assert a.shape == b.shape, name
        assert rel_err(a, b) < (1e-5 if name == "dscore" else 3e-6), (name, rel_err(a, b))


@pytest.mark.parametrize("score", [None, "additive"])
def test_alibi_softcap_finite_differences(rng, score):
    q, k, v = inputs(rng, 2, 2, 1, 5, 6, 4, 3, np.float64)
    bias = rng.standard_normal((5, 6))
    params = ([rng.standard_normal((4, 3)), rng.standard_normal((4, 3)), rng.standard_normal(3)]
              if score else [])
    kw = {"causal": True, "key_lengths": [6, 4], "alibi_slopes": rng.uniform(0.1, 0.9, (2, 2)),
          "softcap": 0.8}

    def make():
        return mha_ext.Additive(*params) if score else None

    out, lse = mha_ext.attention(q, k, v, score=make(), bias=bias, return_lse=True, **kw)
    dout = rng.standard_normal(out.shape)
    grads = mha_ext.attention_backward(dout, q, k, v, out, lse, score=make(), bias=bias,
                                       return_dbias=True, **kw)
    targets = [("q", q, grads[0]), ("k", k, grads[1]), ("v", v, grads[2]),
               ("bias", bias, grads[-1])]
    if score:
        targets += list(zip(["W_q", "W_k", "w"], params, [grads[3].W_q, grads[3].W_k, grads[3].w]))

    def loss():
        return float((mha_ext.attention(q, k, v, score=make(), bias=bias, **kw) * dout).sum())

    for name, x, g in targets:
        np.testing.assert_allclose(g, central_diff(loss, x), rtol=1e-6, atol=1e-8, err_msg=name)


def test_alibi_softcap_empty_rows_get_zero(rng):
    q, k, v = inputs(rng, 2, 2, 2, 9, 12, 8, 8)
    kw = {"key_lengths": [12, 0], "causal": True, "alibi_slopes": [0.3, 0.1], "softcap": 1.0}
    _, _, _, (dq, dk, dv), ref = run_both(rng, q, k, v, **kw)
    assert not dq[1].any() and not dk[1].any() and not dv[1].any()
    for got, want in ((dq, ref[1]), (dk, ref[2]), (dv, ref[3])):
        assert rel_err(got, want) < 2e-6


def test_alibi_softcap_bad_inputs_name_the_argument(rng):
    q, k, v = inputs(rng, 2, 2, 2, 8, 9, 16, 16)
    out, lse = mha_ext.attention(q, k, v, return_lse=True)
    bw = mha_ext.attention_backward
    with pytest.raises(ValueError, match="alibi_slopes: expected shape"):
        bw(out, q, k, v, out, lse, alibi_slopes=np.ones(3))
    with pytest.raises(ValueError, match="alibi_slopes: expected shape"):
        bw(out, q, k, v, out, lse, alibi_slopes=np.ones((3, 2)))
    with pytest.raises(ValueError, match="alibi_slopes"):
        bw(out, q, k, v, out, lse, alibi_slopes=np.array([np.nan, 1.0]))
    with pytest.raises(TypeError, match="alibi_slopes"):
        bw(out, q, k, v, out, lse, alibi_slopes=np.array(["a", "b"]))
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="softcap"):
            bw(out, q, k, v, out, lse, softcap=bad)
    with pytest.raises(TypeError, match="softcap"):
        bw(out, q, k, v, out, lse, softcap="1")
    with pytest.raises(TypeError, match="softcap"):
        bw(out, q, k, v, out, lse, softcap=True)
