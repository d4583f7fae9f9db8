"""PyTorch bridge (SPEC 6.5, extra ``mha_ext[torch]``): attention that trains.

``mha_ext.torch.attention(q, k, v, **options)`` on CPU tensors is a ``torch.library`` custom
op (``mha_ext::attention``) with registered autograd: the forward keeps ``lse``, the backward
calls :func:`mha_ext.attention_backward`. It has a fake (meta) implementation, so it traces
under ``torch.compile`` and works inside any ``torch.nn`` model. Tensors whose last axis is
contiguous reach the native kernel without a copy (they are viewed as NumPy arrays); the
results are shared back the same way.

Importing ``mha_ext`` never imports torch: only ``import mha_ext.torch`` does.
"""

from __future__ import annotations

import numbers
from typing import Any, Optional, Union

import numpy as np
import torch

from . import _attention, _backward
from . import General as _NpGeneral

__all__ = ["General", "attention"]

_CAUSAL = {False: "none", None: "none", True: "bottom_right", "bottom_right": "bottom_right",
           "top_left": "top_left"}
_SCORES = ("scaled_dot", "dot", "general")


class General:
    """Luong's "general" score ``q W kᵀ`` with a trainable ``W`` tensor ``(D, Dk)``.

    The gradient of ``W`` flows like that of q, k, v (``W`` may be an ``nn.Parameter``).
    """

    def __init__(self, W: torch.Tensor) -> None:
        if not isinstance(W, torch.Tensor) or W.ndim != 2:
            raise TypeError("General.W: expected a 2-D torch tensor (D, Dk)")
        self.W = W

    def __repr__(self) -> str:
        return f"mha_ext.torch.General(W: {tuple(self.W.shape)})"


def _np(t: Optional[torch.Tensor]) -> Any:
    """A NumPy view of a CPU tensor (no copy; bfloat16 through its bits); None stays None."""
    if t is None:
        return None
    t = t.detach()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _torch(a: np.ndarray) -> torch.Tensor:
    """A tensor sharing a NumPy result (bfloat16 through its bits)."""
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _causal_arg(c: str) -> Union[bool, str]:
    return False if c == "none" else c


def _score_arg(score: str, W: Optional[torch.Tensor]):
    if score == "general":
        return _NpGeneral(_np(W))
    return score


def _lse_shape(q: torch.Tensor, layout: str) -> list[int]:
    s = list(q.shape)
    if layout == "blhd" and q.ndim >= 3:
        s[-3], s[-2] = s[-2], s[-3]
    return s[:-1]


def _out_shape(q: torch.Tensor, v: torch.Tensor) -> list[int]:
    return [*q.shape[:-1], v.shape[-1]]


@torch.library.custom_op("mha_ext::attention", mutates_args=(), device_types="cpu")
def _attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
    bias: Optional[torch.Tensor], causal: str, window_left: int, window_right: int,
    key_lengths: Optional[torch.Tensor], scale: Optional[float], score: str,
    W: Optional[torch.Tensor], alibi_slopes: Optional[torch.Tensor], softcap: Optional[float],
    layout: str, num_threads: Optional[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _attention.attention(
        _np(q), _np(k), _np(v), mask=_np(mask), bias=_np(bias), causal=_causal_arg(causal),
        window=(window_left, window_right), key_lengths=_np(key_lengths), scale=scale,
        score=_score_arg(score, W), alibi_slopes=_np(alibi_slopes), softcap=softcap,
        return_lse=True, layout=layout, num_threads=num_threads,
    )
    return _torch(out), _torch(lse)


@_attention_op.register_fake
def _(q, k, v, mask, bias, causal, window_left, window_right, key_lengths, scale, score, W,
      alibi_slopes, softcap, layout, num_threads):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(_out_shape(q, v)), q.new_empty(_lse_shape(q, layout), dtype=lse_dtype)


@torch.library.custom_op("mha_ext::attention_backward", mutates_args=(), device_types="cpu")
def _attention_backward_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, mask: Optional[torch.Tensor], bias: Optional[torch.Tensor], causal: str,
    window_left: int, window_right: int, key_lengths: Optional[torch.Tensor],
    scale: Optional[float], score: str, W: Optional[torch.Tensor],
    alibi_slopes: Optional[torch.Tensor], softcap: Optional[float], layout: str,
    num_threads: Optional[int], need_dbias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = _backward.attention_backward(
        _np(dout), _np(q), _np(k), _np(v), _np(out), _np(lse), mask=_np(mask), bias=_np(bias),
        causal=_causal_arg(causal), window=(window_left, window_right),
        key_lengths=_np(key_lengths), scale=scale, score=_score_arg(score, W),
        alibi_slopes=_np(alibi_slopes), softcap=softcap,
        return_dbias=need_dbias, layout=layout, num_threads=num_threads,
    )
    dq, dk, dv = (_torch(g) for g in grads[:3])
    rest = list(grads[3:])
    dW = q.new_empty(0)
    if score == "general" and W is not None:
        dW = _torch(rest.pop(0).W).to(W.dtype)
    dbias = q.new_empty(0)
    if need_dbias and bias is not None:
        dbias = _torch(rest.pop(0)).to(bias.dtype)
    return dq, dk, dv, dW, dbias


@_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, mask, bias, causal, window_left, window_right, key_lengths,
      scale, score, W, alibi_slopes, softcap, layout, num_threads, need_dbias):
    dW = torch.empty_like(W) if score == "general" else q.new_empty(0)
    dbias = torch.empty_like(bias) if need_dbias else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dW, dbias


_OPTION_NAMES = ("mask", "bias", "causal", "window_left", "window_right", "key_lengths",
                 "scale", "score", "W", "alibi_slopes", "softcap", "layout", "num_threads")


def _setup_context(ctx, inputs, output):
    q, k, v = inputs[:3]
    ctx.options = dict(zip(_OPTION_NAMES, inputs[3:]))
    ctx.save_for_backward(q, k, v, output[0], output[1], ctx.options["mask"],
                          ctx.options["bias"], ctx.options["key_lengths"], ctx.options["W"],
                          ctx.options["alibi_slopes"])


def _backward_fn(ctx, dout, dlse):
    q, k, v, out, lse, mask, bias, key_lengths, W, alibi_slopes = ctx.saved_tensors
    o = ctx.options
    if dout is None:
        dout = torch.zeros_like(out)
    need_dbias = bias is not None and ctx.needs_input_grad[4]
    dq, dk, dv, dW, dbias = _attention_backward_op(
        dout.contiguous() if dout.stride(-1) != 1 else dout, q, k, v, out, lse, mask, bias,
        o["causal"], o["window_left"], o["window_right"], key_lengths, o["scale"], o["score"],
        W, alibi_slopes, o["softcap"], o["layout"], o["num_threads"], need_dbias,
    )
    # No gradient for the ALiBi slopes (constants) nor the non-tensor options.
    return (dq, dk, dv, None, dbias if need_dbias else None, None, None, None, None, None,
            None, dW if o["score"] == "general" else None, None, None, None, None)


_attention_op.register_autograd(_backward_fn, setup_context=_setup_context)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    causal: Union[bool, str] = False,
    window: Optional[tuple[Optional[int], Optional[int]]] = None,
    key_lengths: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    score: Union[None, str, General] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
    layout: str = "bhld",
    num_threads: Optional[int] = None,
) -> torch.Tensor:
    """:func:`mha_ext.attention` on CPU tensors, differentiable (a ``torch.library`` op).

    Same options and conventions as :func:`mha_ext.attention` (bool ``mask`` with True = may
    attend, bottom-right ``causal=True``, ``layout="bhld"`` or ``"blhd"``); ``score`` is
    ``None``/``"scaled_dot"``, ``"dot"`` or :class:`General` with a trainable tensor.
    Gradients flow to q, k, v, ``bias`` (summed over its broadcast axes) and ``General.W``.
    ``alibi_slopes`` ((Hq,) or (B, Hq)) and ``softcap`` (``> 0``) act as in the forward; the
    softcap's tanh is differentiated, while the slopes are constants: they get no gradient
    (their ``.grad`` stays None even when they require grad).
    float32, float64, float16 and bfloat16 tensors; the result has q's dtype.

    Examples
    --------
    >>> import torch, mha_ext.torch
    >>> q, k, v = (torch.randn(1, 2, 5, 8, requires_grad=True) for _ in range(3))
    >>> out = mha_ext.torch.attention(q, k, v, causal=True)
    >>> out.sum().backward()
    >>> q.grad.shape
    torch.Size([1, 2, 5, 8])
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise ValueError(f"{name}: mha_ext.torch.attention runs on CPU tensors, got "
                             f"device {t.device}")
    try:
        causal_name = _CAUSAL[causal]
    except (KeyError, TypeError):
        raise ValueError(
            f"causal: expected False, True, 'bottom_right' or 'top_left', got {causal!r}"
        ) from None
    left, right = _attention._window(window)
    W = None
    if isinstance(score, General):
        score_name, W = "general", score.W
    elif score is None or score in ("scaled_dot", "dot"):
        score_name = score or "scaled_dot"
    else:
        raise ValueError("score: expected None, 'scaled_dot', 'dot' or mha_ext.torch.General, "
                         f"got {score!r}")
    if mask is not None and not isinstance(mask, torch.Tensor):
        mask = torch.as_tensor(np.asarray(mask))
    if key_lengths is not None and not isinstance(key_lengths, torch.Tensor):
        key_lengths = torch.as_tensor(np.asarray(key_lengths))
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor):
            alibi_slopes = torch.as_tensor(np.asarray(alibi_slopes))
        alibi_slopes = alibi_slopes.detach()  # constants: no gradient
    if softcap is not None and (isinstance(softcap, bool) or
                                not isinstance(softcap, numbers.Real)):
        raise TypeError(f"softcap: expected a float > 0 or None, got {type(softcap).__name__}")
    out, _lse = _attention_op(q, k, v, mask, bias, causal_name, left, right, key_lengths,
                              None if scale is None else float(scale), score_name, W,
                              alibi_slopes, None if softcap is None else float(softcap),
                              layout, num_threads)
    return out
