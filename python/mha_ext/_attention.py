"""``mha_ext.attention`` and its argument normalisation (SPEC section 3).

Only what needs the Python objects happens here (names to codes, the window pair, flags); the
binding checks types, dtypes, ranks and broadcastability, and every value invariant lives in
the native ``check_params()``.
"""

from __future__ import annotations

import numpy as np

from . import _core
from ._scores import Additive, Concat, General

__all__ = ["attention", "build_info", "cuda_available"]

# Python names -> the native codes (IntEnums exported by _core, defined once in C++).
_C, _S, _D = _core.Causal, _core.Score, _core.Device
_CAUSAL = {
    False: _C.NONE, None: _C.NONE, True: _C.BOTTOM_RIGHT,
    "bottom_right": _C.BOTTOM_RIGHT, "top_left": _C.TOP_LEFT,
}
_SCORES = {None: _S.SCALED_DOT, "scaled_dot": _S.SCALED_DOT, "dot": _S.DOT}
_CPU, _CUDA = _D.CPU, _D.CUDA
_NO_SCORE = (_S.SCALED_DOT, None, None, None)  # the per-call path reads no enum attribute
_CONCAT = object()  # _score's marker for Concat (split into the additive pair below)

# The arguments attention() passes to _core.attention, in the order it passes them. The order
# is defined once, in C++ (MHA_ATTENTION_ARGS in bindings.cpp, exported as
# _core.ATTENTION_ARGS); this copy only lets a mismatch fail at import instead of silently.
# The call is positional because CPython turns a call with more than 13 keyword arguments
# into a dict call (CALL_FUNCTION_EX), which doubles the cost of a tiny attention call.
_CORE_ARGS = (
    "q", "k", "v", "mask", "bias", "causal", "window_left", "window_right", "key_lengths",
    "scale", "score", "score_wq", "score_wk", "score_w", "return_weights", "return_lse",
    "blhd", "device", "num_threads", "out",
)
if _core.ATTENTION_ARGS[: len(_CORE_ARGS)] != _CORE_ARGS:
    raise ImportError(
        "mha_ext._core and mha_ext._attention disagree on the argument order of "
        f"_core.attention: {_core.ATTENTION_ARGS} vs {_CORE_ARGS} (a stale build?)"
    )


def cuda_available() -> bool:
    """True when the CUDA backend was built and a GPU is visible (never raises)."""
    return _core.cuda_available()


def build_info() -> dict:
    """The build and the machine: version, SIMD path, OpenMP threads, CUDA architectures."""
    info = _core.build_info()
    info["cuda_available"] = _core.cuda_available()
    return info


def _window(window):
    if window is None:
        return -1, -1
    try:
        left, right = window
    except (TypeError, ValueError):
        raise ValueError(
            f"window: expected None or a (left, right) pair, got {window!r}"
        ) from None
    out = []
    for name, x in (("left", left), ("right", right)):
        if x is None:
            out.append(-1)
        elif isinstance(x, bool) or not hasattr(x, "__index__"):
            raise TypeError(f"window: {name} must be an int or None, got {x!r}")
        else:
            out.append(x.__index__())
    return out[0], out[1]


def _flag(x, name):
    """A bool argument: True/False (NumPy bools and the ints 0/1 too), else TypeError."""
    if x is True or x is False:
        return x
    if isinstance(x, (int, np.bool_)) and x in (0, 1):
        return bool(x)
    raise TypeError(f"{name}: expected True or False, got {x!r}")


def _score(score):
    kind = _SCORES.get(score) if score is None or isinstance(score, str) else None
    if kind is not None:
        return kind, None, None, None
    if isinstance(score, General):
        return _S.GENERAL, score.W, None, None
    if isinstance(score, Additive):
        return _S.ADDITIVE, score.W_q, score.W_k, score.w
    if isinstance(score, Concat):
        # [q; k] W = q W[:D] + k W[D:]: the additive kernel with a split matrix. D is only
        # known from q, so the split happens in _split_concat.
        return _CONCAT, score.W, None, score.w
    raise ValueError(
        "score: expected None, 'scaled_dot', 'dot', mha_ext.General, mha_ext.Additive or "
        f"mha_ext.Concat, got {score!r}"
    )


def attention(
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
    return_weights=False,
    return_lse=False,
    layout="bhld",
    device="cpu",
    num_threads=None,
    out=None,
):
    """Multi-head attention ``softmax(score(q, k) + masks) @ v`` on the native core.

    Shapes (layout ``"bhld"``): ``q (B, Hq, Lq, D)``, ``k (B, Hk, Lk, Dk)``,
    ``v (B, Hk, Lk, Dv)`` give ``out (B, Hq, Lq, Dv)``. Layout ``"blhd"`` swaps the L and H
    axes (FlashAttention's layout); 3-D ``(H, L, D)`` and 2-D ``(L, D)`` inputs give a result
    of the same rank. ``Hq`` must be a multiple of ``Hk``: query head h reads key/value head
    ``h // (Hq // Hk)`` (grouped-query attention). Views are read through their strides.

    Masks, all optional and combinable, always in ``(B, Hq, Lq, Lk)`` axis order:

    - ``mask``: bool, broadcastable; **True = may attend** (like PyTorch SDPA; the opposite of
      ``torch.nn.MultiheadAttention``'s masks). For a 0/1 "1 = hidden" mask pass ``m == 0``.
    - ``bias``: float, broadcastable, added to the scores (ALiBi, relative positions, -inf).
    - ``key_lengths``: int ``(B,)``; keys ``j >= key_lengths[b]`` are padding and never read.
    - ``causal``: ``False``, ``True``/``"bottom_right"`` (key j visible to query i iff
      ``j <= i + Lk_b - Lq``, FlashAttention's alignment, right for KV caches) or
      ``"top_left"`` (``j <= i``, PyTorch's ``is_causal``).
    - ``window``: ``(left, right)``, keys ``i + off - left <= j <= i + off + right`` on the
      causal diagonal (``off = Lk_b - Lq``, or 0 with ``causal="top_left"``); ``None`` or -1
      for an unbounded side.

    A query row that can see no key gets output 0, weights 0 and lse ``-inf`` (never NaN).

    ``score``: ``None``/``"scaled_dot"`` (``scale`` defaults to ``1/sqrt(D)``), ``"dot"``,
    ``General(W)``, ``Additive(W_q, W_k, w)`` or ``Concat(W, w)`` (``scale`` defaults to 1).

    Returns ``out``, or the tuple ``(out, weights, lse)`` restricted to what was asked for:
    ``weights (B, Hq, Lq, Lk)`` and ``lse (B, Hq, Lq)`` in float32 (float64 for float64 input).

    dtypes: float32, float64, float16 and ``ml_dtypes.bfloat16``, one for q, k, v; the output
    has it too; accumulation is in float32 (float64 for float64). ``device``: ``"cpu"``,
    ``"cuda"`` or ``"auto"``. ``num_threads``: None = OpenMP default (``OMP_NUM_THREADS``).
    ``out``: a preallocated C-contiguous result array, returned. The GIL is released while
    the kernel runs.
    """
    try:
        causal_code = _CAUSAL[causal]
    except (KeyError, TypeError):
        raise ValueError(
            f"causal: expected False, True, 'bottom_right' or 'top_left', got {causal!r}"
        ) from None
    if layout == "bhld":
        blhd = False
    elif layout == "blhd":
        blhd = True
    else:
        raise ValueError(f"layout: expected 'bhld' or 'blhd', got {layout!r}")
    if device == "cpu":
        dev = _CPU
    elif device == "cuda":
        dev = _CUDA
    elif device == "auto":
        dev = _CUDA if _core.cuda_available() else _CPU
    else:
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'auto', got {device!r}")
    left, right = (-1, -1) if window is None else _window(window)
    kind, w1, w2, w3 = _NO_SCORE if score is None else _score(score)
    if kind is _CONCAT:
        w1, w2 = _split_concat(q, w1)
        kind = _S.ADDITIVE
    # Positional, in _CORE_ARGS order (checked against _core.ATTENTION_ARGS at import).
    return _core.attention(
        q, k, v, mask, bias, causal_code, left, right, key_lengths, scale, kind, w1, w2, w3,
        return_weights if return_weights is False or return_weights is True
        else _flag(return_weights, "return_weights"),
        return_lse if return_lse is False or return_lse is True
        else _flag(return_lse, "return_lse"),
        blhd, dev, num_threads, out,
    )

def _split_concat(q, W):
    """Concat's W (D + Dk, A) as the additive pair (W[:D], W[D:])."""
    shape = np.shape(q) if q is not None else ()
    if len(shape) < 2:
        raise ValueError(f"q: expected 2, 3 or 4 dimensions, got shape {shape}")
    d = shape[-1]
    if W.shape[0] <= d:
        raise ValueError(
            f"Concat.W: expected shape (D + Dk, A) with D = {d} and Dk >= 1, got {W.shape}"
        )
    return W[:d], W[d:]
