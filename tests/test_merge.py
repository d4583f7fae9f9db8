"""mha_ext.merge: partial results over disjoint key shards, combined by lse (SPEC 6.1).

Checked against the float64 reference over the concatenated keys, for every dtype, layout and
rank, with empty parts, all-empty rows, NaN parts and bad inputs.
"""

from __future__ import annotations

import mha_ext
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import assert_out_close, attention_ref, random_inputs

DTYPES = [np.float32, np.float64, np.float16, ml_dtypes.bfloat16]


def shard(k, v, bounds, layout):
    """k, v split along the key axis at bounds (a list of (start, stop))."""
    axis = k.ndim - 2 if layout == "bhld" else k.ndim - 3
    take = lambda a, s: np.take(a, np.arange(s[0], s[1]), axis=axis)
    return [(take(k, s), take(v, s)) for s in bounds]


def split_points(lk, n):
    edges = np.linspace(0, lk, n + 1).round().astype(int)
    return list(zip(edges[:-1], edges[1:]))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
@pytest.mark.parametrize("parts", [1, 2, 5])
def test_merge_equals_attention_over_all_keys(rng, dtype, layout, parts):
    B, H, Lq, Lk, D, Dv = 2, 3, 7, 97, 24, 20
    if layout == "bhld":
        shapes = (B, H, Lq, D), (B, H, Lk, D), (B, H, Lk, Dv)
    else:
        shapes = (B, Lq, H, D), (B, Lk, H, D), (B, Lk, H, Dv)
    q, k, v = random_inputs(rng, *shapes, dtype=dtype)
    res = [
        mha_ext.attention(q, ks, vs, return_lse=True, layout=layout)
        for ks, vs in shard(k, v, split_points(Lk, parts), layout)
    ]
    out, lse = mha_ext.merge([o for o, _ in res], [l for _, l in res], layout=layout)
    assert out.dtype == np.dtype(dtype)
    assert lse.dtype == (np.float64 if dtype == np.float64 else np.float32)
    _, _, ref_lse = attention_ref(q, k, v, layout=layout)
    assert_out_close(out, q, k, v, layout=layout)
    tol = 1e-12 if dtype == np.float64 else 1e-5 if dtype == np.float32 else 2e-2
    np.testing.assert_allclose(lse, ref_lse, rtol=tol, atol=tol)


@pytest.mark.parametrize("rank", [2, 3])
def test_lower_ranks(rng, rank):
    shapes = [(5, 16), (40, 16), (40, 8)] if rank == 2 else [(3, 5, 16), (3, 40, 16), (3, 40, 8)]
    q, k, v = random_inputs(rng, *shapes)
    ax = rank - 2
    res = [
        mha_ext.attention(q, np.take(k, range(a, b), axis=ax), np.take(v, range(a, b), axis=ax),
                          return_lse=True)
        for a, b in [(0, 13), (13, 40)]
    ]
    out, lse = mha_ext.merge([o for o, _ in res], [l for _, l in res])
    ref_out, _, ref_lse = attention_ref(q, k, v)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)
    assert out.shape == ref_out.shape
    assert lse.shape == ref_lse.shape


def test_masked_parts_and_causal_shards(rng):
    """Causal over shards: shard p's keys get the causal rule of their global positions."""
    B, H, L, D = 1, 2, 33, 16
    q, k, v = random_inputs(rng, (B, H, L, D), (B, H, L, D), (B, H, L, D))
    full = mha_ext.attention(q, k, v, causal=True)
    pos = np.arange(L)
    res = []
    for a, b in [(0, 10), (10, 20), (20, 33)]:
        mask = pos[:, None] >= pos[None, a:b]  # (Lq, Lk_p): query i sees key j <= i
        res.append(
            mha_ext.attention(q, k[:, :, a:b], v[:, :, a:b], mask=mask, return_lse=True)
        )
    # Row 0..9 see nothing in the last shard: its lse is -inf there and must contribute 0.
    assert np.isneginf(res[2][1][..., :20]).all()
    out, _ = mha_ext.merge([o for o, _ in res], [l for _, l in res])
    np.testing.assert_allclose(out, full, rtol=1e-5, atol=1e-5)


def test_neg_inf_parts_contribute_nothing_even_with_garbage(rng):
    q = rng.standard_normal((1, 1, 4, 8)).astype(np.float32)
    o1, l1 = mha_ext.attention(q, q, q, return_lse=True)
    junk = np.full_like(o1, np.nan)
    out, lse = mha_ext.merge([o1, junk], [l1, np.full_like(l1, -np.inf)])
    np.testing.assert_array_equal(out, o1)
    np.testing.assert_array_equal(lse, l1)


def test_all_empty_rows_give_zero_and_neg_inf(rng):
    o = rng.standard_normal((2, 3, 8)).astype(np.float32)
    l = np.full((2, 3), -np.inf, np.float32)
    l[0, 1] = 0.5
    out, lse = mha_ext.merge([o, o], [l, l])
    assert (out[l == -np.inf] == 0).all()
    assert np.isneginf(lse[l == -np.inf]).all()
    np.testing.assert_allclose(out[0, 1], o[0, 1], rtol=1e-6)
    np.testing.assert_allclose(lse[0, 1], 0.5 + np.log(2), rtol=1e-6)


def test_nan_lse_poisons_only_its_row(rng):
    o = rng.standard_normal((1, 2, 3, 4)).astype(np.float32)
    l = rng.standard_normal((1, 2, 3)).astype(np.float32)
    l2 = l.copy()
    l2[0, 1, 2] = np.nan
    out, lse = mha_ext.merge([o, o], [l, l2])
    assert np.isnan(out[0, 1, 2]).all()
    assert np.isnan(lse[0, 1, 2])
    finite = np.ones((1, 2, 3), bool)
    finite[0, 1, 2] = False
    assert np.isfinite(out[finite]).all()
    assert np.isfinite(lse[finite]).all()


def test_strided_and_float64_lse_inputs(rng):
    """Views of the parts are read through strides; float64 lses of float32 parts convert."""
    q, k, v = random_inputs(rng, (2, 4, 6, 16), (2, 4, 30, 16), (2, 4, 30, 16))
    res = [mha_ext.attention(q, k[:, :, a:b], v[:, :, a:b], return_lse=True)
           for a, b in [(0, 11), (11, 30)]]
    big = [np.concatenate([o, o], axis=-1)[..., ::2] for o, _ in res]  # non-contiguous
    out, _ = mha_ext.merge(big, [l.astype(np.float64) for _, l in res])
    ref = attention_ref(q, k, v)[0]
    np.testing.assert_allclose(out, np.concatenate([ref, ref], axis=-1)[..., ::2],
                               rtol=1e-5, atol=1e-5)


def test_threads_give_identical_results(rng):
    o = [rng.standard_normal((4, 8, 64, 64)).astype(np.float32) for _ in range(3)]
    l = [rng.standard_normal((4, 8, 64)).astype(np.float32) for _ in range(3)]
    a, la = mha_ext.merge(o, l, num_threads=1)
    b, lb = mha_ext.merge(o, l, num_threads=2)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)


def test_errors_name_the_part(rng):
    o = rng.standard_normal((1, 2, 3, 4)).astype(np.float32)
    l = rng.standard_normal((1, 2, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="at least one"):
        mha_ext.merge([], [])
    with pytest.raises(ValueError, match="lses: expected 2"):
        mha_ext.merge([o, o], [l])
    with pytest.raises(ValueError, match=r"outs\[1\]: shape \(1, 2, 3, 5\) differs"):
        mha_ext.merge([o, np.zeros((1, 2, 3, 5), np.float32)], [l, l])
    with pytest.raises(TypeError, match=r"outs\[1\]: dtype float64 differs"):
        mha_ext.merge([o, o.astype(np.float64)], [l, l])
    with pytest.raises(ValueError, match=r"lses\[0\]: expected shape \(1, 2, 3\)"):
        mha_ext.merge([o], [l[..., :2]])
    with pytest.raises(TypeError, match=r"outs\[0\]: expected float32"):
        mha_ext.merge([o.astype(np.int32)], [l])
    with pytest.raises(TypeError, match=r"lses\[0\]: expected a float array"):
        mha_ext.merge([o], [l.astype(np.int64)])
    with pytest.raises(ValueError, match="dimensions"):
        mha_ext.merge([o[0, 0, 0]], [l[0, 0]])
    with pytest.raises(ValueError, match="layout"):
        mha_ext.merge([o], [l], layout="lbhd")
    with pytest.raises(TypeError, match="outs: expected a list"):
        mha_ext.merge(o, [l])


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    lk=st.integers(1, 70),
    cuts=st.lists(st.integers(0, 70), max_size=5),
    lq=st.integers(1, 9),
    causal=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_shard_splits(lk, cuts, lq, causal, seed):
    """Any split of the keys, empty shards included, merges to the unsplit result."""
    rng = np.random.default_rng(seed)
    q, k, v = random_inputs(rng, (1, 2, lq, 8), (1, 2, lk, 8), (1, 2, lk, 5))
    edges = sorted({0, lk, *[c for c in cuts if c <= lk]})
    off = lk - lq  # bottom-right causal: query i sees key j <= i + off
    res = []
    for a, b in zip(edges[:-1], edges[1:]):
        mask = None
        if causal:
            mask = np.arange(a, b)[None, :] <= np.arange(lq)[:, None] + off
        res.append(mha_ext.attention(q, k[:, :, a:b], v[:, :, a:b], mask=mask, return_lse=True))
    out, lse = mha_ext.merge([o for o, _ in res], [l for _, l in res])
    ref_out, _, ref_lse = mha_ext.attention(q, k, v, causal=causal, return_lse=True,
                                            return_weights=True)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)


def merge_ref(outs, lses):
    """float64 merge straight from the formula (-inf parts nothing, all -inf: 0 / -inf)."""
    l = np.stack([np.asarray(x, np.float64) for x in lses])
    o = np.stack([np.asarray(x).astype(np.float64) for x in outs])
    m = l.max(axis=0)
    ms = np.where(np.isneginf(m), 0.0, m)
    w = np.exp(l - ms)
    tot = w.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = np.where(np.isneginf(m), -np.inf, ms + np.log(tot))
        wn = np.where(np.isneginf(l), 0.0, w / np.where(tot == 0, 1, tot))
    out = np.einsum("p...,p...d->...d", wn, np.where(np.isneginf(l)[..., None], 0.0, o))
    return out, lse


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape, parts", [((2, 3, 37, 100), 3), ((1, 2, 5, 3), 2),
                                          ((4, 16, 256, 128), 2), ((2, 4, 130, 72), 5),
                                          ((2, 8, 320, 200), 3)])
def test_every_path_against_the_formula(rng, simd, dtype, shape, parts):
    """Each CPU path's merge kernel (kernel/merge.h): row blocks that end mid-block, head dims
    off the vector width, outputs large enough for the threaded, non-temporal store path (8 MB
    for float32; rows one after another run as flat blocks, Dv = 200 puts row ends inside a
    vector), -inf parts, all-empty rows and NaN rows (their blocks go row by row)."""
    outs = [rng.standard_normal(shape).astype(dtype) for _ in range(parts)]
    lses = [(3 * rng.standard_normal(shape[:3])).astype(np.float64 if dtype == np.float64
                                                       else np.float32) for _ in range(parts)]
    lses[0][0, 0, :4] = -np.inf            # one part empty
    for x in lses:
        x[0, -1, -1] = -np.inf             # every part empty
    lses[-1][-1, 0, 1] = np.nan            # a NaN row
    out, lse = mha_ext.merge(outs, lses, num_threads=2)
    ref_out, ref_lse = merge_ref(outs, lses)
    assert out.dtype == np.dtype(dtype) and out.shape == shape
    nan_row = np.zeros(shape[:3], bool)
    nan_row[-1, 0, 1] = True
    assert np.isnan(out[nan_row]).all() and np.isnan(lse[nan_row]).all()
    assert (out[0, -1, -1] == 0).all() and np.isneginf(lse[0, -1, -1])
    tol = 1e-12 if dtype == np.float64 else 1e-5 if dtype == np.float32 else 2e-2
    ok = ~nan_row
    np.testing.assert_allclose(out[ok].astype(np.float64), ref_out[ok], rtol=tol, atol=tol)
    np.testing.assert_allclose(lse[ok], ref_lse[ok], rtol=tol, atol=tol)
    # The same into a caller's buffer that is not vector-aligned (one element in).
    raw = np.zeros(int(np.prod(shape)) + 1, dtype)
    buf = raw[1:].reshape(shape)
    out2, lse2 = mha_ext.merge(outs, lses, num_threads=2, out=buf)
    assert out2 is buf
    np.testing.assert_array_equal(out2[ok], out[ok])
    np.testing.assert_array_equal(lse2, lse)


def test_out_is_checked(rng):
    o = [rng.standard_normal((2, 3, 4, 8)).astype(np.float32) for _ in range(2)]
    l = [rng.standard_normal((2, 3, 4)).astype(np.float32) for _ in range(2)]
    ref, _ = mha_ext.merge(o, l)
    buf = np.empty_like(ref)
    got, _ = mha_ext.merge(o, l, out=buf)
    assert got is buf
    np.testing.assert_array_equal(buf, ref)
    with pytest.raises(ValueError, match="out: expected shape"):
        mha_ext.merge(o, l, out=np.empty((2, 3, 4, 7), np.float32))
    with pytest.raises(TypeError, match="out: expected dtype"):
        mha_ext.merge(o, l, out=np.empty((2, 3, 4, 8), np.float64))
    with pytest.raises(ValueError, match="C-contiguous"):
        mha_ext.merge(o, l, out=np.empty((2, 3, 4, 16), np.float32)[..., ::2])
    ro = np.empty_like(ref)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        mha_ext.merge(o, l, out=ro)
    with pytest.raises(ValueError, match="share memory"):
        mha_ext.merge(o, l, out=o[1])
    with pytest.raises(TypeError, match="out: expected a NumPy array"):
        mha_ext.merge(o, l, out=[0.0])
