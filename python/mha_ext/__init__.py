"""mha_ext: tiled ("flash") multi-head attention with masking for NumPy.

The native core (C++/OpenMP on the CPU, CUDA on NVIDIA GPUs) computes attention with an
online softmax: no Lq x Lk matrix exists unless the weights are asked for. See
``mha_ext.attention`` and the README for conventions (mask polarity, causal alignment).
"""

from __future__ import annotations

from . import _core
from ._attention import attention, build_info, cuda_available
from ._backward import attention_backward
from ._scores import Additive, Concat, General
from .layers import MultiHeadAttention, TransformerDecoderLayer, TransformerEncoderLayer
from .s2 import S2Attention
from .serving import merge

__version__: str = _core.build_info()["version"]

__all__ = [
    "Additive",
    "Concat",
    "General",
    "MultiHeadAttention",
    "S2Attention",
    "TransformerDecoderLayer",
    "TransformerEncoderLayer",
    "__version__",
    "attention",
    "attention_backward",
    "build_info",
    "cuda_available",
    "merge",
]
