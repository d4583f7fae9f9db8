"""Head-spanning decode (issue 12, csrc/cpu/kernel/decode_span.h).

attention_kvcache on contiguous (B, Lmax, Hk, D) and paged caches, and attention(...,
layout="blhd"), with few query rows per K/V head (Lq * group <= 8) run tasks over key chunks
of all heads. Checked against the float64 reference and against the old (batch, head) tile
loop, which MHA_EXT_KV_SPAN=0 forces (the switch is read per call). The per-ISA-path run
repeats a subset in a subprocess per path.
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
from reference import assert_out_close, attention_ref

try:
    import ml_dtypes

    BF16 = ml_dtypes.bfloat16
except ImportError:  # pragma: no cover
    BF16 = None

DTYPES = [np.float32, np.float64, np.float16] + ([BF16] if BF16 is not None else [])


def _paged(rng, seqlens, Hk, D, bs, dtype=np.float32, spare=2):
    B = len(seqlens)
    max_blocks = max(1, -(-max(seqlens) // bs))
    n_blocks = B * max_blocks + spare
    kp, vp = (rng.standard_normal((n_blocks, bs, Hk, D)).astype(dtype) for _ in range(2))
    table = rng.permutation(n_blocks)[: B * max_blocks].reshape(B, max_blocks).astype(np.int32)
    kc = kp[table].reshape(B, max_blocks * bs, Hk, D)
    vc = vp[table].reshape(B, max_blocks * bs, Hk, D)
    return kp, vp, table, kc, vc


def _old(fn, monkeypatch):
    """fn() on the old tile-loop path."""
    with monkeypatch.context() as m:
        m.setenv("MHA_EXT_KV_SPAN", "0")
        return fn()


def _lse_close(lse, ref, tol=1e-5):
    lse = np.asarray(lse, np.float64)
    ref = np.asarray(ref, np.float64)
    assert np.array_equal(np.isneginf(lse), np.isneginf(ref))
    fin = np.isfinite(ref)
    np.testing.assert_allclose(lse[fin], ref[fin], rtol=tol, atol=tol)


@pytest.mark.parametrize(("Hq", "Hk"), [(4, 4), (8, 2), (16, 2)])  # groups 1, 4, 8
@pytest.mark.parametrize("Lq", [1, 2, 4])
@pytest.mark.parametrize("bs", [None, 1, 16, 64, 23])
def test_span_vs_reference_and_old(rng, monkeypatch, Hq, Hk, Lq, bs):
    D = 32
    seqlens = np.array([0, 1, 150, Lq, 77])
    if bs is None:
        Lmax = 160
        kc, vc = (rng.standard_normal((5, Lmax, Hk, D)).astype(np.float32) for _ in range(2))
        kk, vv, table = kc, vc, None
    else:
        kk, vv, table, kc, vc = _paged(rng, seqlens, Hk, D, bs)
    q = rng.standard_normal((5, Lq, Hq, D)).astype(np.float32)
    slopes = rng.uniform(0.01, 0.2, (5, Hq))
    for kw in [{}, dict(alibi_slopes=slopes, softcap=3.0), dict(window=(40, 0)),
               dict(causal=False), dict(causal="top_left", window=(9, 2))]:
        kw = dict(kw)
        causal = kw.pop("causal", True)
        r64, _, rl = attention_ref(q, kc, vc, key_lengths=seqlens, causal=causal,
                                   layout="blhd", **kw)
        for splits in (None, 1, 3, 64):
            def call():
                return mha_ext.attention_kvcache(q, kk, vv, seqlens, block_table=table,
                                                 causal=causal, return_lse=True,
                                                 num_splits=splits, **kw)
            o, lse = call()
            np.testing.assert_allclose(o, r64, rtol=1e-5, atol=1e-5)
            _lse_close(lse, rl)
            o_old, lse_old = _old(call, monkeypatch)
            np.testing.assert_allclose(o, o_old, rtol=1e-5, atol=1e-5)
            _lse_close(lse, lse_old)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bs", [None, 16, 7])
def test_span_dtypes(rng, dtype, bs):
    Hq, Hk, D = 8, 2, 40  # D not a multiple of the vector width: V converted / padded
    seqlens = np.array([300, 45, 1])
    if bs is None:
        kc, vc = (rng.standard_normal((3, 310, Hk, D)).astype(dtype) for _ in range(2))
        kk, vv, table = kc, vc, None
    else:
        kk, vv, table, kc, vc = _paged(rng, seqlens, Hk, D, bs, dtype)
    for Lq in (1, 3):
        q = rng.standard_normal((3, Lq, Hq, D)).astype(dtype)
        for splits in (1, 4):
            o, lse = mha_ext.attention_kvcache(q, kk, vv, seqlens, block_table=table,
                                               num_splits=splits, return_lse=True)
            assert o.dtype == np.dtype(dtype)
            assert_out_close(o, q, kc, vc, key_lengths=seqlens, causal=True, layout="blhd")
            rl = attention_ref(q, kc, vc, key_lengths=seqlens, causal=True, layout="blhd")[2]
            _lse_close(lse, rl, tol=1e-5 if dtype in (np.float32, np.float64) else 2e-2)


@pytest.mark.parametrize("Lk", [1, 15, 16, 17, 1000])
def test_span_attention_blhd(rng, monkeypatch, Lk):
    """attention(layout="blhd") at Lq = 1 (and 2) takes the spanning path too."""
    B, Hq, Hk, D = 2, 8, 4, 64
    for Lq in (1, 2):
        q = rng.standard_normal((B, Lq, Hq, D)).astype(np.float32)
        k, v = (rng.standard_normal((B, Lk, Hk, D)).astype(np.float32) for _ in range(2))
        kl = np.array([Lk, max(0, Lk - 3)])
        for kw in [dict(), dict(key_lengths=kl, causal=True), dict(softcap=2.0, window=(5, 5))]:
            def call():
                return mha_ext.attention(q, k, v, layout="blhd", return_lse=True, **kw)
            o, lse = call()
            r, _, rl = attention_ref(q, k, v, layout="blhd", **kw)
            np.testing.assert_allclose(o, r, rtol=1e-5, atol=1e-5)
            _lse_close(lse, rl)
            o_old, _ = _old(call, monkeypatch)
            np.testing.assert_allclose(o, o_old, rtol=1e-5, atol=1e-5)


def test_span_hidden_nan_never_reaches_a_row(rng):
    """NaN / Inf in V (and K) at keys beyond cache_seqlens, in unused blocks, or hidden by the
    causal diagonal / window of a row must not reach that row."""
    Hq, Hk, D, bs = 8, 2, 32, 16
    seqlens = np.array([40, 17, 5])
    kp, vp, table, kc, vc = _paged(rng, seqlens, Hk, D, bs, spare=3)
    used = np.zeros(kp.shape[0], bool)
    for b, n in enumerate(seqlens):
        for blk in range(-(-n // bs)):
            used[table[b, blk]] = True
        last = table[b, (n - 1) // bs]
        kp[last, (n - 1) % bs + 1:] = np.nan  # beyond seqlen inside the last block
        vp[last, (n - 1) % bs + 1:] = np.inf
    kp[~used] = np.nan
    vp[~used] = np.nan
    kc = kp[table].reshape(len(seqlens), -1, Hk, D)
    vc = vp[table].reshape(len(seqlens), -1, Hk, D)
    # Contiguous: NaN past seqlen.
    kc2, vc2 = kc.copy(), vc.copy()
    q = rng.standard_normal((3, 3, Hq, D)).astype(np.float32)
    for splits in (None, 1, 2):
        o = mha_ext.attention_kvcache(q, kp, vp, seqlens, block_table=table, num_splits=splits)
        o2 = mha_ext.attention_kvcache(q, kc2, vc2, seqlens, num_splits=splits)
        assert np.isfinite(o).all() and np.isfinite(o2).all()
        np.testing.assert_allclose(o, o2, rtol=1e-5, atol=1e-5)
    # The last key (visible to row Lq-1 only under causal) holds NaN in V: rows 0..Lq-2 stay
    # finite; a window hides key 0 from every row (its V NaN never reaches one).
    vc3 = vc2.copy()
    for b, n in enumerate(seqlens):
        vc3[b, n - 1] = np.nan
    o = mha_ext.attention_kvcache(q, kc2, vc3, seqlens, num_splits=1)
    assert np.isfinite(o[:, :2]).all() and np.isnan(o[:, 2]).all()
    vc4 = vc2.copy()
    vc4[:, 0] = np.nan
    vc4[2, 0] = 0  # sequence 2 (5 keys) sees key 0 through the window
    o = mha_ext.attention_kvcache(q, kc2, vc4, seqlens, window=(3, 0))
    assert np.isfinite(o).all()


def test_span_nan_query_poisons_its_row(rng, monkeypatch):
    Hq, Hk, D = 8, 4, 16
    seqlens = np.array([50, 3])
    kc, vc = (rng.standard_normal((2, 64, Hk, D)).astype(np.float32) for _ in range(2))
    q = rng.standard_normal((2, 1, Hq, D)).astype(np.float32)
    q[0, 0, 3, 5] = np.nan
    def call():
        return mha_ext.attention_kvcache(q, kc, vc, seqlens, return_lse=True)
    o, lse = call()
    o_old, lse_old = _old(call, monkeypatch)
    assert np.isnan(o[0, 0, 3]).all() and np.isnan(lse[0, 3]).all()
    assert np.isfinite(np.delete(o[0, 0], 3, axis=0)).all() and np.isfinite(o[1]).all()
    np.testing.assert_allclose(o, o_old, rtol=1e-5, atol=1e-5, equal_nan=True)
    np.testing.assert_allclose(lse, lse_old, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_span_many_heads_decode(rng, monkeypatch):
    """The benchmark's shape, scaled down: Hq 32, Hk 8 / 32, D 128, several chunks."""
    for Hk in (8, 32):
        q = rng.standard_normal((1, 1, 32, 128)).astype(np.float32)
        kc, vc = (rng.standard_normal((1, 2048, Hk, 128)).astype(np.float32) for _ in range(2))
        seql = np.array([2000])
        o = mha_ext.attention_kvcache(q, kc, vc, seql, num_threads=2)
        r = attention_ref(q, kc, vc, key_lengths=seql, causal=True, layout="blhd")[0]
        np.testing.assert_allclose(o, r, rtol=1e-5, atol=1e-5)
        o_old = _old(lambda: mha_ext.attention_kvcache(q, kc, vc, seql, num_threads=2),
                     monkeypatch)
        np.testing.assert_allclose(o, o_old, rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seqlens=st.lists(st.integers(0, 120), min_size=1, max_size=4),
    bs=st.sampled_from([1, 5, 16, 33]),
    lq=st.integers(1, 4),
    group=st.sampled_from([1, 2, 4]),
    splits=st.sampled_from([None, 1, 2, 7]),
)
def test_span_fuzz(rng, seqlens, bs, lq, group, splits):
    seqlens = np.array(seqlens)
    Hk, D = 2, 8
    Hq = Hk * group
    kp, vp, table, kc, vc = _paged(rng, seqlens, Hk, D, bs)
    q = rng.standard_normal((len(seqlens), lq, Hq, D)).astype(np.float32)
    o, lse = mha_ext.attention_kvcache(q, kp, vp, seqlens, block_table=table, num_splits=splits,
                                       return_lse=True)
    r, _, rl = attention_ref(q, kc, vc, key_lengths=seqlens, causal=True, layout="blhd")
    np.testing.assert_allclose(o, r, rtol=1e-5, atol=1e-5)
    _lse_close(lse, rl)


_PATH_SCRIPT = r"""
import sys, json, numpy as np, mha_ext
sys.path.insert(0, sys.argv[1])
from reference import attention_ref
rng = np.random.default_rng(7)
errs = []
for Hq, Hk, Lq, D in [(8, 2, 1, 32), (4, 4, 2, 40), (16, 2, 1, 16)]:
    seq = np.array([70, 1, 33, 0])
    bs = 16
    kp, vp = (rng.standard_normal((24, bs, Hk, D)).astype(np.float32) for _ in range(2))
    table = rng.permutation(24)[:20].reshape(4, 5).astype(np.int32)
    kc, vc = kp[table].reshape(4, 80, Hk, D), vp[table].reshape(4, 80, Hk, D)
    q = rng.standard_normal((4, Lq, Hq, D)).astype(np.float32)
    sl = rng.uniform(0.01, 0.3, (4, Hq))
    for dt in (np.float32, np.float64):
        for kw in [{}, dict(alibi_slopes=sl, softcap=5.0, window=(20, 0))]:
            for ns in (1, 3):
                o, lse = mha_ext.attention_kvcache(q.astype(dt), kp.astype(dt), vp.astype(dt),
                                                   seq, block_table=table, num_splits=ns,
                                                   return_lse=True, **kw)
                o2 = mha_ext.attention_kvcache(q.astype(dt), kc.astype(dt), vc.astype(dt),
                                               seq, num_splits=ns, **kw)
                r, _, rl = attention_ref(q, kc, vc, key_lengths=seq, causal=True,
                                         layout="blhd", **kw)
                fin = np.isfinite(rl)
                errs += [float(np.abs(o - r).max()), float(np.abs(o2 - r).max()),
                         float(np.abs(lse[fin] - rl[fin]).max())]
    o = mha_ext.attention(q, kc, vc, layout="blhd", key_lengths=seq, causal=True)
    r = attention_ref(q, kc, vc, key_lengths=seq, causal=True, layout="blhd")[0]
    errs.append(float(np.abs(o - r).max()))
print(json.dumps({"simd": mha_ext.build_info()["simd"], "err": max(errs)}))
"""


@pytest.mark.parametrize("path", mha_ext.build_info()["simd_supported"])
def test_span_every_isa_path(path):
    env = dict(os.environ, MHA_EXT_SIMD=path)
    here = os.path.dirname(os.path.abspath(__file__))
    res = subprocess.run(
        [sys.executable, "-c", _PATH_SCRIPT, here], env=env, capture_output=True, text=True,
        check=True,
    )
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["simd"] == path
    assert got["err"] < 1e-5, got


@pytest.mark.parametrize("D", [1, 3, 17])
def test_span_small_and_strided_heads(rng, monkeypatch, D):
    """Head dims below / not a multiple of the vector width, one-key caches, and caches whose
    head rows are a slice of wider rows (head stride > D: still interleaved per key)."""
    Hq, Hk = 4, 2
    wide_k = rng.standard_normal((2, 40, Hk, D + 5)).astype(np.float32)
    wide_v = rng.standard_normal((2, 40, Hk, D + 2)).astype(np.float32)
    kc, vc = wide_k[..., :D], wide_v[..., :D]
    for seqlens in (np.array([1, 0]), np.array([40, 17])):
        for Lq in (1, 2):
            q = rng.standard_normal((2, Lq, Hq, D)).astype(np.float32)
            def call():
                return mha_ext.attention_kvcache(q, kc, vc, seqlens, return_lse=True)
            o, lse = call()
            r, _, rl = attention_ref(q, kc, vc, key_lengths=seqlens, causal=True, layout="blhd")
            np.testing.assert_allclose(o, r, rtol=1e-5, atol=1e-5)
            _lse_close(lse, rl)
            o_old, _ = _old(call, monkeypatch)
            np.testing.assert_allclose(o, o_old, rtol=1e-5, atol=1e-5)
