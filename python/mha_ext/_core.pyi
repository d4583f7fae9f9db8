"""Type stubs for the native module mha_ext._core (see mha_ext.attention for the API)."""

from typing import Any

import numpy as np

def attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    mask: np.ndarray | None,
    bias: np.ndarray | None,
    causal: int,
    window_left: int,
    window_right: int,
    key_lengths: np.ndarray | None,
    scale: float | None,
    score: int,
    score_wq: np.ndarray | None,
    score_wk: np.ndarray | None,
    score_w: np.ndarray | None,
    return_weights: bool,
    return_lse: bool,
    blhd: bool,
    device: int,
    num_threads: int | None,
    out: np.ndarray | None,
    naive: bool = False,
) -> np.ndarray | tuple[np.ndarray, ...]: ...
def build_info() -> dict[str, Any]: ...
def cuda_available() -> bool: ...
def cuda_last_kernel_ms() -> float: ...
def cuda_last_copy_ms() -> float: ...
def s2_attention(
    x: np.ndarray, logits: np.ndarray | None = None, num_threads: int | None = None
) -> np.ndarray: ...
def merge(
    outs: list[Any], lses: list[Any], blhd: bool = False, num_threads: int | None = None
) -> tuple[np.ndarray, np.ndarray]: ...
