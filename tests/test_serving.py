"""ALiBi / softcap in attention, attention_varlen and attention_kvcache (SPEC 3, 6.2, 6.3).

References: tests/reference.py (float64, explicit ALiBi bias and tanh), torch SDPA with the
explicit bias, attention() per sequence (varlen), gathering the blocks into a contiguous
cache (paged). Shapes are CPU sized; the per-ISA-path run repeats a representative subset in
a subprocess per path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mha_ext
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import alibi_bias, assert_out_close, attention_ref, random_inputs

try:
    import ml_dtypes

    BF16 = ml_dtypes.bfloat16
except ImportError:  # pragma: no cover
    BF16 = None

DTYPES = [np.float32, np.float64, np.float16] + ([BF16] if BF16 is not None else [])
CAUSALS = [False, True, "top_left"]


def _lse_close(lse, ref, tol=1e-5):
    lse = np.asarray(lse, np.float64)
    assert np.array_equal(np.isneginf(lse), np.isneginf(ref))
    fin = np.isfinite(ref)
    np.testing.assert_allclose(lse[fin], ref[fin], rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------
# ALiBi and softcap in attention()


@pytest.mark.parametrize("causal", CAUSALS)
@pytest.mark.parametrize(
    ("B", "Hq", "Hk", "Lq", "Lk", "D"),
    [(2, 4, 2, 37, 53, 16), (1, 8, 2, 1, 300, 32), (2, 6, 3, 5, 77, 5), (1, 2, 2, 97, 97, 80)],
)
@pytest.mark.parametrize("naive", [False, True])
def test_alibi_softcap_vs_reference(rng, causal, B, Hq, Hk, Lq, Lk, D, naive):
    q, k, v = random_inputs(rng, (B, Hq, Lq, D), (B, Hk, Lk, D), (B, Hk, Lk, D))
    slopes = rng.uniform(0.01, 0.5, (B, Hq)).astype(np.float32)
    kl = rng.integers(0, Lk + 1, B)
    cases = [
        dict(alibi_slopes=slopes),
        dict(alibi_slopes=slopes[0]),
        dict(softcap=2.5),
        dict(alibi_slopes=slopes, softcap=4.0, window=(6, 3)),
        dict(alibi_slopes=slopes, key_lengths=kl, mask=rng.random((Lq, Lk)) < 0.8),
        dict(softcap=1.0, bias=rng.standard_normal((B, 1, Lq, Lk)).astype(np.float32)),
    ]
    C = {False: 0, True: 1, "top_left": 2}[causal]
    for kw in cases:
        w = kw.get("window", (-1, -1))
        out, wts, lse = mha_ext._core.attention(
            q, k, v, mask=kw.get("mask"), bias=kw.get("bias"), causal=C, window_left=w[0],
            window_right=w[1], key_lengths=kw.get("key_lengths"), return_weights=True,
            return_lse=True, naive=naive, alibi_slopes=kw.get("alibi_slopes"),
            softcap=kw.get("softcap"),
        )
        ref, rw, rl = attention_ref(q, k, v, causal=causal, **kw)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5, err_msg=str(list(kw)))
        np.testing.assert_allclose(wts, rw, rtol=1e-5, atol=1e-6)
        _lse_close(lse, rl)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_alibi_softcap_dtypes_layouts(rng, dtype, layout):
    B, Hq, Hk, Lq, Lk, D = 2, 4, 2, 19, 70, 24
    shp = (lambda h, l: (B, h, l, D)) if layout == "bhld" else (lambda h, l: (B, l, h, D))
    q, k, v = random_inputs(rng, shp(Hq, Lq), shp(Hk, Lk), shp(Hk, Lk), dtype)
    slopes = rng.uniform(0.05, 0.3, Hq)
    out = mha_ext.attention(
        q, k, v, causal=True, alibi_slopes=slopes, softcap=3.0, layout=layout
    )
    ref = attention_ref(q, k, v, causal=True, alibi_slopes=slopes, softcap=3.0, layout=layout)[0]
    if np.dtype(dtype) in (np.float32, np.float64):
        tol = 1e-5 if np.dtype(dtype) == np.float32 else 1e-12
        np.testing.assert_allclose(out, ref, rtol=tol, atol=tol)
        return
    # Low precision, ALiBi alone: the same-precision rule, the naive run seeing ALiBi as its
    # explicit bias. With softcap (no same-precision tanh reference): a bound of a few units
    # of the dtype's rounding on O(1) outputs.
    bias = alibi_bias(slopes, B, Hq, Lq, Lk, causal=True)
    out_a = mha_ext.attention(q, k, v, causal=True, alibi_slopes=slopes, layout=layout)
    assert_out_close(out_a, q, k, v, causal=True, bias=bias, layout=layout)
    err = np.abs(out.astype(np.float64) - ref).max()
    assert err < 8 * float(np.finfo(np.float16).eps if dtype is np.float16 else 2.0**-8), err


def test_alibi_as_explicit_bias_and_scores(rng):
    # ALiBi == the same call with the explicit bias; every score function.
    B, Hq, Hk, Lq, Lk, D = 2, 4, 2, 13, 29, 8
    q, k, v = random_inputs(rng, (B, Hq, Lq, D), (B, Hk, Lk, D), (B, Hk, Lk, D))
    slopes = rng.uniform(0.01, 0.4, (B, Hq))
    bias = alibi_bias(slopes, B, Hq, Lq, Lk, causal=True).astype(np.float32)
    W = rng.standard_normal((D, D)).astype(np.float32)
    for score in (None, "dot", mha_ext.General(W)):
        a = mha_ext.attention(q, k, v, causal=True, score=score, alibi_slopes=slopes)
        b = mha_ext.attention(q, k, v, causal=True, score=score, bias=bias)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    add = mha_ext.Additive(
        rng.standard_normal((D, 6)), rng.standard_normal((D, 6)), rng.standard_normal(6)
    )
    a = mha_ext.attention(q, k, v, score=add, alibi_slopes=slopes, softcap=2.0)
    r = attention_ref(q, k, v, score=add, alibi_slopes=slopes, softcap=2.0)[0]
    np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5)


def test_alibi_softcap_vs_torch_sdpa(rng):
    torch = pytest.importorskip("torch")
    B, H, L, D = 2, 4, 33, 16
    q, k, v = random_inputs(rng, (B, H, L, D), (B, H, L, D), (B, H, L, D))
    slopes = rng.uniform(0.05, 0.5, H)
    i = np.arange(L)
    bias = -slopes[:, None, None] * np.abs(i[:, None] - i[None, :])
    causal = np.tril(np.ones((L, L), bool))
    tb = torch.from_numpy(np.where(causal, bias, -np.inf).astype(np.float32))
    ref = torch.nn.functional.scaled_dot_product_attention(
        torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), attn_mask=tb
    ).numpy()
    out = mha_ext.attention(q, k, v, causal=True, alibi_slopes=slopes)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    # softcap: the explicit tanh on the scores, then softmax (torch as the math).
    cap = 1.5
    s = torch.from_numpy(q) @ torch.from_numpy(k).transpose(-1, -2) / np.sqrt(D)
    p = torch.softmax(cap * torch.tanh(s / cap), dim=-1)
    ref = (p @ torch.from_numpy(v)).numpy()
    np.testing.assert_allclose(mha_ext.attention(q, k, v, softcap=cap), ref, rtol=1e-5, atol=1e-5)


def test_alibi_softcap_errors(rng):
    q, k, v = random_inputs(rng, (1, 4, 3, 8), (1, 4, 5, 8), (1, 4, 5, 8))
    with pytest.raises(ValueError, match="alibi_slopes"):
        mha_ext.attention(q, k, v, alibi_slopes=np.ones(3))
    with pytest.raises(ValueError, match="alibi_slopes"):
        mha_ext.attention(q, k, v, alibi_slopes=np.array([1, np.nan, 1, 1]))
    with pytest.raises(TypeError, match="alibi_slopes"):
        mha_ext.attention(q, k, v, alibi_slopes=np.ones(4, bool))
    for bad in (0.0, -1.0, np.inf, np.nan):
        with pytest.raises(ValueError, match="softcap"):
            mha_ext.attention(q, k, v, softcap=bad)
    with pytest.raises(TypeError, match="softcap"):
        mha_ext.attention(q, k, v, softcap="1")


# ------------------------------------------------------------------------------------------
# attention_varlen


def _cu(lens, dtype=np.int32):
    return np.concatenate([[0], np.cumsum(lens)]).astype(dtype)


def _check_varlen(rng, lens_q, lens_k, Hq, Hk, D, dtype=np.float32, **kw):
    cq, ck = _cu(lens_q), _cu(lens_k, np.int64)
    q, k, v = random_inputs(rng, (cq[-1], Hq, D), (ck[-1], Hk, D), (ck[-1], Hk, D + 1), dtype)
    slopes = kw.pop("slopes", None)
    threads = kw.pop("num_threads", None)
    out, lse = mha_ext.attention_varlen(
        q, k, v, cq, ck, return_lse=True, alibi_slopes=slopes, num_threads=threads, **kw
    )
    assert out.shape == (cq[-1], Hq, D + 1) and lse.shape == (Hq, cq[-1])
    for b in range(len(lens_q)):
        qs, ks, vs = q[cq[b] : cq[b + 1]], k[ck[b] : ck[b + 1]], v[ck[b] : ck[b + 1]]
        if len(qs) == 0:
            continue
        sb = None if slopes is None else (slopes[b] if np.ndim(slopes) == 2 else slopes)
        ref, _, rl = attention_ref(qs, ks, vs, layout="blhd", alibi_slopes=sb, **kw)
        got = out[cq[b] : cq[b + 1]]
        if np.dtype(dtype) == np.float32:
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
            _lse_close(lse[:, cq[b] : cq[b + 1]], rl)
        else:
            assert_out_close(got, qs, ks, vs, ref_out=ref, layout="blhd", **kw)


@pytest.mark.parametrize("causal", CAUSALS)
@pytest.mark.parametrize(("Hq", "Hk"), [(4, 4), (6, 2)])
def test_varlen_vs_attention_per_sequence(rng, causal, Hq, Hk):
    lens_q = [3, 0, 17, 1, 130, 2]
    lens_k = [5, 4, 17, 9, 130, 0]
    _check_varlen(rng, lens_q, lens_k, Hq, Hk, 16, causal=causal)
    slopes = rng.uniform(0.01, 0.3, (6, Hq))
    _check_varlen(
        rng, lens_q, lens_k, Hq, Hk, 16, causal=causal, window=(7, 2), softcap=2.0, slopes=slopes
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_dtypes(rng, dtype):
    _check_varlen(rng, [7, 40, 1], [7, 40, 33], 4, 2, 32, dtype=dtype, causal=True)


def test_varlen_long_among_short_uses_threads(rng):
    # One 600-row sequence among 50 short ones: still exact, on several threads.
    lens = [600] + [3] * 50
    _check_varlen(rng, lens, lens, 2, 1, 16, causal=True, num_threads=2)


def test_varlen_errors(rng):
    q, k, v = random_inputs(rng, (8, 2, 4), (8, 2, 4), (8, 2, 4))
    good = np.array([0, 3, 8], np.int32)
    for bad, msg in [
        (np.array([1, 3, 8], np.int32), "start at 0"),
        (np.array([0, 5, 3, 8], np.int32), "not decrease"),
        (np.array([0, 3, 9], np.int32), "past"),
        (np.array([0, 3, 7], np.int32), "end at"),
        (np.array([[0, 8]], np.int32), "shape"),
    ]:
        with pytest.raises(ValueError, match=msg):
            mha_ext.attention_varlen(q, k, v, bad, good if bad.ndim == 1 and len(bad) == 3 else bad)
        with pytest.raises(ValueError, match="cu_seqlens"):
            mha_ext.attention_varlen(q, k, v, good, bad)
    with pytest.raises(TypeError, match="cu_seqlens_q"):
        mha_ext.attention_varlen(q, k, v, good.astype(np.float32), good)
    with pytest.raises(TypeError, match="cu_seqlens_k"):
        mha_ext.attention_varlen(q, k, v, good, good.astype(np.uint32))
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        mha_ext.attention_varlen(q, k, v, good, np.array([0, 8], np.int32))
    with pytest.raises(ValueError, match="q: expected 3"):
        mha_ext.attention_varlen(q[None], k, v, good, good)


def test_varlen_snapshot(rng):
    # The call reads its own copy of cu_seqlens: the caller's array is untouched and a
    # result equals the call on a copy.
    q, k, v = random_inputs(rng, (8, 2, 4), (8, 2, 4), (8, 2, 4))
    cu = np.array([0, 3, 8], np.int64)
    a = mha_ext.attention_varlen(q, k, v, cu, cu.copy())
    assert cu.tolist() == [0, 3, 8]
    np.testing.assert_array_equal(a, mha_ext.attention_varlen(q, k, v, cu.copy(), cu.copy()))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lens=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), min_size=1, max_size=6),
    causal=st.sampled_from(CAUSALS),
    window=st.sampled_from([None, (3, 0), (5, 5)]),
)
def test_varlen_fuzz(rng, lens, causal, window):
    lens_q = [a for a, _ in lens]
    lens_k = [b for _, b in lens]
    _check_varlen(rng, lens_q, lens_k, 2, 1, 8, causal=causal, window=window)


# ------------------------------------------------------------------------------------------
# attention_kvcache


def _paged(rng, B, seqlens, Hk, D, bs, dtype=np.float32, spare=3):
    max_blocks = max(1, -(-max(seqlens) // bs))
    n_blocks = B * max_blocks + spare
    kp, vp = (rng.standard_normal((n_blocks, bs, Hk, D)).astype(dtype) for _ in range(2))
    table = rng.permutation(n_blocks)[: B * max_blocks].reshape(B, max_blocks).astype(np.int32)
    kc = kp[table].reshape(B, max_blocks * bs, Hk, D)
    vc = vp[table].reshape(B, max_blocks * bs, Hk, D)
    return kp, vp, table, kc, vc


@pytest.mark.parametrize("bs", [16, 64, 100])
@pytest.mark.parametrize(("Hq", "Hk", "Lq"), [(8, 2, 1), (4, 4, 1), (6, 2, 3), (4, 1, 20)])
def test_kvcache_paged_vs_contiguous(rng, bs, Hq, Hk, Lq):
    B, D = 3, 32
    seqlens = np.array([150, Lq, 77])
    kp, vp, table, kc, vc = _paged(rng, B, seqlens, Hk, D, bs)
    q = rng.standard_normal((B, Lq, Hq, D)).astype(np.float32)
    slopes = rng.uniform(0.01, 0.2, (B, Hq))
    for kw in [{}, dict(alibi_slopes=slopes, softcap=3.0), dict(window=(40, 0))]:
        ref, rl = mha_ext.attention(
            q, kc, vc, key_lengths=seqlens, causal=True, layout="blhd", return_lse=True, **kw
        )
        r64 = attention_ref(q, kc, vc, key_lengths=seqlens, causal=True, layout="blhd", **kw)[0]
        np.testing.assert_allclose(ref, r64, rtol=1e-5, atol=1e-5)
        for splits in (None, 1, 3, 64):
            for paged in (True, False):
                o, lse = mha_ext.attention_kvcache(
                    q, kp if paged else kc, vp if paged else vc, seqlens,
                    block_table=table if paged else None, return_lse=True, num_splits=splits,
                    **kw,
                )
                np.testing.assert_allclose(o, ref, rtol=1e-5, atol=1e-5)
                _lse_close(lse, rl)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kvcache_dtypes(rng, dtype):
    B, Hq, Hk, D, bs = 2, 8, 2, 64, 32
    seqlens = np.array([300, 45])
    kp, vp, table, kc, vc = _paged(rng, B, seqlens, Hk, D, bs, dtype)
    q = rng.standard_normal((B, 1, Hq, D)).astype(dtype)
    for splits in (1, 4):
        o = mha_ext.attention_kvcache(q, kp, vp, seqlens, block_table=table, num_splits=splits)
        assert o.dtype == np.dtype(dtype)
        assert_out_close(o, q, kc, vc, key_lengths=seqlens, causal=True, layout="blhd")


def test_kvcache_empty_and_noncausal(rng):
    B, Hq, Hk, D, bs = 3, 4, 2, 16, 16
    seqlens = np.array([0, 5, 33])
    kp, vp, table, kc, vc = _paged(rng, B, seqlens, Hk, D, bs)
    q = rng.standard_normal((B, 2, Hq, D)).astype(np.float32)
    for causal in (True, False):
        for splits in (1, 2):
            o, lse = mha_ext.attention_kvcache(
                q, kp, vp, seqlens, block_table=table, causal=causal, return_lse=True,
                num_splits=splits,
            )
            r, _, rl = attention_ref(
                q, kc, vc, key_lengths=seqlens, causal=causal, layout="blhd"
            )
            np.testing.assert_allclose(o, r, rtol=1e-5, atol=1e-5)
            _lse_close(lse, rl)
    assert (o[0] == 0).all() and np.isneginf(lse[0]).all()


def test_kvcache_errors(rng):
    B, Hq, Hk, D, bs = 2, 4, 2, 8, 16
    seqlens = np.array([20, 5])
    kp, vp, table, kc, vc = _paged(rng, B, seqlens, Hk, D, bs, spare=0)
    q = rng.standard_normal((B, 1, Hq, D)).astype(np.float32)
    bad = table.copy()
    bad[0, 1] = kp.shape[0]  # out of range, used by sequence 0 (keys 16..19)
    with pytest.raises(ValueError, match="block_table"):
        mha_ext.attention_kvcache(q, kp, vp, seqlens, block_table=bad)
    bad[0, 1] = -1
    with pytest.raises(ValueError, match="block_table"):
        mha_ext.attention_kvcache(q, kp, vp, seqlens, block_table=bad)
    unused = table.copy()
    unused[1, 1] = 10**6  # sequence 1 uses one block only: an unused entry is not read
    mha_ext.attention_kvcache(q, kp, vp, seqlens, block_table=unused)
    with pytest.raises(ValueError, match="cache_seqlens"):
        mha_ext.attention_kvcache(q, kp, vp, np.array([33, 5]), block_table=table)
    with pytest.raises(ValueError, match="cache_seqlens"):
        mha_ext.attention_kvcache(q, kc, vc, np.array([-1, 5]))
    with pytest.raises(TypeError, match="block_table"):
        mha_ext.attention_kvcache(q, kp, vp, seqlens, block_table=table.astype(np.int64))
    with pytest.raises(TypeError, match="cache_seqlens"):
        mha_ext.attention_kvcache(q, kp, vp, seqlens.astype(np.float64), block_table=table)
    with pytest.raises(ValueError, match="num_splits"):
        mha_ext.attention_kvcache(q, kc, vc, seqlens, num_splits=0)
    with pytest.raises(ValueError, match="k_cache"):
        mha_ext.attention_kvcache(q, kc[0], vc, seqlens)
    with pytest.raises(TypeError, match="k_cache"):
        mha_ext.attention_kvcache(q, kp.astype(np.float64), vp, seqlens, block_table=table)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seqlens=st.lists(st.integers(1, 90), min_size=1, max_size=4),
    bs=st.sampled_from([1, 7, 16, 32]),
    lq=st.integers(1, 3),
    splits=st.sampled_from([None, 1, 2, 5]),
)
def test_kvcache_fuzz(rng, seqlens, bs, lq, splits):
    seqlens = np.maximum(np.array(seqlens), lq)
    B, Hq, Hk, D = len(seqlens), 4, 2, 8
    kp, vp, table, kc, vc = _paged(rng, B, seqlens, Hk, D, bs)
    q = rng.standard_normal((B, lq, Hq, D)).astype(np.float32)
    o = mha_ext.attention_kvcache(q, kp, vp, seqlens, block_table=table, num_splits=splits)
    r = attention_ref(q, kc, vc, key_lengths=seqlens, causal=True, layout="blhd")[0]
    np.testing.assert_allclose(o, r, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------
# Every instruction-set path of this machine, in a subprocess each (the path is chosen once
# per process): a representative subset of the checks above.

_PATH_SCRIPT = r"""
import sys, json, numpy as np, mha_ext
sys.path.insert(0, sys.argv[1])
from reference import attention_ref
rng = np.random.default_rng(5)
errs = []
q, k, v = (rng.standard_normal(s).astype(np.float32) for s in [(2, 8, 3, 32), (2, 2, 90, 32), (2, 2, 90, 32)])
sl = rng.uniform(0.01, 0.3, (2, 8))
for causal in (False, True):
    o = mha_ext.attention(q, k, v, causal=causal, alibi_slopes=sl, softcap=2.0)
    errs.append(float(np.abs(o - attention_ref(q, k, v, causal=causal, alibi_slopes=sl, softcap=2.0)[0]).max()))
lens = [5, 70, 1]
cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
qv, kv_, vv = (rng.standard_normal((cu[-1], 4, 16)).astype(np.float32) for _ in range(3))
o = mha_ext.attention_varlen(qv, kv_, vv, cu, cu, causal=True, alibi_slopes=sl[0, :4])
for b in range(3):
    s = slice(cu[b], cu[b + 1])
    r = attention_ref(qv[s], kv_[s], vv[s], causal=True, layout="blhd", alibi_slopes=sl[0, :4])[0]
    errs.append(float(np.abs(o[s] - r).max()))
kp, vp = (rng.standard_normal((12, 16, 2, 32)).astype(np.float32) for _ in range(2))
table = rng.permutation(12)[:10].reshape(2, 5).astype(np.int32)
seq = np.array([80, 33])
qq = rng.standard_normal((2, 1, 8, 32)).astype(np.float32)
kc, vc = kp[table].reshape(2, 80, 2, 32), vp[table].reshape(2, 80, 2, 32)
for ns in (1, 3):
    o = mha_ext.attention_kvcache(qq, kp, vp, seq, block_table=table, num_splits=ns, softcap=5.0)
    r = attention_ref(qq, kc, vc, key_lengths=seq, causal=True, layout="blhd", softcap=5.0)[0]
    errs.append(float(np.abs(o - r).max()))
print(json.dumps({"simd": mha_ext.build_info()["simd"], "err": max(errs)}))
"""


@pytest.mark.parametrize("path", mha_ext.build_info()["simd_supported"])
def test_every_isa_path(path):
    env = dict(os.environ, MHA_EXT_SIMD=path)
    here = os.path.dirname(os.path.abspath(__file__))
    res = subprocess.run(
        [sys.executable, "-c", _PATH_SCRIPT, here], env=env, capture_output=True, text=True,
        check=True,
    )
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["simd"] == path
    assert got["err"] < 1e-5, got
