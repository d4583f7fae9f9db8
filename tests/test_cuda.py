"""CUDA backend (issue 5): device="cuda" against a float64 NumPy reference and the CPU path.

Every test is marked ``cuda`` and skipped where ``mha_ext.cuda_available()`` is False. The
reference below is self-contained (float64, the obvious way) so this file does not depend on
the CPU tests' helpers. Low precision (float16 / bfloat16) follows FlashAttention's rule: our
max error is at most 2x the error of a naive computation rounded to that dtype at every step,
both measured against the float64 reference.

Two environment knobs of the backend are exercised: MHA_EXT_CUDA_SIMT=1 sends fp16/bf16 to
the generic (non-tensor-core) kernel, MHA_EXT_CUDA_SPLITS=n forces n key chunks (split-KV).

In the host emulation build (MHA_EXT_CUDA_EMULATOR=ON, ``build_info()["cuda_emulated"]``) the
same tests run the same kernel sources on the CPU with the shared-memory race detector on (a
race fails the call). There they are CPU-sized: the long sequences are shorter and the
largest parameter grids are thinned to an evenly spread subset (``emu_subset``); every test
function still runs. MHA_EXT_CUDA_EMU_FULL=1 runs the full-size file in emulation too (long).
On a GPU every case runs at full size.
"""

from __future__ import annotations

import itertools
import os

import mha_ext
import numpy as np
import pytest

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not mha_ext.cuda_available(), reason="needs a CUDA GPU"),
]

try:
    import ml_dtypes

    BF16 = ml_dtypes.bfloat16
except ImportError:  # pragma: no cover - optional dependency
    BF16 = None

LOWP = [np.float16] + ([BF16] if BF16 is not None else [])
ALL_DTYPES = [np.float32, np.float64, *LOWP]

EMULATED = bool(mha_ext.build_info().get("cuda_emulated", False))
_CPU_SIZED = EMULATED and os.environ.get("MHA_EXT_CUDA_EMU_FULL") != "1"


def cpu_sized(full, emulated):
    """full on a GPU, emulated (smaller) in the host emulation."""
    return emulated if _CPU_SIZED else full


def emu_subset(cases, every):
    """All cases on a GPU; every `every`-th of them in the host emulation (every prime to the
    grid's axis lengths spreads the subset over all values of every axis)."""
    cases = list(cases)
    return cases[::every] if _CPU_SIZED else cases


def _id(x):
    if isinstance(x, type):
        return np.dtype(x).name
    return str(x)


# ------------------------------------------------------------------------------------------
# Reference (4-D "bhld" inputs only).


def _visible(B, Hq, Lq, Lk, *, mask, causal, window, key_lengths):
    i = np.arange(Lq)[:, None]
    j = np.arange(Lk)[None, :]
    vis = np.zeros((B, Hq, Lq, Lk), dtype=bool)
    for b in range(B):
        lk = Lk if key_lengths is None else int(key_lengths[b])
        off = 0 if causal == "top_left" else lk - Lq
        vb = j < lk
        if causal:
            vb = vb & (j <= i + off)
        if window is not None:
            left, right = window
            if left is not None and left >= 0:
                vb = vb & (j >= i + off - left)
            if right is not None and right >= 0:
                vb = vb & (j <= i + off + right)
        vis[b] = vb
    if mask is not None:
        vis &= np.broadcast_to(mask, vis.shape)
    return vis


def ref_attention(
    q,
    k,
    v,
    *,
    mask=None,
    bias=None,
    causal=False,
    window=None,
    key_lengths=None,
    scale=None,
    score=None,
):
    """float64 (out, weights, lse) for 4-D bhld inputs."""
    q = q.astype(np.float64)
    k = k.astype(np.float64)
    v = v.astype(np.float64)
    B, Hq, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    k = np.repeat(k, Hq // Hk, axis=1)
    v = np.repeat(v, Hq // Hk, axis=1)
    if score is None:
        s = np.einsum("bhid,bhjd->bhij", q, k) * (1 / np.sqrt(D) if scale is None else scale)
    elif isinstance(score, mha_ext.General):
        W = score.W.astype(np.float64)
        s = np.einsum("bhid,de,bhje->bhij", q, W, k) * (1.0 if scale is None else scale)
    else:
        if isinstance(score, mha_ext.Concat):
            Wq, Wk = score.W[:D].astype(np.float64), score.W[D:].astype(np.float64)
        else:
            Wq, Wk = score.W_q.astype(np.float64), score.W_k.astype(np.float64)
        w = score.w.astype(np.float64)
        t = np.tanh((q @ Wq)[:, :, :, None, :] + (k @ Wk)[:, :, None, :, :])
        s = (t @ w) * (1.0 if scale is None else scale)
    vis = _visible(B, Hq, Lq, Lk, mask=mask, causal=causal, window=window, key_lengths=key_lengths)
    if bias is not None:
        s = s + np.broadcast_to(bias.astype(np.float64), s.shape)
    s = np.where(vis, s, -np.inf)
    m = s.max(axis=-1, keepdims=True) if Lk > 0 else np.full((B, Hq, Lq, 1), -np.inf)
    m = np.where(np.isneginf(m), 0.0, m)
    e = np.where(vis, np.exp(s - m), 0.0)
    l = e.sum(axis=-1, keepdims=True)
    safe = np.where(l == 0, 1.0, l)
    wts = e / safe
    out = wts @ v
    with np.errstate(divide="ignore"):
        lse = np.where(l[..., 0] == 0, -np.inf, np.log(safe[..., 0]) + m[..., 0])
    return out, wts, lse


def naive_lowp(
    q, k, v, dtype, *, mask=None, bias=None, causal=False, window=None, key_lengths=None
):
    """What a NumPy user gets at the input's precision: every step rounded to dtype."""

    def rnd(x):
        return x.astype(np.float32).astype(dtype).astype(np.float32)

    q, k, v = (rnd(x) for x in (q, k, v))
    B, Hq, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    k = np.repeat(k, Hq // Hk, axis=1)
    v = np.repeat(v, Hq // Hk, axis=1)
    s = rnd(rnd(q @ k.swapaxes(-1, -2)) * np.float32(1 / np.sqrt(D)))
    if bias is not None:
        s = rnd(s + np.broadcast_to(bias.astype(np.float32), s.shape))
    vis = _visible(B, Hq, Lq, Lk, mask=mask, causal=causal, window=window, key_lengths=key_lengths)
    s = np.where(vis, s, -np.inf)
    m = np.where(vis.any(-1, keepdims=True), s.max(-1, keepdims=True), 0)
    e = rnd(np.where(vis, np.exp(s - m), 0))
    l = rnd(e.sum(-1, keepdims=True))
    p = rnd(e / np.where(l == 0, 1, l))
    return rnd(p @ v)


def rand(rng, shape, dtype, lo=-1.0, hi=1.0):
    return rng.uniform(lo, hi, size=shape).astype(np.float32).astype(dtype)


def max_err(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b)))


def check_out(out, ref_out, dtype, q, k, v, **masks):
    """float32/64: tight tolerances; fp16/bf16: <= 2x the naive same-precision error."""
    assert out.dtype == np.dtype(dtype)
    assert not np.isnan(np.asarray(out, dtype=np.float64)).any()
    if dtype == np.float64:
        np.testing.assert_allclose(out, ref_out, rtol=1e-10, atol=1e-10)
    elif dtype == np.float32:
        np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    else:
        naive = naive_lowp(q, k, v, dtype, **masks)
        ours = max_err(out, ref_out)
        theirs = max_err(naive, ref_out)
        assert ours <= 2 * theirs + 1e-6, (ours, theirs)


def lse_tol(dtype):
    return 1e-10 if dtype == np.float64 else (1e-5 if dtype == np.float32 else 2e-3)


@pytest.fixture(params=["tc", "simt"])
def path(request, monkeypatch):
    """Both fp16/bf16 kernels: tensor cores (default) and the generic SIMT kernel."""
    if request.param == "simt":
        monkeypatch.setenv("MHA_EXT_CUDA_SIMT", "1")
    else:
        monkeypatch.delenv("MHA_EXT_CUDA_SIMT", raising=False)
    return request.param


# ------------------------------------------------------------------------------------------
# Build facts.


def test_build_info_reports_cuda():
    info = mha_ext.build_info()
    assert info["cuda_built"] is True
    assert info["cuda_available"] is True
    assert len(info["cuda_archs"]) >= 1


# ------------------------------------------------------------------------------------------
# Plain attention over dtypes and head dims.


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("D", [32, 64, 80, 96, 128, 256, 40, 130])
@pytest.mark.parametrize("causal", [False, True])
def test_head_dims_and_dtypes(rng, dtype, D, causal):
    B, H, Lq, Lk = cpu_sized((2, 3, 97, 113), (1, 2, 70, 81))
    q, k, v = (
        rand(rng, (B, H, Lq, D), dtype),
        rand(rng, (B, H, Lk, D), dtype),
        rand(rng, (B, H, Lk, D), dtype),
    )
    out, lse = mha_ext.attention(q, k, v, causal=causal, device="cuda", return_lse=True)
    ref_out, _, ref_lse = ref_attention(q, k, v, causal=causal)
    check_out(out, ref_out, dtype, q, k, v, causal=causal)
    np.testing.assert_allclose(lse, ref_lse, rtol=lse_tol(dtype), atol=lse_tol(dtype))


@pytest.mark.parametrize("dtype", LOWP, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(
    ("Lq", "Lk"),
    [(1, 7), (7, 1), (16, 16), (97, 33)]
    + cpu_sized([(1025, 1025), (64, 1000)], [(200, 200), (64, 400)]),
)
@pytest.mark.parametrize("causal", [False, True, "top_left"])
def test_lowp_lengths_both_kernels(rng, path, dtype, Lq, Lk, causal):
    D = 64
    q, k, v = (
        rand(rng, (1, 2, Lq, D), dtype),
        rand(rng, (1, 2, Lk, D), dtype),
        rand(rng, (1, 2, Lk, D), dtype),
    )
    out = mha_ext.attention(q, k, v, causal=causal, device="cuda")
    ref_out, _, _ = ref_attention(q, k, v, causal=causal)
    check_out(out, ref_out, dtype, q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: np.dtype(d).name)
def test_cpu_cuda_cross_check(rng, dtype):
    B, Hq, Hk, Lq, Lk, D = 2, 4, 2, 70, 150, 64
    q, k, v = (
        rand(rng, (B, Hq, Lq, D), dtype),
        rand(rng, (B, Hk, Lk, D), dtype),
        rand(rng, (B, Hk, Lk, D), dtype),
    )
    mask = rng.random((Lq, Lk)) < 0.8
    bias = rand(rng, (Hq, 1, Lk), np.float32 if dtype != np.float64 else np.float64)
    kw = {
        "mask": mask,
        "bias": bias,
        "causal": True,
        "window": (40, 3),
        "key_lengths": np.array([150, 90]),
        "return_weights": True,
        "return_lse": True,
    }
    cpu = mha_ext.attention(q, k, v, device="cpu", **kw)
    gpu = mha_ext.attention(q, k, v, device="cuda", **kw)
    tol = {np.float64: 1e-10, np.float32: 1e-5}.get(dtype, 1e-2)
    for a, b in zip(cpu, gpu):
        np.testing.assert_allclose(
            np.asarray(b, np.float64), np.asarray(a, np.float64), rtol=tol, atol=tol
        )


# ------------------------------------------------------------------------------------------
# Masks, bias, key_lengths, causal alignments, window, GQA, Dv != D.


@pytest.mark.parametrize(
    ("dtype", "mask_shape", "with_bias"),
    emu_subset(
        itertools.product(
            [np.float32, *LOWP],
            [None, (1, 1, 1, 1), (50,), (40, 50), (2, 1, 40, 50), (2, 4, 40, 50)],
            [False, True],
        ),
        5,
    ),
    ids=_id,
)
def test_masks_and_bias(rng, path, dtype, mask_shape, with_bias):
    B, H, Lq, Lk, D = 2, 4, 40, 50, 64
    q, k, v = (
        rand(rng, (B, H, Lq, D), dtype),
        rand(rng, (B, H, Lk, D), dtype),
        rand(rng, (B, H, Lk, D), dtype),
    )
    mask = None if mask_shape is None else rng.random(mask_shape) < 0.7
    bias = rng.normal(size=(H, Lq, Lk)).astype(np.float32) if with_bias else None
    out = mha_ext.attention(q, k, v, mask=mask, bias=bias, device="cuda")
    ref_out, _, _ = ref_attention(q, k, v, mask=mask, bias=bias)
    check_out(out, ref_out, dtype, q, k, v, mask=mask, bias=bias)


@pytest.mark.parametrize(
    ("dtype", "causal", "window", "lengths"),
    emu_subset(
        itertools.product(
            [np.float32, np.float64, *LOWP],
            [False, True, "top_left"],
            [None, (8, 0), (0, 0), (16, 16), (-1, 5), (30, -1)],
            [(33, 80), (80, 33), (130, 130)],
        ),
        7,
    ),
    ids=_id,
)
def test_key_lengths_causal_window(rng, path, dtype, causal, window, lengths):
    Lq, Lk = lengths
    B, H, D = 3, 2, 64
    q, k, v = (
        rand(rng, (B, H, Lq, D), dtype),
        rand(rng, (B, H, Lk, D), dtype),
        rand(rng, (B, H, Lk, D), dtype),
    )
    kl = np.array([Lk, Lk // 2, 1])
    # Padding keys hold NaN on the device side: they must never be read.
    k_pad, v_pad = k.copy(), v.copy()
    for b in range(B):
        k_pad[b, :, kl[b] :] = np.nan
        v_pad[b, :, kl[b] :] = np.nan
    kw = {"causal": causal, "window": window, "key_lengths": kl}
    out, lse = mha_ext.attention(q, k_pad, v_pad, device="cuda", return_lse=True, **kw)
    ref_out, _, ref_lse = ref_attention(q, k, v, **kw)
    empty = np.isneginf(ref_lse)
    assert np.all(np.asarray(out, np.float64)[empty] == 0)
    assert np.array_equal(np.isneginf(lse), empty)
    check_out(out, ref_out, dtype, q, k, v, **kw)
    np.testing.assert_allclose(
        lse[~empty], ref_lse[~empty], rtol=lse_tol(dtype), atol=lse_tol(dtype)
    )


@pytest.mark.parametrize(
    ("dtype", "heads", "dims"),
    emu_subset(
        itertools.product(
            [np.float32, *LOWP],
            [(8, 2), (6, 1), (4, 4)],
            [(64, 32), (48, 96), (128, 64), (64, 200), (16, 1)],
        ),
        2,
    ),
    ids=_id,
)
def test_gqa_and_value_dim(rng, path, dtype, heads, dims):
    (Hq, Hk), (D, Dv) = heads, dims
    B, Lq, Lk = 2, 45, 77
    q, k, v = (
        rand(rng, (B, Hq, Lq, D), dtype),
        rand(rng, (B, Hk, Lk, D), dtype),
        rand(rng, (B, Hk, Lk, Dv), dtype),
    )
    out = mha_ext.attention(q, k, v, causal=True, device="cuda")
    assert out.shape == (B, Hq, Lq, Dv)
    ref_out, _, _ = ref_attention(q, k, v, causal=True)
    check_out(out, ref_out, dtype, q, k, v, causal=True)


# ------------------------------------------------------------------------------------------
# Weights and lse, score functions.


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: np.dtype(d).name)
def test_weights_and_lse(rng, path, dtype):
    B, H, Lq, Lk, D = 2, 3, 37, 71, 64
    q, k, v = (
        rand(rng, (B, H, Lq, D), dtype),
        rand(rng, (B, H, Lk, D), dtype),
        rand(rng, (B, H, Lk, D), dtype),
    )
    mask = rng.random((Lq, Lk)) < 0.6
    mask[3] = False  # an empty row
    out, w, lse = mha_ext.attention(
        q, k, v, mask=mask, causal=True, device="cuda", return_weights=True, return_lse=True
    )
    ref_out, ref_w, ref_lse = ref_attention(q, k, v, mask=mask, causal=True)
    acc = np.float64 if dtype == np.float64 else np.float32
    assert w.dtype == acc
    assert lse.dtype == acc
    tol = lse_tol(dtype)
    np.testing.assert_allclose(w, ref_w, rtol=tol, atol=tol)
    assert np.all(w[:, :, 3] == 0)
    assert np.all(np.isneginf(lse[:, :, 3]))
    finite = ~np.isneginf(ref_lse)
    np.testing.assert_allclose(lse[finite], ref_lse[finite], rtol=tol, atol=tol)
    check_out(out, ref_out, dtype, q, k, v, mask=mask, causal=True)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("kind", ["general", "additive", "concat"])
def test_score_functions(rng, dtype, kind):
    B, Hq, Hk, Lq, Lk, D, Dk, A = 2, 4, 2, 19, 41, 24, 40, 16
    acc = np.float64 if dtype == np.float64 else np.float32
    q = rand(rng, (B, Hq, Lq, D), dtype)
    k = rand(rng, (B, Hk, Lk, Dk if kind == "general" or kind == "additive" else D), dtype)
    v = rand(rng, (B, Hk, Lk, 20), dtype)
    if kind == "general":
        score = mha_ext.General(rand(rng, (D, Dk), acc))
    elif kind == "additive":
        score = mha_ext.Additive(
            rand(rng, (D, A), acc), rand(rng, (Dk, A), acc), rand(rng, (A,), acc)
        )
    else:
        score = mha_ext.Concat(rand(rng, (2 * D, A), acc), rand(rng, (A,), acc))
    mask = rng.random((Lq, Lk)) < 0.8
    kw = {"score": score, "mask": mask, "causal": "top_left", "key_lengths": np.array([41, 30])}
    out, w, lse = mha_ext.attention(
        q, k, v, device="cuda", return_weights=True, return_lse=True, **kw
    )
    ref_out, ref_w, ref_lse = ref_attention(q, k, v, **kw)
    tol = {np.float64: 1e-10, np.float32: 1e-5}.get(dtype, 1e-2)
    np.testing.assert_allclose(np.asarray(out, np.float64), ref_out, rtol=tol, atol=tol)
    np.testing.assert_allclose(w, ref_w, rtol=tol, atol=tol)
    finite = ~np.isneginf(ref_lse)
    np.testing.assert_allclose(lse[finite], ref_lse[finite], rtol=tol, atol=tol)
    cpu = mha_ext.attention(q, k, v, device="cpu", **kw)
    np.testing.assert_allclose(
        np.asarray(out, np.float64), np.asarray(cpu, np.float64), rtol=tol, atol=tol
    )


# ------------------------------------------------------------------------------------------
# Edge cases: empty rows, Lk = 0, Dv = 0, NaN, layouts and strides, out=.


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: np.dtype(d).name)
def test_lk_zero(dtype):
    q = np.ones((2, 3, 5, 16), dtype=dtype)
    k = np.ones((2, 3, 0, 16), dtype=dtype)
    v = np.ones((2, 3, 0, 8), dtype=dtype)
    out, w, lse = mha_ext.attention(q, k, v, device="cuda", return_weights=True, return_lse=True)
    assert out.shape == (2, 3, 5, 8)
    assert np.all(np.asarray(out, np.float64) == 0)
    assert w.shape == (2, 3, 5, 0)
    assert np.all(np.isneginf(lse))


def test_dv_zero(rng):
    q = rand(rng, (1, 2, 9, 16), np.float32)
    k = rand(rng, (1, 2, 11, 16), np.float32)
    v = np.zeros((1, 2, 11, 0), dtype=np.float32)
    out, lse = mha_ext.attention(q, k, v, device="cuda", return_lse=True)
    assert out.shape == (1, 2, 9, 0)
    _, _, ref_lse = ref_attention(q, k, v)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: np.dtype(d).name)
def test_all_rows_empty_never_nan(path, rng, dtype):
    q, k, v = (
        rand(rng, (1, 2, 70, 64), dtype),
        rand(rng, (1, 2, 90, 64), dtype),
        rand(rng, (1, 2, 90, 64), dtype),
    )
    bias = np.full((70, 90), -np.inf, dtype=np.float32 if dtype != np.float64 else np.float64)
    out, w, lse = mha_ext.attention(
        q, k, v, bias=bias, device="cuda", return_weights=True, return_lse=True
    )
    assert np.all(np.asarray(out, np.float64) == 0)
    assert np.all(w == 0)
    assert np.all(np.isneginf(lse))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: np.dtype(d).name)
def test_nan_poisons_only_its_rows(path, rng, dtype):
    q, k, v = (
        rand(rng, (1, 2, 40, 64), dtype),
        rand(rng, (1, 2, 50, 64), dtype),
        rand(rng, (1, 2, 50, 64), dtype),
    )
    q[0, 1, 7, 3] = np.nan
    out, lse = mha_ext.attention(q, k, v, device="cuda", return_lse=True)
    o = np.asarray(out, np.float64)
    bad = np.isnan(o).any(-1)
    expected = np.zeros((1, 2, 40), dtype=bool)
    expected[0, 1, 7] = True
    assert np.array_equal(bad, expected)
    assert np.array_equal(np.isnan(lse), expected)


@pytest.mark.parametrize("dtype", [np.float32, *LOWP], ids=lambda d: np.dtype(d).name)
def test_layouts_and_strided_views(path, rng, dtype):
    B, L, H, D = 2, 50, 4, 64
    base_q = rand(rng, (B, L, H, D + 8), dtype)
    base_k = rand(rng, (B, 2 * L, H, D), dtype)
    q = base_q[..., 3 : D + 3]  # rows not 16-byte aligned: the plain-load path
    k = base_k[:, ::-2]  # negative sequence stride
    v = rand(rng, (B, L, H, D), dtype)
    out = mha_ext.attention(q, k, v, layout="blhd", causal=True, device="cuda")
    cpu = mha_ext.attention(q, k, v, layout="blhd", causal=True, device="cpu")
    qb, kb, vb = (np.ascontiguousarray(x.swapaxes(1, 2)) for x in (q, k, v))
    ref_out, _, _ = ref_attention(qb, kb, vb, causal=True)
    check_out(out.swapaxes(1, 2), ref_out, dtype, qb, kb, vb, causal=True)
    tol = 1e-5 if dtype == np.float32 else 1e-2
    np.testing.assert_allclose(
        np.asarray(out, np.float64), np.asarray(cpu, np.float64), rtol=tol, atol=tol
    )


@pytest.mark.parametrize("rank", [2, 3])
def test_lower_ranks(rng, rank):
    shape = (30, 32) if rank == 2 else (3, 30, 32)
    q, k, v = (rand(rng, shape, np.float16) for _ in range(3))
    out = mha_ext.attention(q, k, v, device="cuda")
    cpu = mha_ext.attention(q, k, v, device="cpu")
    assert out.shape == shape
    np.testing.assert_allclose(out.astype(np.float64), cpu.astype(np.float64), atol=2e-3)


def test_out_argument(rng):
    q, k, v = (rand(rng, (1, 2, 33, 64), np.float16) for _ in range(3))
    out = np.full((1, 2, 33, 64), 7, dtype=np.float16)
    res = mha_ext.attention(q, k, v, device="cuda", out=out)
    assert res is out
    ref_out, _, _ = ref_attention(q, k, v)
    check_out(out, ref_out, np.float16, q, k, v)


# ------------------------------------------------------------------------------------------
# Decode (Lq small, Lk long): split-KV merged by lse.


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("Lk", cpu_sized([4096, 20000], [1000, 3000]))
def test_decode_split_kv(rng, dtype, Lk):
    B, Hq, Hk, D = 2, 8, 2, 128
    q = rand(rng, (B, Hq, 1, D), dtype)
    k = rand(rng, (B, Hk, Lk, D), dtype)
    v = rand(rng, (B, Hk, Lk, D), dtype)
    kl = np.array([Lk, Lk // 3])
    out, lse = mha_ext.attention(q, k, v, key_lengths=kl, device="cuda", return_lse=True)
    ref_out, _, ref_lse = ref_attention(q, k, v, key_lengths=kl)
    check_out(out, ref_out, dtype, q, k, v, key_lengths=kl)
    np.testing.assert_allclose(lse, ref_lse, rtol=lse_tol(dtype), atol=lse_tol(dtype))


@pytest.mark.parametrize("splits", ["3", "7", "64"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=lambda d: np.dtype(d).name)
def test_forced_splits_with_masks(monkeypatch, rng, splits, dtype):
    monkeypatch.setenv("MHA_EXT_CUDA_SIMT", "1")
    monkeypatch.setenv("MHA_EXT_CUDA_SPLITS", splits)
    B, H, Lq, Lk, D = 2, 2, 9, 300, 40
    q, k, v = (
        rand(rng, (B, H, Lq, D), dtype),
        rand(rng, (B, H, Lk, D), dtype),
        rand(rng, (B, H, Lk, D), dtype),
    )
    mask = rng.random((Lq, Lk)) < 0.5
    mask[2] = False
    kw = {"mask": mask, "causal": True, "window": (100, -1), "key_lengths": np.array([300, 150])}
    out, w, lse = mha_ext.attention(
        q, k, v, device="cuda", return_weights=True, return_lse=True, **kw
    )
    ref_out, ref_w, ref_lse = ref_attention(q, k, v, **kw)
    check_out(out, ref_out, dtype, q, k, v, **kw)
    finite = ~np.isneginf(ref_lse)
    assert np.array_equal(np.isneginf(lse), ~finite)
    tol = lse_tol(dtype)
    np.testing.assert_allclose(lse[finite], ref_lse[finite], rtol=tol, atol=tol)
    np.testing.assert_allclose(w, ref_w, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------
# Split over keys on the tensor-core path (short Lq, long Lk): chunks of whole key tiles on
# gridDim.y, partials merged by lse.


def _launches(log):
    """(kernel name, grid) of every launch in the emulator's launch log."""
    out = []
    for line in log.read_text().splitlines():
        head, name = line.split(" kernel=", 1)
        fields = dict(f.split("=", 1) for f in head.split())
        out.append((name, tuple(int(x) for x in fields["grid"].split(","))))
    return out


@pytest.mark.parametrize("dtype", LOWP, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("D", [64, 96, 128, 256])
@pytest.mark.parametrize("splits", ["1", "3", "8"])
def test_tc_split_over_keys(rng, tmp_path, monkeypatch, dtype, D, splits):
    """Forced key chunks on the tensor-core path agree with the reference and with the
    unsplit kernel, through causal, window, key_lengths, mask, bias, fully masked rows, a
    chunk a row cannot see at all (empty partial), NaN values at hidden keys and lse."""
    monkeypatch.delenv("MHA_EXT_CUDA_SIMT", raising=False)
    monkeypatch.setenv("MHA_EXT_CUDA_SPLITS", splits)
    log = tmp_path / "launches.txt"
    monkeypatch.setenv("MHA_EXT_CUDA_EMU_LOG", str(log))
    B, H, Lq, Lk = 2, 2, cpu_sized(150, 40), cpu_sized(2000, 530)  # Lk: not whole tiles
    q = rand(rng, (B, H, Lq, D), dtype)
    k = rand(rng, (B, H, Lk, D), dtype)
    v = rand(rng, (B, H, Lk, D), dtype)
    kl = np.array([Lk, Lk // 3 + 5])
    mask = rng.random((Lq, Lk)) < 0.8
    mask[3] = False  # a fully masked row
    mask[:, 7] = False
    bias = rand(rng, (H, 1, Lk), np.float32)
    v_nan = v.copy()
    v_nan[:, :, 7] = np.nan  # hidden from every row by the mask
    for b in range(B):
        v_nan[b, :, kl[b] :] = np.inf  # past key_lengths
    kw = {"mask": mask, "bias": bias, "causal": True, "window": (Lk // 4, 0), "key_lengths": kl}
    out, lse = mha_ext.attention(q, k, v_nan, device="cuda", return_lse=True, **kw)
    clean = v.copy()
    clean[:, :, 7] = 0
    ref_out, _, ref_lse = ref_attention(q, k, clean, **kw)
    check_out(out, ref_out, dtype, q, k, clean, **kw)
    finite = ~np.isneginf(ref_lse)
    assert np.array_equal(np.isneginf(lse), ~finite)
    np.testing.assert_allclose(lse[finite], ref_lse[finite], rtol=2e-3, atol=2e-3)
    if EMULATED:
        # n chunks asked for: chunks of ceil(Lk / n) keys rounded up to whole 64-key tiles
        chunk = -(-(-(-Lk // int(splits))) // 64) * 64
        want = -(-Lk // chunk)
        tc = [g for name, g in _launches(log) if "attention_tc_kernel" in name]
        assert tc and all(g[1] == want for g in tc)
        combined = any("attention_combine_kernel" in name for name, _ in _launches(log))
        assert combined == (want > 1)


@pytest.mark.parametrize("dtype", LOWP, ids=lambda d: np.dtype(d).name)
def test_tc_splits_keys_when_blocks_are_few(rng, tmp_path, monkeypatch, dtype):
    """Without the switch: 2 query-tile blocks against 108 emulated SMs and 1000 keys are cut
    into 8 chunks of 128 keys (two tiles each); many blocks are not split."""
    monkeypatch.delenv("MHA_EXT_CUDA_SIMT", raising=False)
    monkeypatch.delenv("MHA_EXT_CUDA_SPLITS", raising=False)
    monkeypatch.setenv("MHA_EXT_CUDA_EMU_SMS", "108")
    log = tmp_path / "launches.txt"
    monkeypatch.setenv("MHA_EXT_CUDA_EMU_LOG", str(log))
    q = rand(rng, (1, 2, 20, 64), dtype)
    k, v = (rand(rng, (1, 2, 1000, 64), dtype) for _ in range(2))
    out, lse = mha_ext.attention(q, k, v, device="cuda", return_lse=True)
    ref_out, _, ref_lse = ref_attention(q, k, v)
    check_out(out, ref_out, dtype, q, k, v)
    np.testing.assert_allclose(lse, ref_lse, rtol=2e-3, atol=2e-3)
    if EMULATED:
        grids = [g for name, g in _launches(log) if "attention_tc_kernel" in name]
        assert grids == [(2, 8, 1)]
        log.unlink()
        q = rand(rng, (1, 2, 64 * 60, 64), dtype)  # 120 blocks: enough to fill the GPU
        k, v = (rand(rng, (1, 2, 300, 64), dtype) for _ in range(2))
        mha_ext.attention(q, k, v, device="cuda")
        grids = [g for name, g in _launches(log) if "attention_tc_kernel" in name]
        assert grids == [(120, 1, 1)]


# ------------------------------------------------------------------------------------------
# A larger causal run on the tensor-core path (several key tiles, prefetching).


@pytest.mark.parametrize("dtype", LOWP, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("D", [64, 128])
def test_larger_causal(rng, dtype, D):
    B, H, L = cpu_sized((1, 4, 1500), (1, 2, 260))
    q, k, v = (rand(rng, (B, H, L, D), dtype) for _ in range(3))
    out = mha_ext.attention(q, k, v, causal=True, device="cuda")
    ref_out, _, _ = ref_attention(q, k, v, causal=True)
    check_out(out, ref_out, dtype, q, k, v, causal=True)


# ------------------------------------------------------------------------------------------
# Review findings (issue 13), each fixed with a test.


@pytest.mark.parametrize("dtype", [np.float32, *LOWP], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("D", [64, 256])
def test_nan_inf_in_v_at_hidden_keys(path, rng, dtype, D):
    """A NaN/Inf value at a key a row cannot see never reaches that row (both kernels)."""
    B, H, L = 1, 2, 100
    q, k, v = (rand(rng, (B, H, L, D), dtype) for _ in range(3))
    j_masked, j_causal = 10, 70
    mask = np.ones((L, L), dtype=bool)
    mask[:, j_masked] = False  # no row sees key 10
    v_bad = v.copy()
    v_bad[:, :, j_masked] = np.nan
    v_bad[:, :, j_causal, ::2] = np.inf  # rows i >= 70 see key 70 (causal)
    v_bad[:, :, j_causal, 1::2] = np.nan
    out = mha_ext.attention(q, k, v_bad, mask=mask, causal=True, device="cuda")
    o = np.asarray(out, np.float64)
    clean = v.copy()
    clean[:, :, [j_masked, j_causal]] = 0
    ref_out, _, _ = ref_attention(q, k, clean, mask=mask, causal=True)
    rows = slice(0, j_causal)  # rows that cannot see key 70: finite, as if it were not there
    assert np.isfinite(o[:, :, rows]).all()
    tol = {np.float32: 1e-5}.get(dtype, 2e-2)
    np.testing.assert_allclose(o[:, :, rows], ref_out[:, :, rows], rtol=tol, atol=tol)
    # rows that see key 70 are poisoned (NaN in a visible value)
    assert np.isnan(o[:, :, j_causal:]).any(axis=-1).all()


@pytest.mark.skipif(not EMULATED, reason="fault injection exists in the host emulation only")
def test_failed_smem_opt_in_is_not_reported_by_the_next_launch(rng, monkeypatch):
    """A failed cudaFuncSetAttribute is cleared: the next call does not see a stale error."""
    q128, k128, v128 = (rand(rng, (1, 1, 40, 128), np.float16) for _ in range(3))
    q64, k64, v64 = (rand(rng, (1, 1, 40, 64), np.float16) for _ in range(3))
    monkeypatch.setenv("MHA_EXT_CUDA_EMU_FAIL", "func_set_attribute")
    with pytest.raises(RuntimeError, match="tensor-core attention kernel failed"):
        mha_ext.attention(q128, k128, v128, device="cuda")
    monkeypatch.delenv("MHA_EXT_CUDA_EMU_FAIL")
    out = mha_ext.attention(q64, k64, v64, device="cuda")  # no opt-in needed at D = 64
    check_out(out, ref_attention(q64, k64, v64)[0], np.float16, q64, k64, v64)
    out = mha_ext.attention(q128, k128, v128, device="cuda")
    check_out(out, ref_attention(q128, k128, v128)[0], np.float16, q128, k128, v128)


@pytest.mark.skipif(not EMULATED, reason="reads the host emulation's launch log")
def test_tc_shared_memory_fits_two_blocks_per_sm(rng, monkeypatch, tmp_path):
    """The Q tile no longer has its own buffer: 36 KB at D = 64, 68 KB at D = 128 (was 87 KB);
    D = 96 and 256 have tensor-core variants of their own (no padding to 128, no SIMT)."""
    log = tmp_path / "launches.txt"
    monkeypatch.setenv("MHA_EXT_CUDA_EMU_LOG", str(log))
    for D in (64, 96, 128, 256):
        q, k, v = (rand(rng, (1, 1, 70, D), np.float16) for _ in range(3))
        out = mha_ext.attention(q, k, v, causal=True, device="cuda")
        check_out(out, ref_attention(q, k, v, causal=True)[0], np.float16, q, k, v, causal=True)
    smem = {}
    for line in log.read_text().splitlines():
        head, name = line.split(" kernel=", 1)
        fields = dict(f.split("=", 1) for f in head.split())
        if "attention_tc_kernel" in name:
            smem[int(name.split(",")[1])] = int(fields["smem"])
    assert smem == {
        64: 4 * 64 * 72 * 2,
        96: 4 * 64 * 104 * 2,
        128: 4 * 64 * 136 * 2,
        256: 4 * 32 * 264 * 2,  # 32 keys per tile at D = 256
    }
    a100_smem_per_sm = 164 * 1024
    assert all(2 * b <= a100_smem_per_sm for b in smem.values())


@pytest.mark.parametrize("pinned", ["1", "0"])
def test_calls_reuse_the_cached_arena(rng, monkeypatch, pinned):
    """The per-thread device arena grows and is reused; results never depend on what an
    earlier call left in it; MHA_EXT_CUDA_PINNED=0 copies from pageable memory instead."""
    monkeypatch.setenv("MHA_EXT_CUDA_PINNED", pinned)
    for Lq, Lk, dtype in [(20, 30, np.float32), (90, 200, np.float16), (17, 40, np.float16),
                          (5, 7, np.float64), (90, 200, np.float32)]:
        q = rand(rng, (2, 2, Lq, 32), dtype)
        k = rand(rng, (2, 2, Lk, 32), dtype)
        v = rand(rng, (2, 2, Lk, 24), dtype)
        out, lse = mha_ext.attention(q, k, v, causal=True, device="cuda", return_lse=True)
        ref_out, _, ref_lse = ref_attention(q, k, v, causal=True)
        check_out(out, ref_out, dtype, q, k, v, causal=True)
        np.testing.assert_allclose(lse, ref_lse, rtol=lse_tol(dtype), atol=lse_tol(dtype))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(
    ("Hq", "Hk", "Lq", "D", "Dv"),
    [(8, 2, 1, 64, 64), (6, 1, 2, 40, 72), (4, 4, 3, 128, 32), (16, 1, 1, 256, 256)],
)
def test_flash_decoding_kernel(rng, tmp_path, monkeypatch, dtype, Hq, Hk, Lq, D, Dv):
    """Few query rows per KV head: the flash-decoding kernel, with every mask kind, GQA,
    NaN values at hidden keys and key splits merged by lse."""
    monkeypatch.setenv("MHA_EXT_CUDA_EMU_LOG", str(tmp_path / "launches.txt"))
    B, Lk = 2, cpu_sized(3000, 700)
    q = rand(rng, (B, Hq, Lq, D), dtype)
    k = rand(rng, (B, Hk, Lk, D), dtype)
    v = rand(rng, (B, Hk, Lk, Dv), dtype)
    kl = np.array([Lk, Lk // 2 + 3])
    mask = rng.random((Lq, Lk)) < 0.9
    bias = rand(rng, (Hq, 1, Lk), np.float64 if dtype == np.float64 else np.float32)
    v_nan = v.copy()
    v_nan[:, :, 5] = np.nan  # hidden by the mask below for every row
    mask[:, 5] = False
    for b in range(B):
        v_nan[b, :, kl[b] :] = np.nan  # padding keys
    kw = {"mask": mask, "bias": bias, "causal": True, "window": (Lk // 2, 0), "key_lengths": kl}
    out, lse = mha_ext.attention(q, k, v_nan, device="cuda", return_lse=True, **kw)
    clean = v.copy()
    clean[:, :, 5] = 0
    ref_out, _, ref_lse = ref_attention(q, k, clean, **kw)
    check_out(out, ref_out, dtype, q, k, clean, **kw)
    np.testing.assert_allclose(lse, ref_lse, rtol=lse_tol(dtype), atol=lse_tol(dtype))
    if EMULATED:
        text = (tmp_path / "launches.txt").read_text()
        # float64 at D = 256 needs more than the kernel's 96 KB of shared memory: SIMT path
        fits = not (dtype == np.float64 and D == 256)
        assert ("attention_decode_kernel" in text) == fits
        assert ("attention_simt_kernel" in text) == (not fits)
