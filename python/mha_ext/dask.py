"""Attention on Dask arrays: past one machine's memory or cores (SPEC section 6.6).

``mha_ext.dask.attention(q, k, v, **options)`` builds a Dask graph of native attention calls:

- chunks along the batch and head axes are independent tasks;
- chunks along the query axis are independent tasks;
- chunks along the key axis are computed as partial ``(out, lse)`` where their data lives, then
  combined with ``mha_ext.merge`` in a tree (``split_every`` parts per step), so one
  sequence's keys may be spread over many machines and no task ever receives more than one
  key/value chunk.

It works with every Dask scheduler (threads, processes, ``distributed``); the library adds no
scheduler, transport or cluster code of its own. Needs the optional extra ``mha_ext[dask]``.
"""

from __future__ import annotations

import math
from typing import Any

import dask.array as da
import numpy as np

from . import _attention
from .serving import merge

__all__ = ["attention"]

# A partially visible block (causal / window edge) is computed in query slices of this many
# rows, each with a bool mask of (rows, key chunk) bytes per batch element.
_MASK_ROWS = 256


def _as_dask(x, name: str) -> da.Array:
    if isinstance(x, da.Array):
        return x
    if isinstance(x, np.ndarray):
        return da.from_array(x, chunks=x.shape or ())
    raise TypeError(f"{name}: expected a dask.array.Array or a NumPy array, got {type(x).__name__}")


def _bounds(causal, window) -> tuple[str, int, int]:
    """(alignment, left, right): alignment 'none' | 'bottom_right' | 'top_left'; -1 = unbounded."""
    if causal is True or causal == "bottom_right":
        align = "bottom_right"
    elif causal == "top_left":
        align = "top_left"
    else:
        align = "none"
    left, right = _attention._window(window) if window is not None else (-1, -1)
    return align, left, right


class _Visibility:
    """The causal / window / key_lengths rule of ``attention`` in global indices (SPEC 3)."""

    def __init__(self, causal, window, key_lengths, lq: int, lk: int):
        self.align, self.left, self.right = _bounds(causal, window)
        self.kl = None if key_lengths is None else np.asarray(key_lengths, dtype=np.int64)
        self.lq, self.lk = lq, lk
        self.diagonal = self.align != "none" or self.left >= 0 or self.right >= 0

    def _off(self, b: np.ndarray) -> np.ndarray:
        if self.align == "top_left":
            return np.zeros(len(b), np.int64)
        lk_b = self.kl[b] if self.kl is not None else np.full(len(b), self.lk, np.int64)
        return lk_b - self.lq

    def classify(self, b, i0, i1, j0, j1) -> str:
        """'full', 'empty' or 'partial' for rows [i0, i1), keys [j0, j1), batches b."""
        kl = self.kl[b] if self.kl is not None else np.full(len(b), self.lk, np.int64)
        if not self.diagonal:
            if (kl >= j1).all():
                return "full"
            return "empty" if (kl <= j0).all() else "partial"
        off = self._off(b)
        hi_off = self._hi(off)
        lo_off = None if self.left < 0 else off - self.left
        full = kl >= j1
        empty = kl <= j0
        if hi_off is not None:
            full &= j1 - 1 <= i0 + hi_off
            empty |= j0 > i1 - 1 + hi_off
        if lo_off is not None:
            full &= j0 >= i1 - 1 + lo_off
            empty |= j1 - 1 < i0 + lo_off
        if full.all():
            return "full"
        return "empty" if empty.all() else "partial"

    def _hi(self, off):
        """Upper bound offset: key j visible only if j <= i + hi (None = unbounded)."""
        if self.align != "none":
            return off  # causal: j <= i + off (a window's right >= 0 bound is looser)
        return None if self.right < 0 else off + self.right

    def mask(self, b, i0, i1, j0, j1) -> np.ndarray:
        """Bool (len(b), 1, i1 - i0, j1 - j0): True where query i may attend key j."""
        kl = self.kl[b] if self.kl is not None else np.full(len(b), self.lk, np.int64)
        i = np.arange(i0, i1)[None, :, None]
        j = np.arange(j0, j1)[None, None, :]
        vis = j < kl[:, None, None]
        if self.diagonal:
            off = self._off(b)[:, None, None]
            hi = self._hi(off)
            if hi is not None:
                vis = vis & (j <= i + hi)
            if self.left >= 0:
                vis = vis & (j >= i + off - self.left)
        return vis[:, None]


def _partial_block(qb, kb, vb, qpos, kpos, bpos, *, vis, options, dv, acc):
    """One (batch, head, query, key) block: its (out, lse) packed as (..., 1, Dv + 1)."""
    nb, nh, g, nq, d = qb.shape
    q4 = qb.reshape(nb, nh * g, nq, d)
    i0, i1 = int(qpos[0]), int(qpos[-1]) + 1
    j0, j1 = int(kpos[0]), int(kpos[-1]) + 1
    packed = np.empty((nb, nh, g, nq, 1, dv + 1), dtype=acc)
    out5 = packed[..., 0, :dv]
    lse5 = packed[..., 0, dv]
    kind = vis.classify(bpos, i0, i1, j0, j1)
    if kind == "empty":
        out5[...] = 0
        lse5[...] = -np.inf
        return packed
    if kind == "full":
        o, lse = _attention.attention(q4, kb, vb, return_lse=True, **options)
        out5[...] = o.reshape(nb, nh, g, nq, dv)
        lse5[...] = lse.reshape(nb, nh, g, nq)
        return packed
    if not vis.diagonal:
        # Only key_lengths cuts this block: local key counts, no mask.
        kl = np.clip(vis.kl[bpos] - j0, 0, j1 - j0)
        o, lse = _attention.attention(q4, kb, vb, key_lengths=kl, return_lse=True, **options)
        out5[...] = o.reshape(nb, nh, g, nq, dv)
        lse5[...] = lse.reshape(nb, nh, g, nq)
        return packed
    for s in range(0, nq, _MASK_ROWS):
        e = min(nq, s + _MASK_ROWS)
        m = vis.mask(bpos, i0 + s, i0 + e, j0, j1)
        o, lse = _attention.attention(
            q4[:, :, s:e], kb, vb, mask=m, return_lse=True, **options
        )
        out5[:, :, :, s:e] = o.reshape(nb, nh, g, e - s, dv)
        lse5[:, :, :, s:e] = lse.reshape(nb, nh, g, e - s)
    return packed


def _merge_packed(x, axis, keepdims, dv, num_threads):
    """Merge the parts along ``axis`` (4) of packed (B, Hk, G, Lq, parts, Dv + 1) blocks."""
    if isinstance(axis, tuple):
        (axis,) = axis
    nb, nh, g, nq, parts, _ = x.shape
    if parts == 1:
        return x
    outs = [x[:, :, :, :, p, :dv].reshape(nb, nh * g, nq, dv) for p in range(parts)]
    lses = [np.ascontiguousarray(x[:, :, :, :, p, dv]).reshape(nb, nh * g, nq) for p in range(parts)]
    out, lse = merge(outs, lses, num_threads=num_threads)
    res = np.empty((nb, nh, g, nq, 1, dv + 1), dtype=x.dtype)
    res[..., 0, :dv] = out.reshape(nb, nh, g, nq, dv)
    res[..., 0, dv] = lse.reshape(nb, nh, g, nq)
    return res


def _chunk_identity(x, axis, keepdims):
    return x


def attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    causal: bool | str = False,
    window: tuple[int | None, int | None] | None = None,
    key_lengths: Any = None,
    scale: float | None = None,
    score: Any = None,
    return_lse: bool = False,
    layout: str = "bhld",
    num_threads: int | None = None,
    split_every: int = 4,
):
    """Attention on ``dask.array`` inputs, chunked over batch, heads, queries and keys.

    Same conventions as ``mha_ext.attention`` (shapes, layouts, GQA, causal alignments,
    window, key_lengths, scale, score). Each key chunk yields a partial ``(out, lse)`` computed
    where that chunk lives; the parts are merged with ``mha_ext.merge`` in a tree of
    ``split_every`` parts per step. A task never receives more than one key/value chunk.

    Parameters
    ----------
    q, k, v : dask.array.Array (or NumPy arrays, wrapped as one chunk)
        Rank 2, 3 or 4, one dtype. ``v`` is rechunked to ``k``'s key chunks, ``q``'s batch
        and head chunks are aligned with ``k``'s (query heads in whole GQA groups); the head
        dimension is one chunk.
    causal, window, key_lengths, scale, score, layout
        As in ``mha_ext.attention``. ``key_lengths`` is a NumPy int array ``(B,)``. Blocks on
        the edge of a causal/window band are computed in slices of 256 query rows with a bool
        mask of ``256 x key chunk`` bytes per batch element.
    return_lse : bool
        Also return the lse ``(B, Hq, Lq)`` (float32, float64 for float64 inputs).
    num_threads : int, optional
        Threads of each native call (default: each worker's OpenMP default).
    split_every : int
        Parts merged per tree step (>= 2).

    Returns
    -------
    dask.array.Array, or (out, lse)
        Lazy results; call ``.compute()`` (or ``dask.compute``) on any scheduler.

    Raises
    ------
    TypeError
        Inputs that are not Dask/NumPy arrays, or of different dtypes.
    ValueError
        Shapes that ``attention`` refuses, a bad option, ``split_every < 2``; also ``mask``
        and ``bias`` are not taken here (an O(Lq x Lk) array defeats the purpose): use
        ``key_lengths``, ``causal`` and ``window``.

    Examples
    --------
    >>> import dask.array as da, numpy as np, mha_ext.dask
    >>> q = da.random.default_rng(0).standard_normal((1, 2, 64, 32), chunks=(1, 2, 64, 32))
    >>> k = da.random.default_rng(1).standard_normal((1, 2, 4096, 32), chunks=(1, 2, 1024, 32))
    >>> out = mha_ext.dask.attention(q.astype(np.float32), k.astype(np.float32),
    ...                              k.astype(np.float32))
    >>> out.shape
    (1, 2, 64, 32)
    """
    q, k, v = _as_dask(q, "q"), _as_dask(k, "k"), _as_dask(v, "v")
    if isinstance(split_every, bool) or not isinstance(split_every, int) or split_every < 2:
        raise ValueError(f"split_every: expected an int >= 2, got {split_every!r}")
    if layout not in ("bhld", "blhd"):
        raise ValueError(f"layout: expected 'bhld' or 'blhd', got {layout!r}")
    rank = q.ndim
    if not (2 <= rank <= 4) or k.ndim != rank or v.ndim != rank:
        raise ValueError(
            f"q, k, v: expected the same rank 2, 3 or 4 for all three, got shapes "
            f"{q.shape}, {k.shape}, {v.shape}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    # To 4-D bhld views (lazy: no data moves).
    if layout == "blhd" and rank >= 3:
        perm = (0, 2, 1, 3) if rank == 4 else (1, 0, 2)
        q, k, v = (x.transpose(perm) for x in (q, k, v))
    while q.ndim < 4:
        q, k, v = q[None], k[None], v[None]
    B, Hq, Lq, D = q.shape
    _, Hk, Lk, Dk = k.shape
    Dv = v.shape[3]
    if any(math.isnan(x) for x in (B, Hq, Lq, D, Hk, Lk, Dk, Dv)):
        raise ValueError("q, k, v: shapes must be known (no NaN chunk sizes)")
    if k.shape[0] != B or v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"q, k, v: batch, key/value heads and key lengths must match, got shapes "
            f"{q.shape}, {k.shape}, {v.shape} (as (B, H, L, D))"
        )
    if Hk == 0 or Hq % Hk:
        raise ValueError(
            f"q/k: the number of query heads ({Hq}) must be a multiple of the number of "
            f"key/value heads ({Hk})"
        )
    if key_lengths is not None:
        kl = np.asarray(key_lengths)
        if kl.dtype.kind not in "iu" or kl.shape != (B,):
            raise ValueError(f"key_lengths: expected an int array of shape ({B},), got {kl!r}")
        if ((kl < 0) | (kl > Lk)).any():
            raise ValueError(f"key_lengths: entries must lie in [0, Lk = {Lk}], got {kl}")
        key_lengths = kl.astype(np.int64)
    options = {"scale": scale, "score": score, "num_threads": num_threads}
    # The native argument checks, once, on a one-row problem (scale, score, window, causal).
    tiny = [np.ones((1, h, 1, d), dtype=q.dtype) for h, d in ((Hq, D), (Hk, Dk), (Hk, Dv))]
    _attention.attention(*tiny, causal=causal, window=window, **options)
    G = Hq // Hk
    acc = np.dtype(np.float64 if q.dtype == np.float64 else np.float32)

    # Align chunks: v on k's (B, H, L) chunks; q's batch on k's and its heads in whole groups.
    k = k.rechunk({3: -1})
    v = v.rechunk({0: k.chunks[0], 1: k.chunks[1], 2: k.chunks[2], 3: -1})
    q = q.rechunk({0: k.chunks[0], 1: tuple(c * G for c in k.chunks[1]), 3: -1})
    q5 = q.reshape(B, Hk, G, Lq, D)
    q5 = q5.rechunk({2: -1})
    qpos = da.arange(Lq, chunks=(q5.chunks[3],))
    kpos = da.arange(Lk, chunks=(k.chunks[2],))
    bpos = da.arange(B, chunks=(k.chunks[0],))
    vis = _Visibility(causal, window, key_lengths, Lq, Lk)
    if Lq == 0 or Lk == 0 or B == 0 or Hq == 0:
        # Degenerate shapes: the in-process call defines the result (zeros / -inf).
        res = _attention.attention(
            np.zeros((B, Hq, Lq, D), q.dtype), np.zeros((B, Hk, Lk, Dk), q.dtype),
            np.zeros((B, Hk, Lk, Dv), q.dtype), return_lse=True, **options
        )
        out4, lse3 = da.from_array(res[0]), da.from_array(res[1])
    else:
        parts = da.blockwise(
            _partial_block, "bhgqkz",
            q5, "bhgqx", k, "bhkx", v, "bhky", qpos, "q", kpos, "k", bpos, "b",
            adjust_chunks={"k": 1},
            new_axes={"z": Dv + 1},
            dtype=acc,
            concatenate=True,
            meta=np.empty((0,) * 6, dtype=acc),
            vis=vis, options={**options, "causal": False, "window": None}, dv=Dv, acc=acc,
        )
        merged = da.reduction(
            parts,
            _chunk_identity,
            lambda x, axis, keepdims: _merge_packed(x, axis, keepdims, Dv, num_threads),
            combine=lambda x, axis, keepdims: _merge_packed(x, axis, keepdims, Dv, num_threads),
            axis=4,
            keepdims=True,
            dtype=acc,
            split_every={4: split_every},
            concatenate=True,
            meta=np.empty((0,) * 6, dtype=acc),
        )
        out4 = merged[:, :, :, :, 0, :Dv].astype(q.dtype).reshape(B, Hq, Lq, Dv)
        lse3 = merged[:, :, :, :, 0, Dv].reshape(B, Hq, Lq)
    # Back to the caller's rank and layout.
    out4 = out4[(0,) * (4 - rank)] if rank < 4 else out4
    lse3 = lse3[(0,) * (4 - rank)] if rank < 4 else lse3
    if layout == "blhd" and rank >= 3:
        out4 = out4.transpose((0, 2, 1, 3) if rank == 4 else (1, 0, 2))
    return (out4, lse3) if return_lse else out4
