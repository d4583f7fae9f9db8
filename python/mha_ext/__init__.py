"""mha_ext: tiled ("flash") multi-head attention with masking for NumPy.

The native core (C++/OpenMP on the CPU, CUDA on NVIDIA GPUs) computes attention with an
online softmax: no Lq x Lk matrix exists unless the weights are asked for. See
``mha_ext.attention`` and the README for conventions (mask polarity, causal alignment).
"""

from __future__ import annotations

import os as _os

# The OpenMP runtime reads its environment once, when it is loaded with _core (see the README,
# "Threads and processes"). Two settings are made for that moment only, then the environment
# and the importing thread's CPU affinity are put back, so children and other libraries see
# exactly what the user set:
# - OMP_WAIT_POLICY=passive unless OMP_WAIT_POLICY or GOMP_SPINCOUNT is already set: by
#   default libgomp's idle workers spin ~300,000 pause instructions (milliseconds) after every
#   parallel region, time that NumPy's BLAS threads (and other processes) need between
#   attention calls; passive workers sleep at once and cost a wake-up at the next call
#   (benchmarks/bench_threads.py measures both);
# - OMP_PROC_BIND=true makes libgomp pin the loading thread to the first place at load, which
#   every later thread and subprocess would inherit: the affinity is restored (the OpenMP
#   workers are still bound as asked).
_set_env = []
if "OMP_WAIT_POLICY" not in _os.environ and "GOMP_SPINCOUNT" not in _os.environ:
    _os.environ["OMP_WAIT_POLICY"] = "passive"
    _set_env.append("OMP_WAIT_POLICY")
_affinity = _os.sched_getaffinity(0) if hasattr(_os, "sched_getaffinity") else None
try:
    from . import _core
finally:
    for _name in _set_env:
        del _os.environ[_name]
    if _affinity is not None and _os.sched_getaffinity(0) != _affinity:
        _os.sched_setaffinity(0, _affinity)
del _set_env, _affinity
from ._attention import attention, build_info, cuda_available
from ._backward import attention_backward
from ._scores import Additive, Concat, General
from .layers import MultiHeadAttention, TransformerDecoderLayer, TransformerEncoderLayer
from .s2 import S2Attention
from .serving import attention_kvcache, attention_varlen, merge

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
    "attention_kvcache",
    "attention_varlen",
    "build_info",
    "cuda_available",
    "merge",
]
