"""Serving calls on the native core: merging partial results (SPEC section 6.1).

``merge`` combines attention outputs computed over disjoint key shards (split-KV decoding,
ring attention, keys spread over machines) into the result over the union of the keys.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from . import _core

__all__ = ["merge"]


def merge(
    outs: Sequence[np.ndarray],
    lses: Sequence[np.ndarray],
    *,
    layout: str = "bhld",
    num_threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Merge attention results over disjoint key shards by their log-sum-exp.

    ``outs[p]`` and ``lses[p]`` are what ``attention(q, k_p, v_p, return_lse=True)`` returned
    for the same queries and the p-th shard of the keys (any causal/mask options applied per
    shard). The result equals attention over all the keys::

        lse = log(sum_p exp(lse_p)),   out = sum_p exp(lse_p - lse) * out_p

    Parameters
    ----------
    outs : sequence of arrays
        The partial outputs, all of one shape and dtype: ``(B, H, Lq, Dv)`` for layout
        ``"bhld"``, ``(B, Lq, H, Dv)`` for ``"blhd"``, or the 3-D / 2-D forms.
    lses : sequence of arrays
        Their lse arrays, ``(B, H, Lq)`` (``(H, Lq)``, ``(Lq,)`` for 3-D / 2-D), whatever the
        layout; converted to float32 (float64 for float64 outputs).
    layout : {"bhld", "blhd"}
        The axis order of ``outs`` and of the merged output.
    num_threads : int, optional
        OpenMP threads for large inputs (default: the OpenMP default).

    Returns
    -------
    out, lse : tuple of arrays
        The merged output (the dtype of ``outs``) and lse (float32, float64 for float64).
        A part with lse ``-inf`` (no visible key) contributes nothing; a row that is ``-inf``
        in every part gets output 0 and lse ``-inf``; NaN in a part's lse makes that row NaN.

    Raises
    ------
    ValueError
        No parts, a different number of outs and lses, a part whose shape differs from
        ``outs[0]``, an lse of the wrong shape, or a bad layout.
    TypeError
        A part that is not a float array, or parts of different dtypes.

    Examples
    --------
    >>> import numpy as np, mha_ext
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 2, 4, 8), dtype=np.float32) for _ in range(3))
    >>> parts = [mha_ext.attention(q, k[:, :, s], v[:, :, s], return_lse=True)
    ...          for s in (slice(0, 2), slice(2, 4))]
    >>> out, lse = mha_ext.merge([o for o, _ in parts], [l for _, l in parts])
    >>> bool(np.allclose(out, mha_ext.attention(q, k, v), atol=1e-6))
    True
    """
    if layout == "bhld":
        blhd = False
    elif layout == "blhd":
        blhd = True
    else:
        raise ValueError(f"layout: expected 'bhld' or 'blhd', got {layout!r}")
    if isinstance(outs, np.ndarray) or not isinstance(outs, Sequence):
        raise TypeError(f"outs: expected a list or tuple of arrays, got {type(outs).__name__}")
    if isinstance(lses, np.ndarray) or not isinstance(lses, Sequence):
        raise TypeError(f"lses: expected a list or tuple of arrays, got {type(lses).__name__}")
    return _core.merge(list(outs), list(lses), blhd, num_threads)
