"""Independent NumPy references for ``mha_ext.attention`` (SPEC section 3).

``attention_ref`` is float64 attention written the obvious way: every input is cast to
float64, the full (B, Hq, Lq, Lk) score matrix is built with ``einsum``, the masks are one
boolean "visible" matrix, and the softmax subtracts the row max. It shares no code with the
native kernel and is meant to be read next to the SPEC.

``naive_same_precision`` is what a NumPy user would write at the input's own low precision
(float16 / bfloat16): every intermediate array is rounded to that dtype. The tests for low
precision require the kernel's error to be at most twice this one's (FlashAttention's rule).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "FLOAT_TOL",
    "alibi_bias",
    "assert_out_close",
    "attention_ref",
    "from_bhld",
    "max_abs_err",
    "naive_same_precision",
    "random_inputs",
    "to_bhld",
    "visible_mask",
]


# ------------------------------------------------------------------------------------------
# Layout helpers: every reference computes on 4-D (B, H, L, D) arrays.


def to_bhld(x: np.ndarray, layout: str = "bhld") -> np.ndarray:
    """A 2-D (L, D), 3-D (H, L, D) / (L, H, D) or 4-D array as a 4-D (B, H, L, D) view."""
    x = np.asarray(x)
    if x.ndim == 2:
        return x[None, None]
    if x.ndim == 3:
        return (x.swapaxes(0, 1) if layout == "blhd" else x)[None]
    if x.ndim == 4:
        return x.swapaxes(1, 2) if layout == "blhd" else x
    raise ValueError(f"rank {x.ndim}")


def from_bhld(x: np.ndarray, rank: int, layout: str = "bhld") -> np.ndarray:
    """Inverse of ``to_bhld`` for a result of the caller's rank and layout."""
    if rank == 2:
        return x[0, 0]
    if rank == 3:
        return x[0].swapaxes(0, 1) if layout == "blhd" else x[0]
    return x.swapaxes(1, 2) if layout == "blhd" else x


def _bcast4(a, rank: int, target4: tuple) -> np.ndarray:
    """A mask/bias broadcast (NumPy rules, right-aligned) to the caller's rank, then to 4-D."""
    a = np.asarray(a)
    target_r = target4[4 - rank :]
    return np.broadcast_to(np.broadcast_to(a, target_r).reshape(target4), target4)


# ------------------------------------------------------------------------------------------
# Score functions on float64.


def _score_parts(score):
    """(kind, params) from None / a name / an mha_ext score object / a tuple."""
    if score is None or score == "scaled_dot":
        return "scaled_dot", ()
    if isinstance(score, str):
        if score != "dot":
            raise ValueError(score)
        return "dot", ()
    if isinstance(score, tuple):
        return score[0], tuple(np.asarray(p, dtype=np.float64) for p in score[1:])
    name = type(score).__name__
    if name == "General":
        return "general", (np.asarray(score.W, np.float64),)
    if name == "Additive":
        return "additive", tuple(np.asarray(p, np.float64) for p in (score.W_q, score.W_k, score.w))
    if name == "Concat":
        return "concat", (np.asarray(score.W, np.float64), np.asarray(score.w, np.float64))
    raise ValueError(f"unknown score {score!r}")


def _scores(q, k, kind, params):
    """Unscaled scores (B, Hq, Lq, Lk) from q (B, Hq, Lq, D) and k already repeated to Hq."""
    if kind in ("scaled_dot", "dot"):
        return np.einsum("bhid,bhjd->bhij", q, k)
    if kind == "general":
        (W,) = params
        return np.einsum("bhid,de,bhje->bhij", q, W, k)
    if kind in ("additive", "concat"):
        if kind == "additive":
            W_q, W_k, w = params
        else:
            W, w = params
            W_q, W_k = W[: q.shape[-1]], W[q.shape[-1] :]
        qa = np.einsum("bhid,da->bhia", q, W_q)
        ka = np.einsum("bhjd,da->bhja", k, W_k)
        return np.einsum("bhija,a->bhij", np.tanh(qa[:, :, :, None, :] + ka[:, :, None, :, :]), w)
    raise ValueError(kind)


# ------------------------------------------------------------------------------------------
# Visibility: mask AND key_lengths AND causal AND window.


def visible_mask(
    B, Hq, Lq, Lk, *, mask=None, rank=4, causal=False, window=None, key_lengths=None
) -> np.ndarray:
    """Bool (B, Hq, Lq, Lk): True where query i may attend key j (SPEC section 3)."""
    vis = np.ones((B, Hq, Lq, Lk), dtype=bool)
    if mask is not None:
        vis &= _bcast4(mask, rank, (B, Hq, Lq, Lk))
    if key_lengths is None:
        lk_b = np.full(B, Lk, dtype=np.int64)
    else:
        lk_b = np.asarray(key_lengths, dtype=np.int64).reshape(B)
    i = np.arange(Lq)[:, None]
    j = np.arange(Lk)[None, :]
    if causal not in (False, None, True, "bottom_right", "top_left"):
        raise ValueError(causal)
    for b in range(B):
        vb = j < lk_b[b]
        off = 0 if causal == "top_left" else lk_b[b] - Lq
        if causal in (True, "bottom_right"):
            vb = vb & (j <= i + (lk_b[b] - Lq))
        elif causal == "top_left":
            vb = vb & (j <= i)
        if window is not None:
            left, right = window
            if left is not None and left != -1:
                vb = vb & (j >= i + off - left)
            if right is not None and right != -1:
                vb = vb & (j <= i + off + right)
        vis[b] &= vb
    return vis


def alibi_bias(slopes, B, Hq, Lq, Lk, *, causal=False, key_lengths=None) -> np.ndarray:
    """float64 (B, Hq, Lq, Lk): ``-slope[b, h] * |i + off - j|``, off = Lk_b - Lq (0 for
    top-left causal), FlashAttention's ALiBi written out as the explicit bias."""
    sl = np.broadcast_to(np.asarray(slopes, np.float64).reshape(-1, Hq), (B, Hq))
    lk_b = np.full(B, Lk) if key_lengths is None else np.asarray(key_lengths).reshape(B)
    i = np.arange(Lq)[:, None]
    j = np.arange(Lk)[None, :]
    out = np.empty((B, Hq, Lq, Lk))
    for b in range(B):
        off = 0 if causal == "top_left" else int(lk_b[b]) - Lq
        out[b] = -sl[b][:, None, None] * np.abs(i + off - j)[None]
    return out


# ------------------------------------------------------------------------------------------
# The float64 reference.


def attention_ref(
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
    layout="bhld",
    alibi_slopes=None,
    softcap=None,
):
    """float64 attention: returns (out, weights, lse) in the caller's rank and layout.

    ``softcap``: scores become ``softcap * tanh(s / softcap)`` after the scale;
    ``alibi_slopes`` (Hq,) or (B, Hq): adds ``-slope * |i + off - j|`` (``alibi_bias``).

    out has the shape of the result (q's rank/layout, last axis Dv); weights
    (B, Hq, Lq, Lk) and lse (B, Hq, Lq) are rank-reduced like the inputs. Rows with no
    visible key get out 0, weights 0 and lse -inf.
    """
    rank = np.ndim(q)
    q4 = to_bhld(np.asarray(q).astype(np.float64), layout)
    k4 = to_bhld(np.asarray(k).astype(np.float64), layout)
    v4 = to_bhld(np.asarray(v).astype(np.float64), layout)
    B, Hq, Lq, D = q4.shape
    Hk, Lk = k4.shape[1], k4.shape[2]
    group = Hq // Hk if Hk else 1
    # GQA: query head h reads kv head h // group.
    k4 = np.repeat(k4, group, axis=1)
    v4 = np.repeat(v4, group, axis=1)

    kind, params = _score_parts(score)
    if scale is None:
        scale = 1.0 / np.sqrt(D) if kind == "scaled_dot" else 1.0
    with np.errstate(invalid="ignore", over="ignore"):
        s = _scores(q4, k4, kind, params) * scale
        if softcap is not None:
            s = softcap * np.tanh(s / softcap)
        if alibi_slopes is not None:
            s = s + alibi_bias(alibi_slopes, B, Hq, Lq, Lk, causal=causal, key_lengths=key_lengths)
        if bias is not None:
            s = s + _bcast4(np.asarray(bias).astype(np.float64), rank, (B, Hq, Lq, Lk))
        vis = visible_mask(
            B,
            Hq,
            Lq,
            Lk,
            mask=mask,
            rank=rank,
            causal=causal,
            window=window,
            key_lengths=key_lengths,
        )
        s = np.where(vis, s, -np.inf)
        m = s.max(axis=-1, keepdims=True, initial=-np.inf)
        empty = m == -np.inf  # no visible key (or every visible score is -inf)
        e = np.exp(s - np.where(empty, 0.0, m))
        e = np.where(vis & ~empty, e, 0.0)
        denom = e.sum(axis=-1, keepdims=True)
        w = np.where(empty, 0.0, e / np.where(empty, 1.0, denom))
        lse = np.where(empty, -np.inf, m + np.log(np.where(empty, 1.0, denom)))[..., 0]
        if np.isfinite(v4).all():
            out = np.einsum("bhij,bhjd->bhid", w, v4)
        else:
            # Inf/NaN values only reach the rows that see them: 0 * inf must not leak in.
            out = np.where(vis[..., None], w[..., None] * v4[:, :, None], 0.0).sum(axis=3)
    out = from_bhld(out, rank, layout)
    if rank < 4:
        w = w.reshape(w.shape[4 - rank :])
        lse = lse.reshape(lse.shape[4 - rank :])
    return out, w, lse


# ------------------------------------------------------------------------------------------
# Low precision: what a NumPy user would write in float16 / bfloat16.


def naive_same_precision(
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
    layout="bhld",
):
    """Scaled-dot attention computed in q's own dtype, rounding at every step.

    (``scale=1.0`` gives the "dot" score.)

    Scores, max subtraction, exp, row sum, normalisation and P @ V each produce an array of
    the input dtype (NumPy float16 or ml_dtypes.bfloat16). Returns out in the caller's rank
    and layout, in that dtype.
    """
    dt = np.asarray(q).dtype
    rank = np.ndim(q)
    q4, k4, v4 = (to_bhld(np.asarray(x), layout) for x in (q, k, v))
    B, Hq, Lq, D = q4.shape
    Hk, Lk = k4.shape[1], k4.shape[2]
    group = Hq // Hk
    k4 = np.repeat(k4, group, axis=1)
    v4 = np.repeat(v4, group, axis=1)
    if scale is None:
        scale = 1.0 / np.sqrt(D)
    vis = visible_mask(
        B,
        Hq,
        Lq,
        Lk,
        mask=mask,
        rank=rank,
        causal=causal,
        window=window,
        key_lengths=key_lengths,
    )
    with np.errstate(invalid="ignore", over="ignore"):
        s = (q4 @ k4.swapaxes(-1, -2)).astype(dt)
        s = (s * np.asarray(scale, dtype=dt)).astype(dt)
        if bias is not None:
            s = (s + _bcast4(np.asarray(bias).astype(dt), rank, s.shape)).astype(dt)
        s = np.where(vis, s, np.asarray(-np.inf, dtype=dt)).astype(dt)
        m = s.max(axis=-1, keepdims=True)
        empty = m == np.asarray(-np.inf, dtype=dt)
        p = np.exp((s - np.where(empty, np.asarray(0, dt), m)).astype(dt)).astype(dt)
        l_sum = p.sum(axis=-1, keepdims=True, dtype=dt)
        p = (p / np.where(empty, np.asarray(1, dt), l_sum)).astype(dt)
        p = np.where(empty, np.asarray(0, dt), p).astype(dt)
        out = (p @ v4).astype(dt)
    return from_bhld(out, rank, layout)


def max_abs_err(a, ref) -> float:
    """max |a - ref| in float64 (0 for empty arrays)."""
    a = np.asarray(a).astype(np.float64)
    ref = np.asarray(ref).astype(np.float64)
    return float(np.max(np.abs(a - ref), initial=0.0))


FLOAT_TOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}


def assert_out_close(out, q, k, v, ref_out=None, **kw):
    """Check an attention output against the float64 reference for q's dtype.

    float32 / float64: ``assert_allclose`` with rtol = atol = 1e-5 / 1e-12. float16 /
    bfloat16: the max abs error against the float64 reference must be at most twice the
    error of ``naive_same_precision`` (plus a float32-eps floor, so that exact 0-vs-0
    results pass). ``kw`` are the masking arguments shared by both references.
    """
    dt = np.asarray(q).dtype
    assert out.dtype == dt, (out.dtype, dt)
    if ref_out is None:
        ref_out = attention_ref(q, k, v, **kw)[0]
    assert out.shape == ref_out.shape, (out.shape, ref_out.shape)
    if dt in FLOAT_TOL:
        tol = FLOAT_TOL[dt]
        np.testing.assert_allclose(out, ref_out, rtol=tol, atol=tol)
        return
    kw = dict(kw)
    score = kw.pop("score", None)
    if score == "dot" and kw.get("scale") is None:
        kw["scale"] = 1.0
    elif score not in (None, "dot", "scaled_dot"):
        raise ValueError("the low-precision rule covers dot-product scores only")
    naive = naive_same_precision(q, k, v, **kw)
    err = max_abs_err(out, ref_out)
    err_naive = max_abs_err(naive, ref_out)
    floor = (
        4 * float(np.finfo(np.float32).eps) * max(1.0, float(np.max(np.abs(ref_out), initial=0)))
    )
    assert np.isfinite(err), f"{dt}: non-finite output"
    assert err <= 2 * err_naive + floor, (
        f"{dt}: max abs error {err:.3g} > 2 x naive {dt} error {err_naive:.3g} (+ {floor:.1g})"
    )


# ------------------------------------------------------------------------------------------
# Random data (never zeros): standard normal, cast to the dtype.


def random_inputs(rng, q_shape, k_shape, v_shape, dtype=np.float32):
    """Fresh random q, k, v of the given shapes and dtype."""
    return tuple(rng.standard_normal(s).astype(dtype) for s in (q_shape, k_shape, v_shape))
