"""S2Attention: the spatial-shift MLP block with split attention of S2-MLPv2.

Yu et al. 2021, "S2-MLPv2: Improved Spatial-Shift MLP Architecture for Vision"
(arXiv:2108.01072), in the form the attention tutorials popularised, for inference on NumPy
``(B, C, H, W)`` arrays. The Linear layers use NumPy's BLAS (``@``); the spatial shifts, the
branch/pixel sums and the softmax-weighted combination run on the native core
(``csrc/cpu/s2_cpu.cpp``), which reads the shifted branches through index arithmetic and never
writes its input.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from . import _core
from ._nn import (
    _check_unused,
    _layer_dtype,
    _linear_init,
    _positive_int,
    _real,
    _rng,
    _state_dict,
    _take,
    gelu,
)

__all__ = ["S2Attention"]


class S2Attention:
    """The S2-MLPv2 block: project to three branches, shift two, split attention, project.

    Parameters
    ----------
    channels : int
        ``C``, the channels of the ``(B, C, H, W)`` input.
    dtype : {numpy.float32, numpy.float64}, default numpy.float32
        The dtype of the weights and of the computation.
    seed : int or numpy.random.Generator, optional
        Seeds the initial weights (None: fresh entropy).

    Raises
    ------
    TypeError, ValueError
        A bad argument; the message names it.

    Notes
    -----
    Called on ``x`` of shape ``(B, C, H, W)`` with ``C = channels``, it returns a new
    C-contiguous ``(B, C, H, W)`` array of the layer's dtype (``x`` is converted to it and
    never modified). With ``x`` read channels last, ``X[b, i, j, :] = x[b, :, i, j]``:

    1. ``Y = X @ w1 + b1`` ``(B, H, W, 3C)``; branch ``k`` is ``Y[..., k*C:(k+1)*C]``.
    2. Branch 0 goes through shift1, branch 1 through shift2, branch 2 is unchanged. Each
       shift splits the channels into quarters at ``C//4, C//2, 3*C//4`` (as the reference;
       ``C`` need not be a multiple of 4: ``C = 6`` gives quarters of 1, 2, 1, 2 channels) and
       takes each quarter from a neighbouring pixel, out of place:

       ========  ============  ============  ============  ============
       quarter   0             1             2             3
       ========  ============  ============  ============  ============
       shift1    ``[i-1, j]``  ``[i+1, j]``  ``[i, j-1]``  ``[i, j+1]``
       shift2    ``[i, j-1]``  ``[i, j+1]``  ``[i-1, j]``  ``[i+1, j]``
       ========  ============  ============  ============  ============

       ``i`` is the row (axis H), ``j`` the column (axis W). A pixel whose source lies outside
       the image keeps its own value (the source index is clamped into the image).
    3. Split attention over the three shifted branches ``S_k``: ``a = Σ_k Σ_ij S_k[b, i, j]``
       ``(B, C)``; ``hat = gelu(a @ w_sa1) @ w_sa2`` ``(B, 3C)`` (exact erf GELU); ``bar`` is
       the softmax over ``k`` of ``hat[:, k*C + c]``; ``Z = Σ_k bar[:, k] * S_k``.
    4. ``out = Z @ w2 + b2``, returned channels first.

    The weights are NumPy attributes applied as ``x @ w + b`` (``w`` is ``(in, out)``, the
    transpose of ``torch.nn.Linear.weight``):

    ======  ========  ============================================================
    name    shape     role
    ======  ========  ============================================================
    w1      (C, 3C)   first projection (``mlp1``); b1 (3C,)
    w_sa1   (C, C)    split attention, first layer (no bias)
    w_sa2   (C, 3C)   split attention, second layer (no bias): logits of the branches
    w2      (C, C)    output projection (``mlp2``); b2 (C,)
    ======  ========  ============================================================

    Initial weights and biases follow ``torch.nn.Linear`` (uniform in ``±1/sqrt(fan_in)``).
    ``seed``: an int, ``None`` (fresh entropy) or a ``np.random.Generator``.

    Fixed with respect to the popular tutorial code: its shifts assign overlapping slices of
    one tensor in place, so PyTorch reads rows and columns that were already shifted (a
    forward shift smears the first row over the image); here every shift reads the unshifted
    branch. And its ``SplitAttention`` is built with a fixed width of 512 whatever
    ``channels`` is; here the split-attention width is ``channels``.

    ``load_torch(state_dict)`` copies a module laid out like the reference (``mlp1``,
    ``mlp2``, ``split_attention.mlp1``, ``split_attention.mlp2``).

    Examples
    --------
    >>> import numpy as np, mha_ext
    >>> block = mha_ext.S2Attention(16, seed=0)
    >>> x = np.random.default_rng(0).standard_normal((2, 16, 5, 7)).astype(np.float32)
    >>> block(x).shape
    (2, 16, 5, 7)
    """

    def __init__(
        self,
        channels: int,
        *,
        dtype: DTypeLike = np.float32,
        seed: int | np.random.Generator | None = None,
    ) -> None:
        self.channels = _positive_int(channels, "channels")
        self.dtype = _layer_dtype(dtype)
        rng = _rng(seed)
        c, dt = self.channels, self.dtype
        self.w1, self.b1 = _linear_init(rng, c, 3 * c, dt, bias=True)
        self.w_sa1, _ = _linear_init(rng, c, c, dt, bias=False)
        self.w_sa2, _ = _linear_init(rng, c, 3 * c, dt, bias=False)
        self.w2, self.b2 = _linear_init(rng, c, c, dt, bias=True)

    def __repr__(self) -> str:
        return f"S2Attention({self.channels}, dtype={self.dtype.name})"

    def load_torch(self, state_dict: Mapping[str, Any] | Any) -> S2Attention:
        """Copy the weights of a PyTorch S2Attention module.

        Parameters
        ----------
        state_dict : Mapping
            ``module.state_dict()`` (tensors or NumPy arrays; the module itself is accepted
            too) with the reference layout.

        Returns
        -------
        S2Attention
            ``self``.

        Raises
        ------
        ValueError
            Missing or unknown keys, or a wrong shape (the message names the key).

        Notes
        -----
        The mapping (``nn.Linear`` weights are ``(out, in)``):

        - ``mlp1.weight (3C, C)``, ``mlp1.bias (3C,)`` → ``w1 = mlp1.weight.T``, ``b1``;
        - ``split_attention.mlp1.weight (C, C)`` → ``w_sa1`` (transposed);
        - ``split_attention.mlp2.weight (3C, C)`` → ``w_sa2`` (transposed);
        - ``mlp2.weight (C, C)``, ``mlp2.bias (C,)`` → ``w2 = mlp2.weight.T``, ``b2``.

        A module built by the tutorial code with its fixed ``SplitAttention`` width of 512 and
        ``channels != 512`` cannot run, and its split-attention weights have the wrong shape:
        a ``ValueError`` names the key.
        """
        sd = _state_dict(state_dict)
        used: set = set()
        c, dt = self.channels, self.dtype
        w1 = _take(sd, "mlp1.weight", (3 * c, c), dt, used).T
        b1 = _take(sd, "mlp1.bias", (3 * c,), dt, used)
        w_sa1 = _take(sd, "split_attention.mlp1.weight", (c, c), dt, used).T
        w_sa2 = _take(sd, "split_attention.mlp2.weight", (3 * c, c), dt, used).T
        w2 = _take(sd, "mlp2.weight", (c, c), dt, used).T
        b2 = _take(sd, "mlp2.bias", (c,), dt, used)
        _check_unused(sd, used)
        self.w1, self.b1 = np.ascontiguousarray(w1), b1
        self.w_sa1, self.w_sa2 = np.ascontiguousarray(w_sa1), np.ascontiguousarray(w_sa2)
        self.w2, self.b2 = np.ascontiguousarray(w2), b2
        return self

    def _weights(self) -> Mapping:
        c, dt = self.channels, self.dtype
        shapes = {
            "w1": (c, 3 * c),
            "b1": (3 * c,),
            "w_sa1": (c, c),
            "w_sa2": (c, 3 * c),
            "w2": (c, c),
            "b2": (c,),
        }
        out = {}
        for name, shape in shapes.items():
            a = _real(getattr(self, name), name, dt)
            if a.shape != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {a.shape}")
            out[name] = a
        return out

    def __call__(self, x: ArrayLike) -> np.ndarray:
        """Apply the block to ``x``.

        Parameters
        ----------
        x : array_like, shape (B, C, H, W)
            ``C = channels``; converted to the layer's dtype, never modified.

        Returns
        -------
        numpy.ndarray, shape (B, C, H, W)
            A new C-contiguous array of the layer's dtype.

        Raises
        ------
        TypeError, ValueError
            ``x`` is not a real array of rank 4 with ``channels`` channels.
        """
        x = _real(x, "x", self.dtype)
        if x.ndim != 4:
            raise ValueError(f"x: expected 4 dimensions (B, C, H, W), got shape {x.shape}")
        b, c, h, w = x.shape
        if c != self.channels:
            raise ValueError(
                f"x: expected C = channels = {self.channels} on axis 1 of (B, C, H, W), got "
                f"shape {x.shape}"
            )
        p = self._weights()
        # (B, C, H*W) viewed as (B, H*W, C): the channels-last permutation without a copy.
        xt = x.reshape(b, c, h * w).transpose(0, 2, 1)
        y = np.matmul(xt, p["w1"])  # (B, H*W, 3C), C-contiguous
        y += p["b1"]
        y = y.reshape(b, h, w, 3 * c)
        sums = _core.s2_attention(y)  # (B, C): branches and pixels summed, shifts applied
        logits = gelu(sums @ p["w_sa1"]) @ p["w_sa2"]  # (B, 3C)
        z = _core.s2_attention(y, np.ascontiguousarray(logits, dtype=self.dtype))
        # out[b] = w2.T @ Z[b].T + b2: (B, C, H*W) directly, i.e. (B, C, H, W) C-contiguous.
        out = np.matmul(p["w2"].T, z.reshape(b, h * w, c).transpose(0, 2, 1))
        out += p["b2"][:, None]
        return out.reshape(b, c, h, w)
