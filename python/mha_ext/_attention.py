"""``mha_ext.attention`` and its argument normalisation.

Only what needs the Python objects happens here (arrays from other libraries, names to codes,
the window pair, flags); the binding checks dtypes, ranks and broadcastability, and every value
invariant lives in the native ``check_params()``.

Arrays from other libraries (one rule, NumPy's own protocols; see ``_array``):

- a ``numpy.ndarray`` is used as it is (views through their strides);
- an object with ``__dlpack__`` (PyTorch, JAX, CuPy, ...) whose memory is on the CPU is
  shared through ``np.from_dlpack``: no copy; GPU memory is refused;
- otherwise an object with ``__array__`` goes through ``np.asarray`` (its own protocol decides
  whether that copies);
- q, k and v must be one of those: a list, tuple or scalar carries no dtype, and the dtype of
  q, k, v chooses the kernel and the output dtype, so it is refused (``np.asarray(x,
  dtype=np.float32)`` says what is meant). mask, bias, key_lengths and the score weights have
  their dtype fixed by their role and also take nested sequences (``key_lengths=[7, 5]``);
- a ``numpy.ma.MaskedArray`` is refused everywhere: its mask would be ignored.

The result is always NumPy (``torch.from_numpy(out)`` shares it back without a copy).
"""

from __future__ import annotations

import importlib.util
from typing import Any, Literal, Protocol, Union, overload

import numpy as np
from numpy.typing import ArrayLike

from . import _core
from ._scores import Additive, Concat, General


class SupportsArray(Protocol):
    """Anything ``np.asarray`` converts through the ``__array__`` protocol."""

    def __array__(self) -> np.ndarray: ...


class SupportsDLPack(Protocol):
    """Anything ``np.from_dlpack`` accepts: a CPU tensor of PyTorch, JAX, CuPy (host), ..."""

    def __dlpack__(self) -> Any: ...


#: q, k, v: an array that has a dtype of its own (NumPy, or a DLPack / ``__array__`` object).
Array = Union[np.ndarray, SupportsArray, SupportsDLPack]
#: The score function: a name or a parametrised score object.
Score = Union[None, str, General, Additive, Concat]

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
    "blhd", "device", "num_threads", "out", "naive", "alibi_slopes", "softcap",
)
if _core.ATTENTION_ARGS[: len(_CORE_ARGS)] != _CORE_ARGS:
    raise ImportError(
        "mha_ext._core and mha_ext._attention disagree on the argument order of "
        f"_core.attention: {_core.ATTENTION_ARGS} vs {_CORE_ARGS} (a stale build?)"
    )


def cuda_available() -> bool:
    """Whether the CUDA backend was built and a GPU is visible.

    Never raises: a CUDA build on a machine without a GPU or driver returns False (and
    ``attention(..., device="cuda")`` then raises ``RuntimeError``).

    Returns
    -------
    bool
    """
    return _core.cuda_available()


def build_info() -> dict[str, Any]:
    """The build and the machine, as a dict.

    Returns
    -------
    dict
        ``version``, ``simd`` (the CPU kernel path in use), ``openmp`` and ``max_threads``,
        ``cuda_built``, ``cuda_archs``, ``cuda_available``, ``compiler`` and the rest of what
        the native module reports.

    Examples
    --------
    >>> import mha_ext
    >>> info = mha_ext.build_info()
    >>> sorted(k for k in ("version", "simd", "openmp") if k in info)
    ['openmp', 'simd', 'version']
    """
    info = _core.build_info()
    info["cuda_available"] = _core.cuda_available()
    return info


def _torch_bridge_hint() -> str:
    if importlib.util.find_spec("mha_ext.torch") is not None:
        return "; for gradients use the PyTorch bridge mha_ext.torch"
    return "; mha_ext is forward-only today (no bridge that carries gradients yet)"


def _from_protocols(x: Any, name: str) -> np.ndarray | None:
    """``x`` through DLPack (CPU, no copy) or ``__array__``; None when it has neither."""
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(
            f"{name}: got a numpy.ma.MaskedArray, whose mask would be ignored; pass its data "
            f"and express the mask as mask= (True = may attend), e.g. {name}.filled(0) and "
            f"mask=~np.ma.getmaskarray(...)"
        )
    if isinstance(x, np.ndarray):
        return x if type(x) is np.ndarray else np.asarray(x)
    if getattr(x, "requires_grad", False) is True:
        raise TypeError(
            f"{name}: got a {type(x).__name__} that requires grad; mha_ext takes and returns "
            f"plain arrays and cannot carry the gradient: pass {name}.detach() to use its "
            f"values{_torch_bridge_hint()}"
        )
    if hasattr(x, "__dlpack__"):
        device = getattr(x, "__dlpack_device__", None)
        if device is not None:
            kind = int(device()[0])
            if kind not in (1, 3):  # kDLCPU, kDLCUDAHost (pinned host memory)
                raise TypeError(
                    f"{name}: got a {type(x).__name__} in device memory (DLPack device type "
                    f"{kind}); mha_ext takes host (CPU) arrays, also for device='cuda' (it "
                    f"copies them to the GPU itself): move it to the CPU first, e.g. "
                    f"{name}.cpu() or np.asarray(...)"
                )
        try:
            return np.from_dlpack(x)
        except (BufferError, RuntimeError, TypeError, ValueError) as e:
            dtype = str(getattr(x, "dtype", ""))
            if "bfloat16" in dtype:
                raise TypeError(
                    f"{name}: a {dtype} {type(x).__name__} cannot be shared with NumPy "
                    f"(NumPy has no bfloat16); view its bits without a copy, e.g. for torch "
                    f"{name}.view(torch.int16).numpy().view(ml_dtypes.bfloat16)"
                ) from None
            if not hasattr(x, "__array__"):
                raise TypeError(
                    f"{name}: could not share the {type(x).__name__} through DLPack ({e})"
                ) from None
    if hasattr(x, "__array__"):
        try:
            return np.asarray(x)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(
                f"{name}: could not convert the {type(x).__name__} with np.asarray ({e})"
            ) from None
    return None


def _array(x: Any, name: str) -> np.ndarray:
    """q, k, v: a NumPy array, a DLPack CPU tensor or an ``__array__`` object; no lists."""
    a = _from_protocols(x, name)
    if a is None:
        hint = (
            f"; wrap it as np.asarray({name}, dtype=np.float32) (a {type(x).__name__} has no "
            "dtype, and q, k, v choose the kernel's dtype)"
            if isinstance(x, (list, tuple, int, float, complex))
            else ""
        )
        raise TypeError(
            f"{name}: expected a NumPy array or an array exposing __dlpack__ or __array__ "
            f"(a CPU torch tensor, a JAX array, ...), got {type(x).__name__}{hint}"
        )
    return a


def _array_like(x: Any, name: str) -> np.ndarray:
    """mask, bias, key_lengths, score weights: also nested sequences (dtype from the role)."""
    a = _from_protocols(x, name)
    return np.asarray(x) if a is None else a


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
            n = x.__index__()
            # The native field is int64 (check_params() checks the value); up to 2**63 - 1
            # every window is valid and a huge one means unbounded.
            if not -_INT64_MAX - 1 <= n <= _INT64_MAX:
                raise ValueError(
                    f"window: {name} must fit in int64 (use None for unbounded), got {n}"
                )
            out.append(n)
    return out[0], out[1]


_INT64_MAX = 2**63 - 1


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


@overload
def attention(
    q: Array,
    k: Array,
    v: Array,
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
    return_weights: Literal[False] = False,
    return_lse: Literal[False] = False,
    layout: str = "bhld",
    device: str = "cpu",
    num_threads: int | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray: ...


@overload
def attention(
    q: Array,
    k: Array,
    v: Array,
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
    return_weights: Literal[True],
    return_lse: Literal[False] = False,
    layout: str = "bhld",
    device: str = "cpu",
    num_threads: int | None = None,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]: ...


@overload
def attention(
    q: Array,
    k: Array,
    v: Array,
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
    return_weights: Literal[False] = False,
    return_lse: Literal[True],
    layout: str = "bhld",
    device: str = "cpu",
    num_threads: int | None = None,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]: ...


@overload
def attention(
    q: Array,
    k: Array,
    v: Array,
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
    return_weights: Literal[True],
    return_lse: Literal[True],
    layout: str = "bhld",
    device: str = "cpu",
    num_threads: int | None = None,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


@overload
def attention(
    q: Array,
    k: Array,
    v: Array,
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
    return_weights: bool = False,
    return_lse: bool = False,
    layout: str = "bhld",
    device: str = "cpu",
    num_threads: int | None = None,
    out: np.ndarray | None = None,
) -> Union[np.ndarray, tuple[np.ndarray, ...]]: ...


def attention(
    q: Array,
    k: Array,
    v: Array,
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
    return_weights: bool = False,
    return_lse: bool = False,
    layout: str = "bhld",
    device: str = "cpu",
    num_threads: int | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray | tuple[np.ndarray, ...]:
    r"""Multi-head attention ``softmax(score(q, k) + masks) @ v`` on the native core.

    The forward pass of scaled-dot-product attention and its classic variants, computed tile
    by tile with an online softmax: no ``Lq x Lk`` matrix is built unless ``return_weights``
    asks for it. The GIL is released while the kernel runs.

    Parameters
    ----------
    q : array, shape (B, Hq, Lq, D)
        Queries (layout ``"bhld"``; ``(B, Lq, Hq, D)`` with ``"blhd"``). 3-D ``(H, L, D)``
        and 2-D ``(L, D)`` inputs give a result of the same rank; q, k and v must have the
        same rank. float32, float64, float16 or ``ml_dtypes.bfloat16``, the same for q, k
        and v. A NumPy array, or a CPU array of another library through ``__dlpack__``
        (shared without a copy) or ``__array__``; lists and scalars are refused (they have
        no dtype). Views are read through their strides.
    k : array, shape (B, Hk, Lk, Dk)
        Keys. ``Hq`` must be a multiple of ``Hk``: query head ``h`` reads key/value head
        ``h // (Hq // Hk)`` (grouped-query attention; ``Hk = 1`` is multi-query). ``Dk = D``
        except with ``General`` / ``Additive`` / ``Concat`` scores.
    v : array, shape (B, Hk, Lk, Dv)
        Values; ``Dv`` may differ from ``D``.
    mask : array_like of bool, optional
        Broadcastable to ``(B, Hq, Lq, Lk)`` (whatever the layout); **True = may attend**,
        like PyTorch's ``scaled_dot_product_attention`` and the opposite of
        ``torch.nn.MultiheadAttention``'s bool masks. A ``(B, Lk)`` padding mask is passed
        as ``mask[:, None, None, :]``; a 0/1 "1 = hidden" mask as ``m == 0``. Broadcast
        through zero strides, never materialised.
    bias : array_like of float, optional
        Broadcastable to ``(B, Hq, Lq, Lk)``, added to the scores (ALiBi, relative
        positions, ``-inf`` masks).
    causal : {False, True, "bottom_right", "top_left"}, default False
        ``True`` / ``"bottom_right"``: key ``j`` is visible to query ``i`` iff
        ``j <= i + Lk_b - Lq`` (FlashAttention's alignment, right for KV caches; ``Lk_b`` is
        ``key_lengths[b]`` when given, else ``Lk``). ``"top_left"``: ``j <= i`` (PyTorch's
        ``is_causal``). Both are the usual lower triangle when ``Lq == Lk``.
    window : (left, right), optional
        Sliding window on the causal diagonal: keys ``i + off - left <= j <= i + off +
        right`` with ``off = Lk_b - Lq`` (0 with ``causal="top_left"``). ``None`` or -1 for
        an unbounded side.
    key_lengths : array_like of int, shape (B,), optional
        Keys ``j >= key_lengths[b]`` are padding and never read (whole tiles are skipped).
    scale : float, optional
        Factor on the scores: default ``1/sqrt(D)`` for the scaled-dot score, 1 for the
        others. Must be finite.
    score : {None, "scaled_dot", "dot"} or General or Additive or Concat, optional
        The score function, see :class:`General`, :class:`Additive` and :class:`Concat`.
        Every mask, causal, window, GQA and return option works with every score.
    alibi_slopes : array_like of float, shape (Hq,) or (B, Hq), optional
        ALiBi (FlashAttention's): adds ``-slope[b, h] * |i + off - j|`` to the scores, with
        ``off`` as for the window; computed in the kernel, no bias array is built.
    softcap : float, optional
        ``> 0``: the scores become ``softcap * tanh(s / softcap)`` (Gemma 2), after the scale
        and before bias, ALiBi and the masks.
    return_weights : bool, default False
        Also return the softmax probabilities ``(B, Hq, Lq, Lk)``.
    return_lse : bool, default False
        Also return the log-sum-exp of each row's scores ``(B, Hq, Lq)`` (natural log of the
        softmax denominator, scale included).
    layout : {"bhld", "blhd"}, default "bhld"
        Axis order of q, k, v and out; masks, bias, weights and lse keep ``(B, Hq, Lq, Lk)``.
    device : {"cpu", "cuda", "auto"}, default "cpu"
        Where the kernel runs; inputs and outputs are host NumPy arrays on every device.
        ``"auto"`` is ``"cuda"`` when :func:`cuda_available`.
    num_threads : int, optional
        CPU threads; None uses the OpenMP default (``OMP_NUM_THREADS``).
    out : numpy.ndarray, optional
        A preallocated C-contiguous result of the exact shape and dtype that overlaps no
        input; it is written and returned.

    Returns
    -------
    out : numpy.ndarray, shape (B, Hq, Lq, Dv)
        In the dtype of q (layout as the input). Returned alone when neither
        ``return_weights`` nor ``return_lse`` is set.
    weights : numpy.ndarray, shape (B, Hq, Lq, Lk)
        Only with ``return_weights``; float32 (float64 for float64 inputs).
    lse : numpy.ndarray, shape (B, Hq, Lq)
        Only with ``return_lse``; float32 (float64 for float64 inputs).

    The tuple is ``(out, weights, lse)`` restricted to what was asked for. A query row that
    can see no key gets output 0, weights 0 and lse ``-inf`` (never NaN).

    Raises
    ------
    TypeError
        A wrong type or dtype (mixed q/k/v dtypes, a non-bool ``mask``, a list for q, a
        torch tensor that requires grad, a masked array); the message names the argument.
    ValueError
        A wrong shape, rank or value (ranks differ, Hq not a multiple of Hk, a mask that
        does not broadcast, negative ``key_lengths``, an unknown ``causal``/``layout``); the
        message names the argument and, where one exists, the fix.
    RuntimeError
        ``device="cuda"`` without a usable GPU.
    KeyboardInterrupt
        Ctrl-C during a long call (the kernel stops within tens of milliseconds).

    See Also
    --------
    MultiHeadAttention : the layer with projections around this call.

    Examples
    --------
    >>> import numpy as np, mha_ext
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 4, 16, 8), dtype=np.float32) for _ in range(3))
    >>> mha_ext.attention(q, k, v, causal=True).shape
    (2, 4, 16, 8)
    >>> pad = np.arange(16) < np.array([16, 10])[:, None]             # (B, Lk), True = token
    >>> out, lse = mha_ext.attention(q, k, v, mask=pad[:, None, None, :], return_lse=True)
    >>> lse.shape
    (2, 4, 16)
    """
    q = q if type(q) is np.ndarray else _array(q, "q")
    k = k if type(k) is np.ndarray else _array(k, "k")
    v = v if type(v) is np.ndarray else _array(v, "v")
    if mask is not None and type(mask) is not np.ndarray:
        mask = _array_like(mask, "mask")
    if bias is not None and type(bias) is not np.ndarray:
        bias = _array_like(bias, "bias")
    if key_lengths is not None and type(key_lengths) is not np.ndarray:
        key_lengths = _array_like(key_lengths, "key_lengths")
    if alibi_slopes is not None and type(alibi_slopes) is not np.ndarray:
        alibi_slopes = _array_like(alibi_slopes, "alibi_slopes")
    if out is not None and isinstance(out, np.ma.MaskedArray):
        raise TypeError("out: expected a NumPy array, got a numpy.ma.MaskedArray")
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
        blhd, dev, num_threads, out, False, alibi_slopes, softcap,
    )


def _split_concat(q: Any, W: Any) -> tuple[np.ndarray, np.ndarray]:
    """Concat's W (D + Dk, A) as the additive pair (W[:D], W[D:])."""
    shape: tuple[int, ...] = np.shape(q) if q is not None else ()
    if len(shape) < 2:
        raise ValueError(f"q: expected 2, 3 or 4 dimensions, got shape {shape}")
    d = shape[-1]
    if W.shape[0] <= d:
        raise ValueError(
            f"Concat.W: expected shape (D + Dk, A) with D = {d} and Dk >= 1, got {W.shape}"
        )
    return W[:d], W[d:]
