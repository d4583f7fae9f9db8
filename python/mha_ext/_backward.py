"""``mha_ext.attention_backward``: the gradients of :func:`mha_ext.attention` (SPEC 6.4).

Argument normalisation only (the array rule, names to codes, the window pair); the binding
checks dtypes, ranks and shapes (``out``/``lse``/``dout`` against q, k, v) and the native
kernel (csrc/cpu/kernel/backward.h) does all the numerics.
"""

from __future__ import annotations

from typing import Any, Union

import numpy as np
from numpy.typing import ArrayLike

from . import _core
from ._attention import (
    _CAUSAL,
    _CONCAT,
    _CPU,
    _CUDA,
    _NO_SCORE,
    Array,
    Score,
    _array,
    _array_like,
    _flag,
    _score,
    _split_concat,
    _window,
)
from ._scores import Additive, Concat, General

__all__ = ["attention_backward"]


def attention_backward(
    dout: Array,
    q: Array,
    k: Array,
    v: Array,
    out: Array,
    lse: Array,
    *,
    mask: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    causal: bool | str = False,
    window: tuple[int | None, int | None] | None = None,
    key_lengths: ArrayLike | None = None,
    scale: float | None = None,
    score: Score = None,
    alibi_slopes: ArrayLike | None = None,
    softcap: float | None = None,
    return_dbias: bool = False,
    layout: str = "bhld",
    device: str = "cpu",
    num_threads: int | None = None,
) -> tuple[Any, ...]:
    r"""Gradients of :func:`attention` with respect to q, k, v (and score parameters, bias).

    FlashAttention-2's backward, tiled like the forward: ``D = rowsum(dout * out)``, the
    probabilities recomputed tile by tile from ``lse``, ``dS = P * (dP - D)``; no
    ``Lq x Lk`` buffer exists. Accumulation is float32 (float64 for float64 inputs). The GIL
    is released while the kernel runs.

    Parameters
    ----------
    dout : array, shape of ``out``
        The gradient of the loss with respect to the forward's output, q's dtype.
    q, k, v : array
        The forward's inputs (same rules as :func:`attention`).
    out, lse : array
        The forward's output and lse (``attention(..., return_lse=True)``) for exactly these
        inputs and options; a shape or dtype that does not match q, k, v is an error.
    mask, bias, causal, window, key_lengths, scale, score, alibi_slopes, softcap, layout
        The forward's options, as passed to :func:`attention`. The softcap's tanh is
        differentiated (``dS * (1 - tanh^2)`` before the cap); ALiBi slopes are constants
        and get no gradient; ``dbias`` is the gradient after the cap, where the bias is added.
    return_dbias : bool, default False
        Also return the gradient of ``bias``, with the shape of ``bias`` (summed over its
        broadcast axes), float32 (float64 for float64 inputs).
    device : {"cpu", "auto"}, default "cpu"
        The backward runs on the CPU.
    num_threads : int, optional
        CPU threads; None uses the OpenMP default.

    Returns
    -------
    tuple
        ``(dq, dk, dv)`` in the input dtype and layout (under GQA ``dk``/``dv`` are summed
        over the query heads of each group); then, for a parametrised score, a score object
        of the same class holding the gradients of its parameters (``General(dW)``,
        ``Additive(dW_q, dW_k, dw)``, ``Concat(dW, dw)``, float32 or float64); then
        ``dbias`` when asked for.
        Rows that saw no key (lse ``-inf``) get zero gradients.

    Raises
    ------
    TypeError, ValueError
        As :func:`attention`, naming the argument; also for ``out``/``lse``/``dout`` that do
        not match q, k, v, and for ``return_dbias`` without a bias.

    Examples
    --------
    >>> import numpy as np, mha_ext
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 2, 6, 8), dtype=np.float32) for _ in range(3))
    >>> out, lse = mha_ext.attention(q, k, v, causal=True, return_lse=True)
    >>> dq, dk, dv = mha_ext.attention_backward(np.ones_like(out), q, k, v, out, lse,
    ...                                         causal=True)
    >>> dq.shape, dk.dtype
    ((1, 2, 6, 8), dtype('float32'))
    """
    dout = _array(dout, "dout")
    q, k, v = _array(q, "q"), _array(k, "k"), _array(v, "v")
    out = _array(out, "out")
    lse = _array(lse, "lse")
    if mask is not None:
        mask = _array_like(mask, "mask")
    if bias is not None:
        bias = _array_like(bias, "bias")
    if key_lengths is not None:
        key_lengths = _array_like(key_lengths, "key_lengths")
    if alibi_slopes is not None:
        alibi_slopes = _array_like(alibi_slopes, "alibi_slopes")
    try:
        causal_code = _CAUSAL[causal]
    except (KeyError, TypeError):
        raise ValueError(
            f"causal: expected False, True, 'bottom_right' or 'top_left', got {causal!r}"
        ) from None
    if layout not in ("bhld", "blhd"):
        raise ValueError(f"layout: expected 'bhld' or 'blhd', got {layout!r}")
    if device in ("cpu", "auto"):
        dev = _CPU
    elif device == "cuda":
        dev = _CUDA
    else:
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'auto', got {device!r}")
    left, right = _window(window)
    kind, w1, w2, w3 = _NO_SCORE if score is None else _score(score)
    if kind is _CONCAT:
        w1, w2 = _split_concat(q, w1)
        kind = _core.Score.ADDITIVE
    dscore: Any
    dbias: Any
    dq, dk, dv, dscore, dbias = _core.attention_backward(
        dout, q, k, v, out, lse, mask, bias, causal_code, left, right, key_lengths, scale,
        kind, w1, w2, w3, alibi_slopes, softcap, layout == "blhd", dev, num_threads,
        _flag(return_dbias, "return_dbias"),
    )
    grads: list[Union[np.ndarray, General, Additive, Concat]] = [dq, dk, dv]
    if isinstance(score, General):
        grads.append(General(dscore[0]))
    elif isinstance(score, Additive):
        grads.append(Additive(*dscore))
    elif isinstance(score, Concat):
        # [q; k] W = q W[:D] + k W[D:]: dW stacks the two halves.
        grads.append(Concat(np.concatenate([dscore[0], dscore[1]]), dscore[2]))
    if return_dbias:
        grads.append(dbias)
    return tuple(grads)
