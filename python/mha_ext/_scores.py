"""The parametrised score functions: General, Additive, Concat.

They only hold their weights; the native kernel computes the scores tile by tile.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["Additive", "Concat", "General"]


def _as_float_array(x: ArrayLike, name: str) -> np.ndarray:
    # The array rule of mha_ext.attention (DLPack / __array__ / nested sequences; no masked
    # arrays, no tensors that require grad). Imported here: _attention imports this module.
    from ._attention import _array_like

    a = _array_like(x, name)
    if a.dtype.kind not in "fiu" and a.dtype.name != "bfloat16":
        raise TypeError(f"{name}: expected a real floating-point array, got dtype {a.dtype}")
    return a


class General:
    """Luong's "general" score ``s(q, k) = q W kᵀ``, for ``score=`` of :func:`attention`.

    It is a dot score on ``q W``; the default scale is 1.

    Parameters
    ----------
    W : array_like, shape (D, Dk)
        D is the query head size, Dk the key head size (they may differ). Kept as
        :attr:`W` (a NumPy array; torch tensors and other arrays follow the rule of
        :func:`attention`).

    Raises
    ------
    TypeError
        ``W`` is not a real numeric array.
    ValueError
        ``W`` is not 2-D. A ``D`` that does not match q is an error of the call.

    Examples
    --------
    >>> import numpy as np, mha_ext
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((1, 2, 5, 8), dtype=np.float32)
    >>> k, v = (rng.standard_normal((1, 2, 7, 6), dtype=np.float32) for _ in range(2))
    >>> score = mha_ext.General(rng.standard_normal((8, 6)))
    >>> mha_ext.attention(q, k, v, score=score).shape
    (1, 2, 5, 6)
    """

    W: np.ndarray

    def __init__(self, W: ArrayLike) -> None:
        self.W = _as_float_array(W, "General.W")
        if self.W.ndim != 2:
            raise ValueError(f"General.W: expected a 2-D matrix (D, Dk), got shape {self.W.shape}")

    def __repr__(self) -> str:
        return f"General(W: {self.W.shape})"


class Additive:
    """Bahdanau's additive score ``s(q, k) = w · tanh(q W_q + k W_k)``.

    Computed tile by tile in the native kernel: memory stays O(L·A), never O(Lq·Lk·A). The
    default scale is 1.

    Parameters
    ----------
    W_q : array_like, shape (D, A)
        Query projection.
    W_k : array_like, shape (Dk, A)
        Key projection.
    w : array_like, shape (A,)
        The output vector.

    Raises
    ------
    TypeError
        An argument is not a real numeric array.
    ValueError
        The shapes do not agree on ``A``.

    Examples
    --------
    >>> import numpy as np, mha_ext
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 2, 5, 8), dtype=np.float32) for _ in range(3))
    >>> add = mha_ext.Additive(rng.standard_normal((8, 16)), rng.standard_normal((8, 16)),
    ...                        rng.standard_normal(16))
    >>> mha_ext.attention(q, k, v, score=add, causal=True).shape
    (1, 2, 5, 8)
    """

    W_q: np.ndarray
    W_k: np.ndarray
    w: np.ndarray

    def __init__(self, W_q: ArrayLike, W_k: ArrayLike, w: ArrayLike) -> None:
        self.W_q = _as_float_array(W_q, "Additive.W_q")
        self.W_k = _as_float_array(W_k, "Additive.W_k")
        self.w = _as_float_array(w, "Additive.w")
        if self.w.ndim != 1:
            raise ValueError(f"Additive.w: expected a vector (A,), got shape {self.w.shape}")
        for name, m in (("W_q", self.W_q), ("W_k", self.W_k)):
            if m.ndim != 2 or m.shape[1] != self.w.shape[0]:
                raise ValueError(
                    f"Additive.{name}: expected shape (*, A) with A = {self.w.shape[0]}, "
                    f"got {m.shape}"
                )

    def __repr__(self) -> str:
        return f"Additive(W_q: {self.W_q.shape}, W_k: {self.W_k.shape}, w: {self.w.shape})"


class Concat:
    """The concat score ``s(q, k) = w · tanh([q; k] W)``.

    It equals the additive score with ``W_q = W[:D]`` and ``W_k = W[D:]``, and runs on the
    same tiled kernel. The default scale is 1.

    Parameters
    ----------
    W : array_like, shape (D + Dk, A)
        The projection of the concatenated query and key.
    w : array_like, shape (A,)
        The output vector.

    Raises
    ------
    TypeError
        An argument is not a real numeric array.
    ValueError
        The shapes do not agree on ``A`` (``D`` is checked against q by the call).

    Examples
    --------
    >>> import numpy as np, mha_ext
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 2, 5, 8), dtype=np.float32) for _ in range(3))
    >>> cat = mha_ext.Concat(rng.standard_normal((16, 16)), rng.standard_normal(16))
    >>> mha_ext.attention(q, k, v, score=cat).shape
    (1, 2, 5, 8)
    """

    W: np.ndarray
    w: np.ndarray

    def __init__(self, W: ArrayLike, w: ArrayLike) -> None:
        self.W = _as_float_array(W, "Concat.W")
        self.w = _as_float_array(w, "Concat.w")
        if self.w.ndim != 1:
            raise ValueError(f"Concat.w: expected a vector (A,), got shape {self.w.shape}")
        if self.W.ndim != 2 or self.W.shape[1] != self.w.shape[0]:
            raise ValueError(
                f"Concat.W: expected shape (D + Dk, A) with A = {self.w.shape[0]}, "
                f"got {self.W.shape}"
            )

    def __repr__(self) -> str:
        return f"Concat(W: {self.W.shape}, w: {self.w.shape})"
