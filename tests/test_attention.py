"""Core ``mha_ext.attention`` against the float64 reference: shapes, layouts, ranks, dtypes,
returns, ``out=``, strided and read-only inputs, threads (SPEC section 3)."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import mha_ext
import ml_dtypes
import numpy as np
import pytest
from reference import assert_out_close, attention_ref, random_inputs, to_bhld

DTYPES = [np.float32, np.float64, np.float16, ml_dtypes.bfloat16]
DTYPE_IDS = ["f32", "f64", "f16", "bf16"]


def _shapes(B, Hq, Hk, Lq, Lk, D, Dv, layout="bhld"):
    if layout == "bhld":
        return (B, Hq, Lq, D), (B, Hk, Lk, D), (B, Hk, Lk, Dv)
    return (B, Lq, Hq, D), (B, Lk, Hk, D), (B, Lk, Hk, Dv)


# ------------------------------------------------------------------------------------------
# Sequence lengths, including Lq != Lk both ways and tile-crossing sizes.


@pytest.mark.parametrize(
    ("Lq", "Lk"),
    [(1, 1), (7, 7), (97, 97), (1, 7), (7, 1), (1, 97), (97, 7), (7, 97), (49, 130), (130, 49)],
)
@pytest.mark.parametrize("causal", [False, True])
def test_seqlens(rng, device, Lq, Lk, causal):
    q, k, v = random_inputs(rng, *_shapes(2, 3, 3, Lq, Lk, 32, 32))
    out = mha_ext.attention(q, k, v, causal=causal, device=device)
    assert_out_close(out, q, k, v, causal=causal)


@pytest.mark.parametrize(("Lq", "Lk"), [(1025, 1025), (1, 1025), (1025, 97)])
@pytest.mark.parametrize("causal", [False, True])
def test_long_seqlens(rng, device, Lq, Lk, causal):
    q, k, v = random_inputs(rng, *_shapes(1, 2, 1, Lq, Lk, 64, 64))
    out = mha_ext.attention(q, k, v, causal=causal, device=device)
    assert_out_close(out, q, k, v, causal=causal)


def test_seqlen_above_65536(rng):
    """Decode over a key axis longer than 2**16 (64-bit indexing), with a padded batch."""
    Lk = 70_001
    q, k, v = random_inputs(rng, (2, 2, 1, 8), (2, 1, Lk, 8), (2, 1, Lk, 4))
    kw = {"key_lengths": np.array([Lk, 66_000]), "causal": True}
    out, lse = mha_ext.attention(q, k, v, return_lse=True, **kw)
    ref_out, _, ref_lse = attention_ref(q, k, v, **kw)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True])
def test_long_seqlens_slow(rng, device, causal):
    q, k, v = random_inputs(rng, *_shapes(1, 4, 2, 4096, 4096, 64, 64))
    out = mha_ext.attention(q, k, v, causal=causal, device=device)
    assert_out_close(out, q, k, v, causal=causal)


# ------------------------------------------------------------------------------------------
# Head dims: 1, awkward sizes, above a tile, Dv != D.


@pytest.mark.parametrize(
    ("D", "Dv"),
    [
        (1, 1),
        (16, 16),
        (80, 80),
        (128, 128),
        (130, 130),
        (16, 80),
        (80, 16),
        (130, 3),
        (1, 130),
        (64, 256),
    ],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_head_dims(rng, device, D, Dv, dtype):
    q, k, v = random_inputs(rng, *_shapes(2, 2, 2, 53, 71, D, Dv), dtype=dtype)
    out = mha_ext.attention(q, k, v, device=device)
    assert out.shape == (2, 2, 53, Dv)
    assert_out_close(out, q, k, v)


# ------------------------------------------------------------------------------------------
# Grouped-query / multi-query attention.


@pytest.mark.parametrize(("Hq", "Hk"), [(8, 2), (8, 1), (4, 4), (6, 3), (3, 1)])
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa(rng, device, Hq, Hk, layout, causal):
    q, k, v = random_inputs(rng, *_shapes(2, Hq, Hk, 33, 45, 16, 24, layout))
    out = mha_ext.attention(q, k, v, causal=causal, layout=layout, device=device)
    assert_out_close(out, q, k, v, causal=causal, layout=layout)


def test_gqa_head_mapping(rng):
    """Query head h reads kv head h // (Hq // Hk): make each kv head's v a constant."""
    Hq, Hk = 8, 2
    q, k, _ = random_inputs(rng, (1, Hq, 5, 8), (1, Hk, 6, 8), (1, Hk, 6, 4))
    v = np.broadcast_to(np.arange(Hk, dtype=np.float32)[None, :, None, None] + 1.0, (1, Hk, 6, 4))
    out = mha_ext.attention(q, k, np.ascontiguousarray(v))
    expected = (np.arange(Hq) // (Hq // Hk) + 1.0)[None, :, None, None]
    np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), rtol=1e-6)


# ------------------------------------------------------------------------------------------
# Layouts and ranks.


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
@pytest.mark.parametrize("rank", [2, 3, 4])
@pytest.mark.parametrize("causal", [False, "top_left"])
def test_layouts_and_ranks(rng, device, layout, rank, causal):
    B, Hq, Hk, Lq, Lk, D, Dv = 2, 4, 2, 19, 23, 16, 8
    if rank < 4:
        B = 1
    if rank < 3:
        Hq = Hk = 1
    if rank == 2:
        shapes = [(Lq, D), (Lk, D), (Lk, Dv)]
    else:
        shapes = [s[4 - rank :] for s in _shapes(B, Hq, Hk, Lq, Lk, D, Dv, layout)]
    q, k, v = random_inputs(rng, *shapes)
    out, w, lse = mha_ext.attention(
        q,
        k,
        v,
        causal=causal,
        layout=layout,
        device=device,
        return_weights=True,
        return_lse=True,
    )
    ref_out, ref_w, ref_lse = attention_ref(q, k, v, causal=causal, layout=layout)
    expect_out = {
        ("bhld", 4): (B, Hq, Lq, Dv),
        ("blhd", 4): (B, Lq, Hq, Dv),
        ("bhld", 3): (Hq, Lq, Dv),
        ("blhd", 3): (Lq, Hq, Dv),
        ("bhld", 2): (Lq, Dv),
        ("blhd", 2): (Lq, Dv),
    }[layout, rank]
    assert out.shape == expect_out
    assert w.shape == (B, Hq, Lq, Lk)[4 - rank :]
    assert lse.shape == (B, Hq, Lq)[4 - rank :]
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(w, ref_w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_blhd_equals_bhld(rng):
    """The same data in both layouts gives the same numbers (read through strides)."""
    q, k, v = random_inputs(rng, (2, 4, 37, 16), (2, 2, 41, 16), (2, 2, 41, 12))
    a = mha_ext.attention(q, k, v, causal=True)
    qt, kt, vt = (np.ascontiguousarray(x.swapaxes(1, 2)) for x in (q, k, v))
    b = mha_ext.attention(qt, kt, vt, causal=True, layout="blhd")
    np.testing.assert_allclose(b.swapaxes(1, 2), a, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------
# dtypes: float32 / float64 tolerances, float16 / bfloat16 by the 2x-naive rule.


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("Lq", "Lk", "D"), [(1, 1, 16), (7, 97, 80), (97, 97, 64), (130, 33, 128)])
@pytest.mark.parametrize("causal", [False, True])
def test_dtypes(rng, device, dtype, Lq, Lk, D, causal):
    q, k, v = random_inputs(rng, *_shapes(2, 4, 2, Lq, Lk, D, D), dtype=dtype)
    out = mha_ext.attention(q, k, v, causal=causal, device=device)
    assert out.dtype == np.dtype(dtype)
    assert_out_close(out, q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16], ids=["f16", "bf16"])
def test_low_precision_long(rng, device, dtype):
    q, k, v = random_inputs(rng, *_shapes(1, 2, 2, 257, 1025, 64, 64), dtype=dtype)
    out = mha_ext.attention(q, k, v, device=device)
    assert_out_close(out, q, k, v)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dtypes_with_mask_and_bias(rng, device, dtype):
    q, k, v = random_inputs(rng, *_shapes(2, 4, 2, 29, 70, 32, 32), dtype=dtype)
    mask = rng.random((2, 1, 29, 70)) < 0.7
    bias = rng.standard_normal((4, 1, 70)).astype(np.float32)
    kw = {"mask": mask, "bias": bias, "causal": True, "key_lengths": np.array([70, 50])}
    out = mha_ext.attention(q, k, v, device=device, **kw)
    assert_out_close(out, q, k, v, **kw)


# ------------------------------------------------------------------------------------------
# return_weights / return_lse.


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("rw", "rl"), [(False, False), (True, False), (False, True), (True, True)])
def test_returns(rng, device, dtype, rw, rl):
    B, Hq, Hk, Lq, Lk, D = 2, 4, 2, 21, 75, 16
    q, k, v = random_inputs(rng, *_shapes(B, Hq, Hk, Lq, Lk, D, 8), dtype=dtype)
    mask = rng.random((Lq, Lk)) < 0.8
    res = mha_ext.attention(
        q, k, v, mask=mask, causal=True, return_weights=rw, return_lse=rl, device=device
    )
    ref_out, ref_w, ref_lse = attention_ref(q, k, v, mask=mask, causal=True)
    acc = np.float64 if dtype == np.float64 else np.float32
    tol = 1e-12 if dtype == np.float64 else 1e-5
    if not rw and not rl:
        assert isinstance(res, np.ndarray)
        out = res
    else:
        assert isinstance(res, tuple)
        assert len(res) == 1 + rw + rl
        out = res[0]
        rest = list(res[1:])
        if rw:
            w = rest.pop(0)
            assert w.dtype == acc
            assert w.shape == (B, Hq, Lq, Lk)
            # Weights come from scores computed in the accumulation type: 1e-5 for all
            # non-float64 inputs (the inputs themselves are exact in float32).
            np.testing.assert_allclose(w, ref_w, rtol=tol, atol=tol)
            np.testing.assert_allclose(w.sum(-1), np.ones((B, Hq, Lq)), rtol=tol * 10)
        if rl:
            lse = rest.pop(0)
            assert lse.dtype == acc
            assert lse.shape == (B, Hq, Lq)
            np.testing.assert_allclose(lse, ref_lse, rtol=tol, atol=tol)
    assert out.dtype == np.dtype(dtype)
    assert_out_close(out, q, k, v, ref_out=ref_out, mask=mask, causal=True)


def test_lse_includes_scale(rng):
    q, k, v = random_inputs(rng, (1, 2, 9, 16), (1, 2, 11, 16), (1, 2, 11, 16))
    for scale in (None, 0.3, 2.0):
        _, lse = mha_ext.attention(q, k, v, scale=scale, return_lse=True)
        s = scale if scale is not None else 0.25
        scores = np.einsum("bhid,bhjd->bhij", q.astype(np.float64), k.astype(np.float64)) * s
        expected = np.log(np.exp(scores).sum(-1))
        np.testing.assert_allclose(lse, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------
# out=


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("rank", "layout"), [(4, "bhld"), (4, "blhd"), (3, "blhd"), (2, "bhld")])
def test_out_param(rng, device, dtype, rank, layout):
    q, k, v = random_inputs(rng, *_shapes(1, 2, 2, 13, 17, 8, 6, layout), dtype=dtype)
    if rank < 4:
        q, k, v = (x[0] for x in (q, k, v))
    if rank < 3:
        q, k, v = (x[:, 0] if layout == "blhd" else x[0] for x in (q, k, v))
    expected = mha_ext.attention(q, k, v, layout=layout, device=device)
    out = np.full(expected.shape, 7, dtype=dtype)  # stale contents must be overwritten
    res = mha_ext.attention(q, k, v, layout=layout, device=device, out=out)
    assert res is out
    np.testing.assert_array_equal(out.astype(np.float64), expected.astype(np.float64))
    res = mha_ext.attention(q, k, v, layout=layout, device=device, out=out, return_lse=True)
    assert res[0] is out


# ------------------------------------------------------------------------------------------
# Strided, read-only inputs; inputs never modified.


def _views(rng, dtype):
    """(name, q, k, v) with awkward strides; all in bhld order."""
    B, Hq, Hk, Lq, Lk, D, Dv = 2, 4, 2, 23, 31, 16, 12
    base = random_inputs(rng, *_shapes(B, Hq, Hk, Lq, Lk, D, Dv), dtype=dtype)
    out = [("contiguous", *base)]
    # Transposed: a bhld view of blhd memory.
    out.append(
        ("transposed", *(np.ascontiguousarray(x.swapaxes(1, 2)).swapaxes(1, 2) for x in base))
    )
    # Sliced with steps on every axis, including the last one (not contiguous).
    big = random_inputs(
        rng,
        (2 * B, Hq, 2 * Lq, 3 * D),
        (2 * B, Hk, 2 * Lk, 3 * D),
        (2 * B, Hk, 2 * Lk, 2 * Dv),
        dtype=dtype,
    )
    out.append(
        ("stepped", big[0][::2, :, ::2, ::3], big[1][::2, :, ::2, ::3], big[2][::2, :, ::2, ::2])
    )
    # Sliced rows only: last axis contiguous, padded rows.
    out.append(
        (
            "row_sliced",
            big[0][1::2, :, 1::2, 5 : 5 + D],
            big[1][::2, :, ::2, :D],
            big[2][::2, :, ::2, 3 : 3 + Dv],
        )
    )
    # Negative strides.
    out.append(
        ("negative", base[0][::-1, :, ::-1], base[1][:, ::-1, ::-1], base[2][:, ::-1, ::-1, ::-1])
    )
    # Fortran order.
    out.append(("fortran", *(np.asfortranarray(x) for x in base)))
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_non_contiguous_views(rng, device, dtype):
    for name, q, k, v in _views(rng, dtype):
        out = mha_ext.attention(q, k, v, causal=True, device=device)
        assert out.flags.c_contiguous, name
        expected = mha_ext.attention(
            *(np.ascontiguousarray(x) for x in (q, k, v)), causal=True, device=device
        )
        np.testing.assert_allclose(
            out.astype(np.float64), expected.astype(np.float64), rtol=1e-6, atol=1e-6, err_msg=name
        )
        assert_out_close(out, q, k, v, causal=True)


def test_blhd_views(rng):
    """blhd layout given as transposed views of bhld memory, and the other way round."""
    q, k, v = random_inputs(rng, (2, 4, 23, 16), (2, 2, 31, 16), (2, 2, 31, 8))
    views = [x.swapaxes(1, 2) for x in (q, k, v)]  # blhd logical, bhld memory
    out = mha_ext.attention(*views, layout="blhd", causal=True)
    assert_out_close(out, *views, layout="blhd", causal=True)


def test_clean_exit_after_strided_call():
    """A call that takes the copy path must not break interpreter shutdown (exit code 0)."""
    code = (
        "import numpy as np, mha_ext\n"
        "q = np.ones((2, 3, 8), np.float32)[..., ::2]\n"
        "mha_ext.attention(q, q, q)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_read_only_inputs(rng, device):
    q, k, v = random_inputs(rng, (2, 4, 17, 16), (2, 2, 19, 16), (2, 2, 19, 16))
    mask = rng.random((17, 19)) < 0.8
    bias = rng.standard_normal((4, 17, 19))
    kl = np.array([19, 11])
    for x in (q, k, v, mask, bias, kl):
        x.setflags(write=False)
    kw = {"mask": mask, "bias": bias, "key_lengths": kl, "causal": True}
    out = mha_ext.attention(q, k, v, device=device, **kw)
    assert_out_close(out, q, k, v, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_inputs_not_modified(rng, device, dtype):
    q, k, v = random_inputs(rng, (2, 4, 29, 16), (2, 2, 70, 16), (2, 2, 70, 8), dtype=dtype)
    mask = rng.random((2, 1, 29, 70)) < 0.8
    bias = rng.standard_normal((4, 29, 70)).astype(np.float32)
    kl = np.array([70, 40], dtype=np.int32)
    gen = mha_ext.Additive(
        rng.standard_normal((16, 5)), rng.standard_normal((16, 5)), rng.standard_normal(5)
    )
    arrays = [q, k, v, mask, bias, kl, gen.W_q, gen.W_k, gen.w]
    copies = [a.copy() for a in arrays]
    for score in (None, gen):
        mha_ext.attention(
            q,
            k,
            v,
            mask=mask,
            bias=bias,
            key_lengths=kl,
            causal=True,
            window=(9, 3),
            score=score,
            return_weights=True,
            return_lse=True,
            device=device,
        )
    # Strided views too (the copy path must not write back).
    qv = q[:, :, ::-1]
    mha_ext.attention(qv, k, v, device=device)
    for a, c in zip(arrays, copies):
        assert a.dtype == c.dtype
        np.testing.assert_array_equal(a.view(np.uint8), c.view(np.uint8))


# ------------------------------------------------------------------------------------------
# Threads: same numbers with 1 and 2 threads.


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16], ids=["f32", "f64", "f16"])
def test_num_threads_identical(rng, dtype):
    q, k, v = random_inputs(rng, (2, 4, 150, 32), (2, 2, 170, 32), (2, 2, 170, 16), dtype=dtype)
    mask = rng.random((2, 1, 150, 170)) < 0.9
    kw = {
        "mask": mask,
        "causal": True,
        "key_lengths": np.array([170, 120]),
        "return_weights": True,
        "return_lse": True,
    }
    r1 = mha_ext.attention(q, k, v, num_threads=1, **kw)
    r2 = mha_ext.attention(q, k, v, num_threads=2, **kw)
    r0 = mha_ext.attention(q, k, v, **kw)
    for a, b, c in zip(r1, r2, r0):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_default_scale_is_inverse_sqrt_d(rng):
    q, k, v = random_inputs(rng, (1, 2, 9, 80), (1, 2, 9, 80), (1, 2, 9, 8))
    a = mha_ext.attention(q, k, v)
    b = mha_ext.attention(q, k, v, scale=1 / np.sqrt(80))
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_to_bhld_roundtrip_helper():
    """Sanity check of the reference's own layout helper (guards the other tests)."""
    x = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    assert to_bhld(x, "blhd").shape == (2, 4, 3, 5)
    assert to_bhld(x[0], "blhd").shape == (1, 4, 3, 5)
    assert to_bhld(x[0, 0]).shape == (1, 1, 4, 5)


def test_concurrent_python_threads(rng):
    """The GIL is released: concurrent calls from Python threads give the sequential results."""
    problems = [
        random_inputs(rng, (2, 4, 97, 32), (2, 2, 130, 32), (2, 2, 130, 16)) for _ in range(6)
    ]
    expected = [mha_ext.attention(*p, causal=True, num_threads=1) for p in problems]
    with ThreadPoolExecutor(max_workers=3) as pool:
        got = list(pool.map(lambda p: mha_ext.attention(*p, causal=True, num_threads=1), problems))
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)
