"""Type stubs for the native module mha_ext._core (see mha_ext.attention for the API)."""

import enum
from typing import Any

import numpy as np

class Causal(enum.IntEnum):
    NONE = 0
    BOTTOM_RIGHT = 1
    TOP_LEFT = 2

class Device(enum.IntEnum):
    CPU = 0
    CUDA = 1

class Score(enum.IntEnum):
    SCALED_DOT = 0
    DOT = 1
    GENERAL = 2
    ADDITIVE = 3

# The argument names of attention(), in positional order (defined once, in C++).
ATTENTION_ARGS: tuple[str, ...]
MAX_THREADS: int

# Arguments after q, k, v may be positional (ATTENTION_ARGS order) or keywords; absent ones
# take the defaults below. The parameter list follows ATTENTION_ARGS (a test checks it).
def attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    mask: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    causal: int = 0,
    window_left: int = -1,
    window_right: int = -1,
    key_lengths: np.ndarray | None = None,
    scale: float | None = None,
    score: int = 0,
    score_wq: np.ndarray | None = None,
    score_wk: np.ndarray | None = None,
    score_w: np.ndarray | None = None,
    return_weights: bool = False,
    return_lse: bool = False,
    blhd: bool = False,
    device: int = 0,
    num_threads: int | None = None,
    out: np.ndarray | None = None,
    naive: bool = False,
    alibi_slopes: np.ndarray | None = None,
    softcap: float | None = None,
) -> np.ndarray | tuple[np.ndarray, ...]: ...
def attention_varlen(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    cu_seqlens_q: np.ndarray,
    cu_seqlens_k: np.ndarray,
    causal: int = 0,
    window_left: int = -1,
    window_right: int = -1,
    scale: float | None = None,
    score: int = 0,
    score_wq: np.ndarray | None = None,
    score_wk: np.ndarray | None = None,
    score_w: np.ndarray | None = None,
    alibi_slopes: np.ndarray | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
    device: int = 0,
    num_threads: int | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]: ...
def attention_kvcache(
    q: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    cache_seqlens: np.ndarray,
    block_table: np.ndarray | None = None,
    causal: int = 1,
    window_left: int = -1,
    window_right: int = -1,
    scale: float | None = None,
    alibi_slopes: np.ndarray | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
    num_splits: int | None = None,
    device: int = 0,
    num_threads: int | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]: ...
def build_info() -> dict[str, Any]: ...
def cuda_available() -> bool: ...
def cuda_last_kernel_ms() -> float: ...
def cuda_last_copy_ms() -> float: ...
def s2_attention(
    x: np.ndarray, logits: np.ndarray | None = None, num_threads: int | None = None
) -> np.ndarray: ...
def merge(
    outs: list[Any],
    lses: list[Any],
    blhd: bool = False,
    num_threads: int | None = None,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]: ...
def attention_backward(
    dout: Any,
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    mask: Any = None,
    bias: Any = None,
    causal: int = 0,
    window_left: int = -1,
    window_right: int = -1,
    key_lengths: Any = None,
    scale: float | None = None,
    score: Any = 0,
    score_wq: Any = None,
    score_wk: Any = None,
    score_w: Any = None,
    alibi_slopes: Any = None,
    softcap: float | None = None,
    blhd: bool = False,
    device: int = 0,
    num_threads: int | None = None,
    return_dbias: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[np.ndarray, ...] | None, np.ndarray | None]: ...
def _check_params(overrides: dict[str, Any]) -> None: ...
def bias_act(
    x: np.ndarray,
    bias: np.ndarray | None,
    activation: int,
    out: np.ndarray,
    num_threads: int | None = None,
) -> None: ...
def add_norm(
    x: np.ndarray,
    y: np.ndarray | None,
    y_bias: np.ndarray | None,
    weight: np.ndarray | None,
    bias: np.ndarray | None,
    eps: float,
    sum_out: np.ndarray | None,
    out: np.ndarray | None,
    num_threads: int | None = None,
) -> None: ...
def nn_simd() -> str: ...
def _set_simd(name: str) -> str: ...
def _tanh(x: np.ndarray) -> np.ndarray: ...
