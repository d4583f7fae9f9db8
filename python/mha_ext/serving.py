"""Serving calls on the native core (SPEC section 6): merge, varlen and KV-cache attention.

``merge`` combines attention outputs computed over disjoint key shards (split-KV decoding,
ring attention, keys spread over machines) into the result over the union of the keys.
``attention_varlen`` runs packed variable-length batches (FlashAttention's
``flash_attn_varlen_func``), ``attention_kvcache`` decodes against contiguous or paged KV
caches (``flash_attn_with_kvcache``, vLLM's paged attention).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from . import _core
from ._attention import _CAUSAL, _CONCAT, _NO_SCORE, _array, _array_like, _score, _window
from ._attention import Score as _ScoreArg
from ._attention import _split_concat

__all__ = ["attention_kvcache", "attention_varlen", "merge"]


def _causal_code(causal):
    try:
        return _CAUSAL[causal]
    except (KeyError, TypeError):
        raise ValueError(
            f"causal: expected False, True, 'bottom_right' or 'top_left', got {causal!r}"
        ) from None


def _device_code(device):
    if device == "cpu" or device == "auto":  # no CUDA twin yet: "auto" is the CPU
        return _core.Device.CPU
    if device == "cuda":
        return _core.Device.CUDA
    raise ValueError(f"device: expected 'cpu', 'cuda' or 'auto', got {device!r}")


def _flag(x, name):
    if x is True or x is False:
        return x
    if isinstance(x, (int, np.bool_)) and x in (0, 1):
        return bool(x)
    raise TypeError(f"{name}: expected True or False, got {x!r}")


def attention_varlen(
    q: Any,
    k: Any,
    v: Any,
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    *,
    causal: bool | str = False,
    window: tuple[int | None, int | None] | None = None,
    scale: float | None = None,
    score: _ScoreArg = None,
    alibi_slopes: Any = None,
    softcap: float | None = None,
    return_lse: bool = False,
    device: str = "cpu",
    num_threads: int | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Attention over packed variable-length sequences (SPEC 6.2).

    FlashAttention's ``flash_attn_varlen_func`` convention: sequence ``b`` is query rows
    ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` and key rows ``cu_seqlens_k[b]:cu_seqlens_k[b +
    1]``; nothing attends across sequences, and causal / window / ALiBi align per sequence
    (bottom-right: query ``i`` of a sequence sees key ``j <= i + Lk_b - Lq_b``). The result
    equals :func:`mha_ext.attention` on each sequence alone, in one native call whose work
    list spans every sequence (one long sequence among many short ones still uses every
    thread).

    Parameters
    ----------
    q : array, shape (total_q, Hq, D)
    k : array, shape (total_k, Hk, D)
    v : array, shape (total_k, Hk, Dv)
        One float dtype for all three (float32, float64, float16, bfloat16); ``Hq % Hk == 0``.
    cu_seqlens_q, cu_seqlens_k : int32 or int64 array, shape (B + 1,)
        Running offsets from 0 to ``total_q`` / ``total_k``, never decreasing. They are
        copied before they are checked.
    causal, window, scale, score, alibi_slopes, softcap
        As in :func:`mha_ext.attention`; ``alibi_slopes`` is ``(Hq,)`` or ``(B, Hq)``.
    return_lse : bool
        Also return the lse, shape ``(Hq, total_q)`` (FlashAttention's varlen layout).
    device : {"cpu", "auto"}
        CPU only today (``"cuda"`` raises ``RuntimeError``).
    num_threads : int, optional
    out : numpy.ndarray, optional
        A preallocated C-contiguous ``(total_q, Hq, Dv)`` result.

    Returns
    -------
    out : numpy.ndarray, shape (total_q, Hq, Dv), or (out, lse)

    Raises
    ------
    ValueError
        cu_seqlens not starting at 0, decreasing, past or short of the total, of different
        lengths; wrong ranks or shapes. Raised before any native work.
    TypeError
        cu_seqlens that are not int32/int64; mixed dtypes.

    Examples
    --------
    >>> import numpy as np, mha_ext
    >>> rng = np.random.default_rng(0)
    >>> cu = np.array([0, 3, 8], dtype=np.int32)          # two sequences: 3 and 5 tokens
    >>> q, k, v = (rng.standard_normal((8, 4, 16), dtype=np.float32) for _ in range(3))
    >>> out = mha_ext.attention_varlen(q, k, v, cu, cu, causal=True)
    >>> ref = mha_ext.attention(q[3:], k[3:], v[3:], causal=True, layout="blhd")
    >>> bool(np.allclose(out[3:], ref, atol=1e-6))
    True
    """
    q, k, v = _array(q, "q"), _array(k, "k"), _array(v, "v")
    cu_seqlens_q = _array_like(cu_seqlens_q, "cu_seqlens_q")
    cu_seqlens_k = _array_like(cu_seqlens_k, "cu_seqlens_k")
    if alibi_slopes is not None:
        alibi_slopes = _array_like(alibi_slopes, "alibi_slopes")
    left, right = _window(window)
    kind, w1, w2, w3 = _NO_SCORE if score is None else _score(score)
    if kind is _CONCAT:
        w1, w2 = _split_concat(q, w1)
        kind = _core.Score.ADDITIVE
    return _core.attention_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, _causal_code(causal), left, right, scale, kind,
        w1, w2, w3, alibi_slopes, softcap, _flag(return_lse, "return_lse"),
        _device_code(device), num_threads, out,
    )


def attention_kvcache(
    q: Any,
    k_cache: Any,
    v_cache: Any,
    cache_seqlens: Any,
    *,
    block_table: Any = None,
    causal: bool | str = True,
    window: tuple[int | None, int | None] | None = None,
    scale: float | None = None,
    alibi_slopes: Any = None,
    softcap: float | None = None,
    return_lse: bool = False,
    num_splits: int | None = None,
    device: str = "cpu",
    num_threads: int | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """New query tokens against a KV cache, contiguous or paged (SPEC 6.3).

    FlashAttention's ``flash_attn_with_kvcache`` / vLLM's paged attention: ``q`` holds each
    sequence's new tokens, whose keys and values are already in the cache; sequence ``b``
    has ``cache_seqlens[b]`` valid keys, the new ones included, and with ``causal=True``
    (bottom-right) its new token ``i`` sees keys ``j <= i + cache_seqlens[b] - Lq``.
    Grouped-query heads read each K/V head once for the whole group; when ``B * Hk`` is small
    against the threads, the keys are split and the parts merged by their lse
    (``num_splits=None`` chooses).

    Parameters
    ----------
    q : array, shape (B, Lq, Hq, D)
    k_cache, v_cache : array
        Contiguous ``(B, Lmax, Hk, D)`` / ``(B, Lmax, Hk, Dv)``, or with ``block_table``
        paged pools ``(num_blocks, block_size, Hk, D)``; the dtype of q.
    cache_seqlens : int32 or int64 array, shape (B,)
        Valid keys per sequence, at most ``Lmax`` (or ``max_blocks * block_size``).
    block_table : int32 array, shape (B, max_blocks), optional
        Logical block ``x`` of sequence ``b`` is physical block ``block_table[b, x]``; every
        block holding one of its first ``cache_seqlens[b]`` keys must be in
        ``[0, num_blocks)``. Copied before it is checked; never read out of bounds.
    causal, window, scale, alibi_slopes, softcap
        As in :func:`mha_ext.attention` (``causal`` defaults to True here).
    return_lse : bool
        Also return the lse ``(B, Hq, Lq)``.
    num_splits : int, optional
        At most this many key-axis splits (1: none); None chooses.
    device : {"cpu", "auto"}
    num_threads : int, optional

    Returns
    -------
    out : numpy.ndarray, shape (B, Lq, Hq, Dv), or (out, lse)

    Examples
    --------
    >>> import numpy as np, mha_ext
    >>> rng = np.random.default_rng(0)
    >>> k_pool, v_pool = (rng.standard_normal((6, 16, 2, 32), dtype=np.float32) for _ in range(2))
    >>> table = np.array([[4, 0, 2], [1, 5, 3]], dtype=np.int32)   # (B, max_blocks)
    >>> q = rng.standard_normal((2, 1, 8, 32), dtype=np.float32)   # one new token each
    >>> out = mha_ext.attention_kvcache(q, k_pool, v_pool, np.array([40, 20]), block_table=table)
    >>> out.shape
    (2, 1, 8, 32)
    """
    q = _array(q, "q")
    k_cache, v_cache = _array(k_cache, "k_cache"), _array(v_cache, "v_cache")
    cache_seqlens = _array_like(cache_seqlens, "cache_seqlens")
    if block_table is not None:
        block_table = _array_like(block_table, "block_table")
    if alibi_slopes is not None:
        alibi_slopes = _array_like(alibi_slopes, "alibi_slopes")
    left, right = _window(window)
    return _core.attention_kvcache(
        q, k_cache, v_cache, cache_seqlens, block_table, _causal_code(causal), left, right,
        scale, alibi_slopes, softcap, _flag(return_lse, "return_lse"), num_splits,
        _device_code(device), num_threads,
    )


def merge(
    outs: Sequence[np.ndarray],
    lses: Sequence[np.ndarray],
    *,
    layout: str = "bhld",
    num_threads: int | None = None,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Merge attention results over disjoint key shards by their log-sum-exp.

    ``outs[p]`` and ``lses[p]`` are what ``attention(q, k_p, v_p, return_lse=True)`` returned
    for the same queries and the p-th shard of the keys (any causal/mask options applied per
    shard). The result equals attention over all the keys::

        lse = log(sum_p exp(lse_p)),   out = sum_p exp(lse_p - lse) * out_p

    Parameters
    ----------
    outs : sequence of arrays
        The partial outputs, all of one shape and dtype: ``(B, H, Lq, Dv)`` for layout
        ``"bhld"``, ``(B, Lq, H, Dv)`` for ``"blhd"``, or the 3-D / 2-D forms.
    lses : sequence of arrays
        Their lse arrays, ``(B, H, Lq)`` (``(H, Lq)``, ``(Lq,)`` for 3-D / 2-D), whatever the
        layout; converted to float32 (float64 for float64 outputs).
    layout : {"bhld", "blhd"}
        The axis order of ``outs`` and of the merged output.
    num_threads : int, optional
        OpenMP threads for large inputs (default: the OpenMP default).
    out : numpy.ndarray, optional
        A preallocated C-contiguous result of the shape and dtype of ``outs[0]``, not sharing
        memory with any part; returned as ``out``. Reusing one across calls skips the page
        faults of a fresh allocation (for tens of MB they cost as much as the merge itself).

    Returns
    -------
    out, lse : tuple of arrays
        The merged output (the dtype of ``outs``) and lse (float32, float64 for float64).
        A part with lse ``-inf`` (no visible key) contributes nothing; a row that is ``-inf``
        in every part gets output 0 and lse ``-inf``; NaN in a part's lse makes that row NaN.

    Raises
    ------
    ValueError
        No parts, a different number of outs and lses, a part whose shape differs from
        ``outs[0]``, an lse of the wrong shape, or a bad layout.
    TypeError
        A part that is not a float array, or parts of different dtypes.

    Examples
    --------
    >>> import numpy as np, mha_ext
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 2, 4, 8), dtype=np.float32) for _ in range(3))
    >>> parts = [mha_ext.attention(q, k[:, :, s], v[:, :, s], return_lse=True)
    ...          for s in (slice(0, 2), slice(2, 4))]
    >>> out, lse = mha_ext.merge([o for o, _ in parts], [l for _, l in parts])
    >>> bool(np.allclose(out, mha_ext.attention(q, k, v), atol=1e-6))
    True
    """
    if layout == "bhld":
        blhd = False
    elif layout == "blhd":
        blhd = True
    else:
        raise ValueError(f"layout: expected 'bhld' or 'blhd', got {layout!r}")
    if isinstance(outs, np.ndarray) or not isinstance(outs, Sequence):
        raise TypeError(f"outs: expected a list or tuple of arrays, got {type(outs).__name__}")
    if isinstance(lses, np.ndarray) or not isinstance(lses, Sequence):
        raise TypeError(f"lses: expected a list or tuple of arrays, got {type(lses).__name__}")
    return _core.merge(list(outs), list(lses), blhd, num_threads, out)
