"""Shared helpers of the layers (argument checks, conversions, state dicts, norms, activations).

Used by ``layers.py`` and ``s2.py``; not public API.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from . import _core

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))



def _positive_int(x, name: str) -> int:
    if isinstance(x, bool) or not hasattr(x, "__index__"):
        raise TypeError(f"{name}: expected a positive int, got {x!r}")
    x = x.__index__()
    if x < 1:
        raise ValueError(f"{name}: expected a positive int, got {x}")
    return x


def _layer_dtype(dtype) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype: expected float32 or float64, got {dtype!r}") from None
    if dt not in _DTYPES:
        raise TypeError(f"dtype: expected float32 or float64, got {dt}")
    return dt


def _rng(seed) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is not None and (isinstance(seed, bool) or not hasattr(seed, "__index__")):
        raise TypeError(f"seed: expected None, an int or a numpy Generator, got {seed!r}")
    if seed is not None and seed.__index__() < 0:
        raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
    return np.random.default_rng(seed)


def _flag(x, name: str) -> bool:
    if not isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {x!r}")
    return bool(x)


def _to_numpy(x) -> np.ndarray:
    """A NumPy array from an array-like or a torch tensor (without importing torch)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
        if str(getattr(x, "dtype", "")) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _real(x, name: str, dtype: np.dtype) -> np.ndarray:
    """``x`` as an array of the layer's dtype; bool, complex and object arrays are refused."""
    a = _to_numpy(x)
    if a.dtype.kind not in "fiu" and a.dtype.name != "bfloat16":
        raise TypeError(f"{name}: expected a real numeric array, got dtype {a.dtype}")
    return np.asarray(a, dtype=dtype)


def _param(value, name: str, shape: tuple, dtype: np.dtype) -> np.ndarray:
    a = _real(value, name, dtype)
    if a.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {a.shape}")
    return np.ascontiguousarray(a)


def _bool_mask(m, name: str) -> np.ndarray:
    a = _to_numpy(m)
    if a.dtype != np.bool_:
        raise TypeError(
            f"{name}: expected a bool array (True = may attend / real token), got dtype "
            f"{a.dtype}. For a 0/1 mask where 1 means hidden pass `{name}=(m == 0)`; a "
            "PyTorch bool mask (True = hidden) is `~m`; a float additive mask goes to "
            "MultiHeadAttention's `attn_bias=`."
        )
    return a


def _xavier(rng: np.random.Generator, fan_in: int, fan_out: int, dtype) -> np.ndarray:
    """Glorot/Xavier uniform (torch.nn.init.xavier_uniform_), as an (in, out) matrix."""
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-bound, bound, size=(fan_in, fan_out)).astype(dtype)


def _linear_init(rng: np.random.Generator, fan_in: int, fan_out: int, dtype, bias: bool):
    """torch.nn.Linear's default: weight and bias uniform in ±1/sqrt(fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)
    w = rng.uniform(-bound, bound, size=(fan_in, fan_out)).astype(dtype)
    b = rng.uniform(-bound, bound, size=(fan_out,)).astype(dtype) if bias else None
    return w, b


def _state_dict(state_dict) -> Mapping:
    if hasattr(state_dict, "state_dict") and callable(state_dict.state_dict):
        state_dict = state_dict.state_dict()
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"state_dict: expected a mapping of names to arrays/tensors (or a torch module), "
            f"got {type(state_dict).__name__}"
        )
    return state_dict


def _take(sd: Mapping, key: str, shape: tuple, dtype: np.dtype, used: set) -> np.ndarray:
    if key not in sd:
        raise ValueError(f"state_dict: missing key {key!r}")
    used.add(key)
    return _param(sd[key], f"state_dict[{key!r}]", shape, dtype)


def _check_unused(sd: Mapping, used: set) -> None:
    extra = sorted(k for k in sd if k not in used)
    if extra:
        raise ValueError(f"state_dict: unexpected keys {extra} (not part of this layer)")


# ------------------------------------------------------------------------------------------
# Elementwise and row-wise numerics: thin wrappers over the native kernels (csrc/cpu/nn_cpu.cpp).
# float32/float64 run natively; other real dtypes go through float64 and are cast back.

_ACT_CODES = {"none": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "erf": 4}


def _rows(x: np.ndarray) -> np.ndarray:
    """``x`` if the kernels can read it as (rows, last axis) without a copy, else a C copy."""
    if x.ndim <= 1 or x.flags.c_contiguous:
        return x if x.ndim >= 1 else x.reshape(1)
    if x.strides[-1] == x.itemsize:
        lead = x.strides[-2]
        ok = True
        for k in range(x.ndim - 3, -1, -1):
            lead *= x.shape[k + 1]
            ok = ok and (x.shape[k] == 1 or x.strides[k] == lead)
        if ok and x.strides[-2] >= x.shape[-1] * x.itemsize:
            return x
    return np.ascontiguousarray(x)


def _native_float(x) -> tuple[np.ndarray, np.dtype | None]:
    """(array the kernels take, dtype to cast the result back to or None)."""
    a = np.asarray(x)
    if a.dtype in _DTYPES:
        return a, None
    back = a.dtype if a.dtype.kind == "f" else None
    return a.astype(np.float64), back


def _bias_act(x: np.ndarray, bias, act: str, out: np.ndarray | None = None) -> np.ndarray:
    """``act(x + bias)`` over the last axis in the native core; ``out`` may be ``x``.

    ``x``: float32/float64 with a contiguous last axis; ``bias``: None or ``(x.shape[-1],)``
    of the same dtype; ``act``: ``"none"``, ``"relu"``, ``"gelu"``, ``"gelu_tanh"``, ``"erf"``.
    """
    if out is None:
        out = np.empty(x.shape, x.dtype)
    _core.bias_act(x, bias, _ACT_CODES[act], out)
    return out


def _add_norm(x, y, y_bias, weight, bias, eps: float, *, sum_out=None, out=None) -> None:
    """Native ``s = x + (y + y_bias)``; ``sum_out = s``; ``out = layer_norm(s)`` (last axis)."""
    _core.add_norm(x, y, y_bias, weight, bias, float(eps), sum_out, out)


def _elementwise(x, act: str) -> np.ndarray:
    a, back = _native_float(x)
    y = _bias_act(_rows(a), None, act)
    y = y.reshape(a.shape)
    return y if back is None else y.astype(back)


def layer_norm(x: np.ndarray, weight, bias, eps: float, *, residual=None) -> np.ndarray:
    """LayerNorm over the last axis: ``(s - mean) / sqrt(var + eps) * weight + bias``.

    ``s = x`` (or ``x + residual`` when ``residual`` is given: the post-norm Add & Norm in one
    pass). ``var`` is the biased variance (like torch.nn.LayerNorm); ``weight`` and ``bias``
    may be None (1 and 0). Runs in the native core, mean and variance accumulated in double.
    """
    a, back = _native_float(x)
    a = _rows(a)
    dt = a.dtype
    w = None if weight is None else np.ascontiguousarray(weight, dtype=dt)
    b = None if bias is None else np.ascontiguousarray(bias, dtype=dt)
    r = None
    if residual is not None:
        r = _rows(np.asarray(residual, dtype=dt))
        if r.shape != a.shape:
            raise ValueError(f"residual: expected shape {a.shape}, got {r.shape}")
    out = np.empty(a.shape, dt)
    _add_norm(a, r, None, w, b, eps, out=out)
    return out if back is None else out.astype(back)


def erf(x) -> np.ndarray:
    """The error function, elementwise, in float64 (max abs error ≈ 2e-16, native core)."""
    return _elementwise(np.asarray(x, dtype=np.float64), "erf")


def gelu(x, approximate: str = "none") -> np.ndarray:
    """GELU ``x · Φ(x) = x/2 · (1 + erf(x/√2))`` (``approximate="none"``, torch's default).

    ``approximate="tanh"``: ``x/2 · (1 + tanh(√(2/π) (x + 0.044715 x³)))``. Computed in the
    native core in double precision and rounded to ``x.dtype`` (float32: within 1 ulp of the
    exact value; float64: ~1e-16 absolute). ``gelu(-inf) = 0``, NaN stays NaN.
    """
    if approximate == "none":
        return _elementwise(x, "gelu")
    if approximate == "tanh":
        return _elementwise(x, "gelu_tanh")
    raise ValueError(f"approximate: expected 'none' or 'tanh', got {approximate!r}")


def gelu_tanh(x) -> np.ndarray:
    """``gelu(x, approximate="tanh")``."""
    return _elementwise(x, "gelu_tanh")


def relu(x) -> np.ndarray:
    """``max(x, 0)`` (NaN stays NaN), native core."""
    return _elementwise(x, "relu")


_ACTIVATIONS = {"relu": relu, "gelu": gelu, "gelu_tanh": gelu_tanh}


def _activation(activation):
    if callable(activation):
        return activation
    try:
        return _ACTIVATIONS[activation]
    except (KeyError, TypeError):
        raise ValueError(
            f"activation: expected 'relu', 'gelu', 'gelu_tanh' or a callable, got {activation!r}"
        ) from None



def _check_broadcast(a: np.ndarray, full: tuple, name: str) -> None:
    if a.ndim > len(full):
        raise ValueError(
            f"{name}: expected at most {len(full)} dims broadcastable to {full}, "
            f"got shape {a.shape}"
        )
    for got, want in zip(a.shape[::-1], full[::-1]):
        if got not in (1, want):
            raise ValueError(f"{name}: shape {a.shape} is not broadcastable to {full}")


def _to_4d(a: np.ndarray) -> np.ndarray:
    """A mask/bias checked against (B, H, Lq, Lk) or (H, Lq, Lk), as a 4-D view."""
    return a.reshape((1,) * (4 - a.ndim) + a.shape) if a.ndim < 4 else a
