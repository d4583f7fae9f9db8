"""The classic attention layers on top of ``mha_ext.attention``.

``MultiHeadAttention``, ``TransformerEncoderLayer`` and ``TransformerDecoderLayer``: the layers
that the tutorials build by hand, for inference on batch-first NumPy arrays. The projections
and the feed-forward network use NumPy's BLAS (``@``); the attention itself (scores, masks,
softmax, weighted sum) runs on the native core, split into heads through strides (layout
``"blhd"``), so no head transpose is copied and no Lq x Lk matrix exists unless the weights are
asked for.

Conventions shared by every layer here:

- **Weights** are plain NumPy attributes, applied as ``x @ w + b`` (``w`` is ``(in, out)``:
  the transpose of ``torch.nn.Linear.weight``). ``load_torch`` transposes for you.
- **Masks** follow this library's polarity everywhere: a bool ``mask`` is **True = may
  attend** and a bool ``key_padding_mask`` ``(B, Lk)`` is **True = real token**. PyTorch's
  bool masks (``attn_mask``, ``key_padding_mask``, ``src_mask``, ...) mean the opposite
  (True = hidden): pass ``~torch_mask``. A PyTorch float mask (0 / ``-inf``) ``m`` becomes
  ``mask=(m == 0)`` when it holds only 0 and ``-inf``; ``MultiHeadAttention`` also takes any
  float additive mask as ``attn_bias=m``. Keras' masks already mean True = may attend.
- A query row that can see no key gets a zero attention output and zero weights (PyTorch
  gives NaN there).
- ``dtype`` is float32 or float64; inputs of any real dtype are converted to it.
- ``seed``: an int, ``None`` (fresh OS entropy, like ``np.random.default_rng``) or a
  ``np.random.Generator``; the same int gives the same weights.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional, Union

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from ._attention import attention
from ._nn import (
    _ACTIVATIONS,
    _activation,
    _add_norm,
    _bias_act,
    _bool_mask,
    _check_broadcast,
    _check_unused,
    _flag,
    _layer_dtype,
    _linear_init,
    _param,
    _positive_int,
    _real,
    _rng,
    _state_dict,
    _take,
    _to_4d,
    _to_numpy,
    _xavier,
    layer_norm,
)
from ._scores import Additive, Concat, General
from .serving import attention_varlen

__all__ = [
    "MultiHeadAttention",
    "Packing",
    "TransformerDecoderLayer",
    "TransformerEncoderLayer",
    "encoder_stack",
]


# ------------------------------------------------------------------------------------------
# Packing (FlashAttention's unpad_input / pad_input) and per-thread scratch buffers


class Packing:
    """The real tokens of a padded batch, for layers that work on packed tokens only.

    ``Packing(key_padding_mask)`` with a bool ``(B, L)`` mask, **True = real token** (any
    positions: suffix, prefix or scattered padding). ``pack(x)`` gathers the real rows of
    ``x (B, L, ...)`` into ``(N, ...)``, ``N = num_tokens``, in batch-then-position order;
    ``unpack(y)`` scatters ``(N, ...)`` back to ``(B, L, ...)`` with **zeros at the padded
    positions**. Attributes: ``batch``, ``length``, ``lengths (B,)`` (real tokens per
    sequence), ``offsets (B + 1,)`` (sequence b is rows ``offsets[b]:offsets[b+1]`` of a packed
    array), ``index (N,)`` (flat positions in ``B * L``), ``num_tokens``.

    The encoder and decoder layers pack internally whenever a key padding mask is given (and
    no dense mask): projections, feed-forward, norms and attention then touch only the N real
    tokens. To keep a stack of layers packed between layers (pack once, unpack once), use
    ``layer.forward_packed(x, packing)`` or ``encoder_stack(layers, src, key_padding_mask=m)``.
    """

    def __init__(self, key_padding_mask, name: str = "key_padding_mask"):
        m = _bool_mask(key_padding_mask, name)
        if m.ndim != 2:
            raise ValueError(f"{name}: expected shape (B, L), got {m.shape}")
        m = np.ascontiguousarray(m)
        self.batch, self.length = m.shape
        self.lengths = m.sum(axis=1, dtype=np.int64)
        self.offsets = np.zeros(self.batch + 1, np.int64)
        np.cumsum(self.lengths, out=self.offsets[1:])
        self.index = np.flatnonzero(m)
        self.num_tokens = int(self.index.size)
        self.mask = m

    @classmethod
    def dense(cls, batch: int, length: int) -> Packing:
        """The packing of a batch without padding."""
        return cls(np.ones((batch, length), bool))

    def pack(self, x: np.ndarray) -> np.ndarray:
        """``(B, L, ...)`` -> ``(N, ...)``: the rows of the real tokens (one gather copy)."""
        x = np.asarray(x)
        if x.shape[:2] != (self.batch, self.length):
            raise ValueError(
                f"x: expected shape ({self.batch}, {self.length}, ...), got {x.shape}"
            )
        flat = x.reshape((self.batch * self.length,) + x.shape[2:])
        if self.num_tokens == flat.shape[0]:
            return np.ascontiguousarray(flat)
        return flat.take(self.index, axis=0)

    def unpack(self, y: np.ndarray) -> np.ndarray:
        """``(N, ...)`` -> ``(B, L, ...)`` with zeros at the padded positions."""
        y = np.asarray(y)
        if y.shape[0] != self.num_tokens:
            raise ValueError(f"y: expected {self.num_tokens} rows, got {y.shape}")
        if self.num_tokens == self.batch * self.length:
            return y.reshape((self.batch, self.length) + y.shape[1:])
        out = np.zeros((self.batch * self.length,) + y.shape[1:], y.dtype)
        out[self.index] = y
        return out.reshape((self.batch, self.length) + y.shape[1:])


class _Scratch:
    """Per-thread scratch buffers of a layer, reused across calls.

    Only intermediates live here (projections, attention output, the FFN hidden layer): a
    layer never returns a scratch buffer, and each thread has its own, so one layer object
    can serve several threads at once.
    """

    def _buf(self, name: str, shape: tuple, dtype: np.dtype) -> np.ndarray:
        tls = self.__dict__.get("_tls")
        if tls is None:
            tls = self.__dict__.setdefault("_tls", threading.local())
        n = math.prod(shape)
        buf = getattr(tls, name, None)
        if buf is None or buf.size < n or buf.dtype != dtype:
            buf = np.empty(n, dtype)
            setattr(tls, name, buf)
        return buf[:n].reshape(shape)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_tls", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)


def _matmul_2d(x: np.ndarray, w: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``x @ w`` for ``x (..., k)`` as ONE 2-D BLAS GEMM over all leading rows.

    NumPy's stacked matmul of a 3-D ``x`` by a 2-D ``w`` runs one GEMM per leading index: on
    (8, 512, 384) @ (384, 384) that measured 1.4-4x slower than the same product as
    (4096, 384) @ (384, 384) (OpenBLAS, 2 threads). ``x.reshape`` is a view whenever the rows
    are evenly strided (every layer input here); ``out`` must reshape to a view or is used as
    given.
    """
    if x.ndim <= 2:
        return np.matmul(x, w) if out is None else np.matmul(x, w, out=out)
    x2 = x.reshape(-1, x.shape[-1])
    if out is None:
        return np.matmul(x2, w).reshape(*x.shape[:-1], w.shape[-1])
    o2 = out.view()
    try:
        o2.shape = (-1, out.shape[-1])  # raises instead of copying when it can't be a view
    except AttributeError:
        return np.matmul(x, w, out=out)
    np.matmul(x2, w, out=o2)
    return out


def _matmul_bias(x: np.ndarray, w: np.ndarray, b, out: np.ndarray | None = None) -> np.ndarray:
    """``x @ w + b`` (one 2-D BLAS GEMM, then the native bias add in place)."""
    y = _matmul_2d(x, w, out)
    if b is not None:
        _bias_act(y, b, "none", out=y)
    return y


def _causal_arg(causal, name: str):
    if isinstance(causal, np.bool_):
        causal = bool(causal)
    if not (
        isinstance(causal, bool)
        or (isinstance(causal, str) and causal in ("bottom_right", "top_left"))
    ):
        raise ValueError(f"{name}: expected False, True, 'bottom_right' or 'top_left', got {causal!r}")
    return causal


# ------------------------------------------------------------------------------------------
# MultiHeadAttention


class MultiHeadAttention(_Scratch):
    """Multi-head attention: project, split heads, attend (native core), concat, project.

    Parameters
    ----------
    embed_dim : int
        ``E``, the model width; a multiple of ``num_heads``.
    num_heads : int
        ``H``, the query heads; each has ``hd = E // H`` features.
    kdim, vdim : int, optional
        Feature sizes of ``key`` and ``value`` (default ``embed_dim``).
    num_kv_heads : int, optional
        ``Hk``, the key/value heads (default ``H``); ``H % Hk == 0``: grouped-query
        attention, ``Hk = 1`` is multi-query.
    bias : bool, default True
        Whether the four projections have biases.
    score : {None, "scaled_dot", "dot"} or General or Additive or Concat, optional
        The score function, sized for one head (``D = Dk = hd``), shared by all heads and
        forwarded to :func:`mha_ext.attention`.
    dtype : {numpy.float32, numpy.float64}, default numpy.float32
        The dtype of the weights and of the computation; inputs are converted to it.
    seed : int or numpy.random.Generator, optional
        Seeds the initial weights (None: fresh OS entropy).

    Raises
    ------
    TypeError, ValueError
        A bad argument; the message names it.

    Notes
    -----
    The weights are NumPy attributes applied as ``x @ w + b``:

    ======  ==============  ==================================================
    name    shape           role
    ======  ==============  ==================================================
    w_q     (E, E)          query projection; b_q (E,)
    w_k     (kdim, Hk*hd)   key projection; b_k (Hk*hd,)
    w_v     (vdim, Hk*hd)   value projection; b_v (Hk*hd,)
    w_o     (E, E)          output projection of the concatenated heads; b_o (E,)
    ======  ==============  ==================================================

    The biases are None when ``bias=False``. Feature ``h*hd + d`` of a projection is
    dimension d of head h (PyTorch's and Keras' split); query head h reads key/value head
    ``h // (H // Hk)``. The initial weights are Xavier-uniform per matrix, the biases zero
    (as ``torch.nn.MultiheadAttention`` does for its input projections).

    ``load_torch(state_dict)`` copies a ``torch.nn.MultiheadAttention`` (its outputs are
    reproduced with ``batch_first=True``); ``load_keras(weights)`` copies a
    ``keras.layers.MultiHeadAttention``.

    Examples
    --------
    >>> import numpy as np, mha_ext
    >>> mha = mha_ext.MultiHeadAttention(64, 4, num_kv_heads=2, seed=0)
    >>> x = np.random.default_rng(0).standard_normal((2, 10, 64)).astype(np.float32)
    >>> out, w = mha(x, causal=True, need_weights=True)
    >>> out.shape, w.shape
    ((2, 10, 64), (2, 10, 10))
    """

    w_q: np.ndarray
    w_k: np.ndarray
    w_v: np.ndarray
    w_o: np.ndarray
    b_q: Optional[np.ndarray]
    b_k: Optional[np.ndarray]
    b_v: Optional[np.ndarray]
    b_o: Optional[np.ndarray]

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        kdim: int | None = None,
        vdim: int | None = None,
        num_kv_heads: int | None = None,
        bias: bool = True,
        score: Union[None, str, General, Additive, Concat] = None,
        dtype: DTypeLike = np.float32,
        seed: int | np.random.Generator | None = None,
    ) -> None:
        self.embed_dim = _positive_int(embed_dim, "embed_dim")
        self.num_heads = _positive_int(num_heads, "num_heads")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim: must be divisible by num_heads = {self.num_heads}, "
                f"got {self.embed_dim}"
            )
        self.head_dim = self.embed_dim // self.num_heads
        self.kdim = self.embed_dim if kdim is None else _positive_int(kdim, "kdim")
        self.vdim = self.embed_dim if vdim is None else _positive_int(vdim, "vdim")
        self.num_kv_heads = (
            self.num_heads if num_kv_heads is None else _positive_int(num_kv_heads, "num_kv_heads")
        )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads: num_heads = {self.num_heads} must be a multiple of it, "
                f"got {self.num_kv_heads}"
            )
        self.bias = _flag(bias, "bias")
        self.dtype = _layer_dtype(dtype)
        if not (
            score is None
            or score in ("scaled_dot", "dot")
            or isinstance(score, (General, Additive, Concat))
        ):
            raise ValueError(
                "score: expected None, 'scaled_dot', 'dot', mha_ext.General, mha_ext.Additive "
                f"or mha_ext.Concat, got {score!r}"
            )
        self.score = score
        rng = _rng(seed)
        e, kv = self.embed_dim, self.num_kv_heads * self.head_dim
        dt = self.dtype
        self.w_q = _xavier(rng, e, e, dt)
        self.w_k = _xavier(rng, self.kdim, kv, dt)
        self.w_v = _xavier(rng, self.vdim, kv, dt)
        self.w_o = _xavier(rng, e, e, dt)
        if self.bias:
            self.b_q = np.zeros(e, dt)
            self.b_k = np.zeros(kv, dt)
            self.b_v = np.zeros(kv, dt)
            self.b_o = np.zeros(e, dt)
        else:
            self.b_q = self.b_k = self.b_v = self.b_o = None

    def __repr__(self) -> str:
        extra = ""
        if self.kdim != self.embed_dim or self.vdim != self.embed_dim:
            extra += f", kdim={self.kdim}, vdim={self.vdim}"
        if self.num_kv_heads != self.num_heads:
            extra += f", num_kv_heads={self.num_kv_heads}"
        if not self.bias:
            extra += ", bias=False"
        if self.score is not None:
            extra += f", score={self.score!r}"
        return (
            f"MultiHeadAttention({self.embed_dim}, {self.num_heads}{extra}, "
            f"dtype={self.dtype.name})"
        )

    # --- weights ---------------------------------------------------------------------------

    def load_torch(self, state_dict: Mapping[str, Any] | Any) -> MultiHeadAttention:
        """Copy the weights of a ``torch.nn.MultiheadAttention``.

        Parameters
        ----------
        state_dict : Mapping
            ``module.state_dict()`` (tensors or NumPy arrays; the module itself is accepted
            too).

        Returns
        -------
        MultiHeadAttention
            ``self``.

        Raises
        ------
        ValueError
            Unknown or missing keys, wrong shapes, or a module this layer does not match.

        Notes
        -----
        The mapping (torch's ``nn.Linear`` weights are ``(out, in)``):

        - ``in_proj_weight (3E, E)`` → ``w_q, w_k, w_v = in_proj_weight[:E].T,
          [E:2E].T, [2E:].T``; when torch was built with ``kdim``/``vdim != embed_dim`` it
          stores ``q_proj_weight (E, E)``, ``k_proj_weight (E, kdim)``, ``v_proj_weight
          (E, vdim)`` instead, which map to ``w_q, w_k, w_v`` transposed;
        - ``in_proj_bias (3E,)`` → ``b_q, b_k, b_v``;
        - ``out_proj.weight (E, E)`` → ``w_o = out_proj.weight.T``, ``out_proj.bias`` → ``b_o``.

        The layer must match the module (``embed_dim``, ``kdim``, ``vdim``, ``bias``,
        ``num_kv_heads == num_heads``); ``add_bias_kv`` (``bias_k``/``bias_v``) is not
        supported.

        Then ``layer(q, k, v, mask=~attn_mask, key_padding_mask=~key_padding_mask)``
        reproduces ``module(q, k, v, attn_mask=attn_mask, key_padding_mask=key_padding_mask)``
        for PyTorch **bool** masks, which mean the opposite (True = hidden) of ours (True =
        may attend / real token). A PyTorch float ``attn_mask`` is passed as ``attn_bias=``.
        """
        sd = _state_dict(state_dict)
        saved = dict(vars(self))  # all or nothing: a bad key leaves the layer as it was
        try:
            used: set = set()
            self._load_torch(sd, "", used)
            _check_unused(sd, used)
        except BaseException:
            vars(self).clear()
            vars(self).update(saved)
            raise
        return self

    def _load_torch(self, sd: Mapping, prefix: str, used: set) -> None:
        if self.num_kv_heads != self.num_heads:
            raise ValueError(
                "state_dict: torch.nn.MultiheadAttention has no grouped KV heads; this layer "
                f"has num_kv_heads = {self.num_kv_heads} != num_heads = {self.num_heads}"
            )
        for key in ("bias_k", "bias_v"):
            if prefix + key in sd:
                raise ValueError(
                    f"state_dict: {prefix + key!r} (add_bias_kv=True) is not supported"
                )
        e, dt = self.embed_dim, self.dtype
        separate = prefix + "q_proj_weight" in sd
        if not separate and (self.kdim != e or self.vdim != e):
            raise ValueError(
                f"state_dict: missing key {prefix + 'q_proj_weight'!r}: this layer has kdim = "
                f"{self.kdim}, vdim = {self.vdim}, embed_dim = {e}, for which torch stores "
                "separate q/k/v_proj_weight instead of in_proj_weight"
            )
        if not separate:
            w = _take(sd, prefix + "in_proj_weight", (3 * e, e), dt, used)
            w_q, w_k, w_v = w[:e].T, w[e : 2 * e].T, w[2 * e :].T
        else:
            w_q = _take(sd, prefix + "q_proj_weight", (e, e), dt, used).T
            w_k = _take(sd, prefix + "k_proj_weight", (e, self.kdim), dt, used).T
            w_v = _take(sd, prefix + "v_proj_weight", (e, self.vdim), dt, used).T
        w_o = _take(sd, prefix + "out_proj.weight", (e, e), dt, used).T
        if self.bias:
            b = _take(sd, prefix + "in_proj_bias", (3 * e,), dt, used)
            b_o = _take(sd, prefix + "out_proj.bias", (e,), dt, used)
        else:
            for key in ("in_proj_bias", "out_proj.bias"):
                if prefix + key in sd:
                    raise ValueError(
                        f"state_dict: {prefix + key!r} found but this layer has bias=False"
                    )
        self.w_q, self.w_k, self.w_v, self.w_o = (
            np.ascontiguousarray(x) for x in (w_q, w_k, w_v, w_o)
        )
        if self.bias:
            self.b_q, self.b_k, self.b_v = (b[:e].copy(), b[e : 2 * e].copy(), b[2 * e :].copy())
            self.b_o = b_o

    def load_keras(self, weights: Sequence[ArrayLike]) -> MultiHeadAttention:
        """Copy the weights of a ``keras.layers.MultiHeadAttention``.

        Parameters
        ----------
        weights : list of arrays
            ``layer.get_weights()`` (or the variables' values as arrays / tensors).

        Returns
        -------
        MultiHeadAttention
            ``self``.

        Raises
        ------
        TypeError, ValueError
            Not a list of arrays, the wrong number of arrays, or a wrong shape.

        Notes
        -----
        The arrays come in Keras' order ``[query/kernel (E, H, hd), query/bias (H, hd),
        key/kernel (kdim, H, hd), key/bias (H, hd), value/kernel (vdim, H, hd),
        value/bias (H, hd), attention_output/kernel (H, hd, E), attention_output/bias (E,)]``,
        the four biases absent when the Keras layer has ``use_bias=False``. The kernels are
        reshaped to ``w_q (E, H*hd)`` etc., head-major like ours. The Keras layer must have
        ``num_heads = H``, ``key_dim = value_dim = E // H``, the default ``output_shape``, no
        gate and ``attention_axes`` the sequence axis.

        Keras is called ``mha(query, value, key)`` (value before key) and its
        ``attention_mask`` already means True = may attend: the same mask works here,
        ``layer(query, key, value, mask=attention_mask)``.
        """
        try:
            ws = [_to_numpy(w) for w in weights]
        except TypeError:
            raise TypeError(
                f"weights: expected a list of arrays (keras layer.get_weights()), got "
                f"{type(weights).__name__}"
            ) from None
        n = 8 if self.bias else 4
        if len(ws) != n:
            raise ValueError(
                f"weights: expected {n} arrays for a layer with bias={self.bias} (query, key, "
                f"value, output kernels{' and biases' if self.bias else ''}), got {len(ws)}"
            )
        h, hd, e, dt = self.num_heads, self.head_dim, self.embed_dim, self.dtype
        if self.num_kv_heads != h:
            raise ValueError(
                "weights: keras.layers.MultiHeadAttention has no grouped KV heads; this layer "
                f"has num_kv_heads = {self.num_kv_heads} != num_heads = {h}"
            )
        if self.bias:
            qk, qb, kk, kb, vk, vb, ok, ob = ws
        else:
            qk, kk, vk, ok = ws
        # Kernels (in, H, hd) -> (in, H*hd) and (H, hd, E) -> (H*hd, E): head-major like ours.
        kernels = [
            _param(w, f"weights ({name})", shape, dt).reshape(rows, -1)
            for w, name, shape, rows in (
                (qk, "query/kernel", (e, h, hd), e),
                (kk, "key/kernel", (self.kdim, h, hd), self.kdim),
                (vk, "value/kernel", (self.vdim, h, hd), self.vdim),
                (ok, "attention_output/kernel", (h, hd, e), h * hd),
            )
        ]
        if self.bias:
            biases = [
                _param(w, f"weights ({name})", shape, dt).reshape(-1)
                for w, name, shape in (
                    (qb, "query/bias", (h, hd)),
                    (kb, "key/bias", (h, hd)),
                    (vb, "value/bias", (h, hd)),
                    (ob, "attention_output/bias", (e,)),
                )
            ]
            self.b_q, self.b_k, self.b_v, self.b_o = biases
        self.w_q, self.w_k, self.w_v, self.w_o = kernels
        return self

    # --- forward ---------------------------------------------------------------------------

    def __call__(
        self,
        query: ArrayLike,
        key: ArrayLike | None = None,
        value: ArrayLike | None = None,
        *,
        mask: ArrayLike | None = None,
        key_padding_mask: ArrayLike | None = None,
        causal: bool | str = False,
        need_weights: bool = False,
        average_weights: bool = True,
        attn_bias: ArrayLike | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Attend from ``query`` to ``key``/``value``.

        Parameters
        ----------
        query : array_like, shape (B, Lq, E)
            Batch first. Unbatched 2-D ``(L, E)`` inputs give 2-D outputs (then masks
            broadcast to ``(H, Lq, Lk)`` and ``key_padding_mask`` is ``(Lk,)``).
        key : array_like, shape (B, Lk, kdim), optional
            Default: ``query`` (self-attention).
        value : array_like, shape (B, Lk, vdim), optional
            Default: ``key``.
        mask : array_like of bool, optional
            Broadcastable to ``(B, H, Lq, Lk)`` (e.g. ``(Lq, Lk)``), **True = may attend**.
            PyTorch's ``attn_mask`` is the opposite (True = hidden): pass
            ``mask=~attn_mask``.
        key_padding_mask : array_like of bool, shape (B, Lk), optional
            **True = real token**. PyTorch's ``key_padding_mask`` is the opposite (True =
            padding): pass ``~key_padding_mask``. It is combined with ``mask`` as a
            ``(B, 1, 1, Lk)`` broadcast, never expanded to ``Lq x Lk`` on its own.
        causal : {False, True, "bottom_right", "top_left"}, default False
            As in :func:`mha_ext.attention` (they agree when ``Lq == Lk``; PyTorch's
            ``is_causal`` is ``"top_left"``). Relative to the full key length, padding
            included.
        need_weights : bool, default False
            Also return the softmax weights.
        average_weights : bool, default True
            Average the weights over the heads (PyTorch's ``average_attn_weights``).
        attn_bias : array_like of float, optional
            Broadcastable to ``(B, H, Lq, Lk)``, added to the scores: PyTorch's float
            ``attn_mask`` (0 / ``-inf`` or any additive values).

        Returns
        -------
        out : numpy.ndarray, shape (B, Lq, E)
            In the layer's dtype.
        weights : numpy.ndarray or None
            ``(B, Lq, Lk)`` when averaged, else ``(B, H, Lq, Lk)``; None unless
            ``need_weights``.

        Raises
        ------
        TypeError, ValueError
            A bad argument; the message names it.

        Notes
        -----
        A query row that sees no key gives a zero attention output (before the output
        projection, so ``out = b_o`` there) and zero weights.
        """
        return self._forward(
            query,
            key,
            value,
            mask,
            key_padding_mask,
            causal,
            need_weights,
            average_weights,
            attn_bias,
        )

    def _forward(
        self,
        query,
        key,
        value,
        mask,
        key_padding_mask,
        causal,
        need_weights,
        average_weights,
        attn_bias,
        names=("mask", "key_padding_mask", "causal"),
        out_bias=True,
    ):
        mask_name, kpm_name, causal_name = names
        dt = self.dtype
        q_in = _real(query, "query", dt)
        if q_in.ndim not in (2, 3):
            raise ValueError(
                f"query: expected shape (B, Lq, {self.embed_dim}) or (Lq, {self.embed_dim}), "
                f"got {q_in.shape}"
            )
        batched = q_in.ndim == 3
        k_in = q_in if key is None else _real(key, "key", dt)
        v_in = k_in if value is None else _real(value, "value", dt)
        lead = q_in.shape[:-2]
        for name, x, width in (
            ("query", q_in, self.embed_dim),
            ("key", k_in, self.kdim),
            ("value", v_in, self.vdim),
        ):
            if x.ndim != q_in.ndim or x.shape[:-2] != lead or x.shape[-1] != width:
                want = ("B, " if batched else "") + ("Lq" if name == "query" else "Lk")
                got_b = f" with B = {lead[0]}" if batched else ""
                raise ValueError(f"{name}: expected shape ({want}, {width}){got_b}, got {x.shape}")
        if v_in.shape[-2] != k_in.shape[-2]:
            raise ValueError(
                f"value: expected Lk = {k_in.shape[-2]} rows like key, got {v_in.shape}"
            )
        need_weights = _flag(need_weights, "need_weights")
        average_weights = _flag(average_weights, "average_weights")
        causal = _causal_arg(causal, causal_name)
        if not batched:
            q_in, k_in, v_in = q_in[None], k_in[None], v_in[None]
        b, lq, lk = q_in.shape[0], q_in.shape[1], k_in.shape[1]
        h, hk, hd = self.num_heads, self.num_kv_heads, self.head_dim
        full = (b, h, lq, lk) if batched else (h, lq, lk)

        m = None
        if mask is not None:
            m = _bool_mask(mask, mask_name)
            _check_broadcast(m, full, mask_name)
        if key_padding_mask is not None:
            kpm = _bool_mask(key_padding_mask, kpm_name)
            want = (b, lk) if batched else (lk,)
            if kpm.shape != want:
                raise ValueError(f"{kpm_name}: expected shape {want}, got {kpm.shape}")
            kpm = kpm.reshape(b, 1, 1, lk)
            m = kpm if m is None else np.logical_and(_to_4d(m), kpm)
        elif m is not None:
            m = _to_4d(m)
        bias = None
        if attn_bias is not None:
            bias = _to_numpy(attn_bias)
            if bias.dtype.kind not in "fiu":
                raise TypeError(
                    f"attn_bias: expected a real (float) additive mask, got dtype {bias.dtype}; "
                    "a bool mask goes to `mask=` (True = may attend)"
                )
            _check_broadcast(bias, full, "attn_bias")
            bias = _to_4d(bias)

        # (B, L, features) -> (B, L, heads, hd): a view, read by the kernel as layout "blhd".
        q = self._project(q_in, self.w_q, self.b_q).reshape(b, lq, h, hd)
        k = self._project(k_in, self.w_k, self.b_k).reshape(b, lk, hk, hd)
        v = self._project(v_in, self.w_v, self.b_v).reshape(b, lk, hk, hd)
        res = attention(
            q,
            k,
            v,
            mask=m,
            bias=bias,
            causal=causal,
            score=self.score,
            return_weights=need_weights,
            layout="blhd",
        )
        o, weights = res if need_weights else (res, None)
        out = self._project(o.reshape(b, lq, self.embed_dim), self.w_o, self.b_o if out_bias else None)
        if weights is not None and average_weights:
            weights = weights.mean(axis=1)
        if not batched:
            out = out[0]
            weights = None if weights is None else weights[0]
        return out, weights

    @staticmethod
    def _project(x: np.ndarray, w: np.ndarray, b) -> np.ndarray:
        return _matmul_bias(x, w, b)

    def _attend_packed(self, xq, pq: Packing, xkv, pkv: Packing, causal) -> np.ndarray:
        """Attention on packed tokens: ``(Nq, E)`` queries, ``(Nk, kdim)`` keys/values.

        Returns ``o @ w_o`` **without** ``b_o`` (the caller fuses it into its Add & Norm), in a
        per-thread scratch buffer. Sequence b attends from rows ``pq.offsets[b]:[b+1]`` to rows
        ``pkv.offsets[b]:[b+1]``, in one ``attention_varlen`` call writing straight into the
        packed output; ``causal`` (self-attention only) hides later real tokens. A sequence
        with no real key gives zeros.
        """
        h, hk, hd, dt = self.num_heads, self.num_kv_heads, self.head_dim, self.dtype
        nq, nk = xq.shape[0], xkv.shape[0]
        q = _matmul_bias(xq, self.w_q, self.b_q, self._buf("q", (nq, h * hd), dt))
        k = _matmul_bias(xkv, self.w_k, self.b_k, self._buf("k", (nk, hk * hd), dt))
        v = _matmul_bias(xkv, self.w_v, self.b_v, self._buf("v", (nk, hk * hd), dt))
        o = self._buf("o", (nq, h * hd), dt)
        # One native call over every sequence (its work list spans them all, heaviest first).
        # Causal self-attention has Lq_b = Lk_b, where varlen's bottom-right alignment is the
        # layers' top-left; a sequence with no real key gives zeros.
        attention_varlen(
            q.reshape(nq, h, hd),
            k.reshape(nk, hk, hd),
            v.reshape(nk, hk, hd),
            pq.offsets,
            pkv.offsets,
            causal=bool(causal),
            score=self.score,
            out=o.reshape(nq, h, hd),
        )
        return np.matmul(o, self.w_o, out=self._buf("y", (nq, self.embed_dim), dt))


# ------------------------------------------------------------------------------------------
# Transformer layers


class TransformerEncoderLayer(_Scratch):
    """Self-attention and feed-forward blocks with residual Add & Norm (inference only).

    Parameters
    ----------
    d_model : int
        The model width; a multiple of ``nhead``.
    nhead : int
        Attention heads.
    dim_feedforward : int, default 2048
        Width of the feed-forward network.
    activation : {"relu", "gelu"} or callable, default "relu"
        ``"gelu"`` is the exact erf form (PyTorch's default); a callable takes and returns
        NumPy arrays.
    norm_first : bool, default False
        Pre-norm instead of the original post-norm.
    layer_norm_eps : float, default 1e-5
        The LayerNorm epsilon.
    bias : bool, default True
        ``False`` removes every bias, the LayerNorm ones included (as in PyTorch).
    dtype : {numpy.float32, numpy.float64}, default numpy.float32
        The dtype of the weights and of the computation.
    seed : int or numpy.random.Generator, optional
        Seeds the initial weights (None: fresh OS entropy).

    Raises
    ------
    TypeError, ValueError
        A bad argument; the message names it.

    Notes
    -----
    - post-norm (``norm_first=False``, the original Transformer):
      ``x = norm1(x + self_attn(x)); x = norm2(x + ff(x))``;
    - pre-norm (``norm_first=True``): ``x = x + self_attn(norm1(x)); x = x + ff(norm2(x))``;
    - ``ff(x) = activation(x @ w_1 + b_1) @ w_2 + b_2``, ``activation`` ``"relu"``,
      ``"gelu"`` (exact erf form, like PyTorch's default) or a callable on NumPy arrays.

    Attributes: ``self_attn`` (a ``MultiHeadAttention(d_model, nhead)``), ``w_1 (d_model,
    dim_feedforward)``, ``b_1 (dim_feedforward,)``, ``w_2 (dim_feedforward, d_model)``,
    ``b_2 (d_model,)``, ``norm1_weight``, ``norm1_bias``, ``norm2_weight``, ``norm2_bias``
    (``(d_model,)``). ``bias=False`` removes every bias, the LayerNorm ones included (as in
    PyTorch). Initial FFN weights follow ``torch.nn.Linear`` (uniform ±1/sqrt(fan_in)),
    LayerNorm weights 1 and biases 0.

    ``load_torch(state_dict)`` copies a ``torch.nn.TransformerEncoderLayer`` (batch_first,
    eval mode): ``self_attn.*`` as in ``MultiHeadAttention.load_torch``, ``linear1.weight``
    → ``w_1 = linear1.weight.T``, ``linear2.weight`` → ``w_2`` likewise, ``norm1.weight``
    → ``norm1_weight``, etc.

    Examples
    --------
    >>> import numpy as np, mha_ext
    >>> enc = mha_ext.TransformerEncoderLayer(64, 4, 128, activation="gelu", seed=0)
    >>> x = np.random.default_rng(0).standard_normal((2, 10, 64)).astype(np.float32)
    >>> enc(x, key_padding_mask=np.arange(10) < np.array([[10], [6]])).shape
    (2, 10, 64)
    """

    _NORMS: tuple[str, ...] = ("norm1", "norm2")
    self_attn: MultiHeadAttention

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        *,
        activation: str | Callable[[np.ndarray], np.ndarray] = "relu",
        norm_first: bool = False,
        layer_norm_eps: float = 1e-5,
        bias: bool = True,
        dtype: DTypeLike = np.float32,
        seed: int | np.random.Generator | None = None,
    ) -> None:
        self._init_common(
            d_model,
            nhead,
            dim_feedforward,
            activation,
            norm_first,
            layer_norm_eps,
            bias,
            dtype,
            seed,
        )

    def _init_common(
        self, d_model, nhead, dim_feedforward, activation, norm_first, eps, bias, dtype, seed
    ):
        self.d_model = _positive_int(d_model, "d_model")
        self.nhead = _positive_int(nhead, "nhead")
        if self.d_model % self.nhead:
            raise ValueError(
                f"d_model: must be divisible by nhead = {self.nhead}, got {self.d_model}"
            )
        self.dim_feedforward = _positive_int(dim_feedforward, "dim_feedforward")
        self.activation = activation
        self._act = _activation(activation)
        self.norm_first = _flag(norm_first, "norm_first")
        if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating, np.integer)):
            raise TypeError(f"layer_norm_eps: expected a float, got {eps!r}")
        if not (eps >= 0 and math.isfinite(eps)):
            raise ValueError(f"layer_norm_eps: expected a finite value >= 0, got {eps}")
        self.layer_norm_eps = float(eps)
        self.bias = _flag(bias, "bias")
        self.dtype = _layer_dtype(dtype)
        rng = _rng(seed)
        for name in self._ATTNS:
            setattr(
                self,
                name,
                MultiHeadAttention(
                    self.d_model, self.nhead, bias=self.bias, dtype=self.dtype, seed=rng
                ),
            )
        d, f, dt = self.d_model, self.dim_feedforward, self.dtype
        self.w_1, self.b_1 = _linear_init(rng, d, f, dt, self.bias)
        self.w_2, self.b_2 = _linear_init(rng, f, d, dt, self.bias)
        for name in self._NORMS:
            setattr(self, name + "_weight", np.ones(d, dt))
            setattr(self, name + "_bias", np.zeros(d, dt) if self.bias else None)

    _ATTNS: tuple[str, ...] = ("self_attn",)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.d_model}, {self.nhead}, {self.dim_feedforward}, "
            f"activation={self.activation!r}, norm_first={self.norm_first}, "
            f"layer_norm_eps={self.layer_norm_eps}, bias={self.bias}, dtype={self.dtype.name})"
        )

    def _norm_args(self, name: str) -> tuple[Any, Any]:
        return getattr(self, name + "_weight"), getattr(self, name + "_bias")

    def _ff_into(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """``out = act(x @ w_1 + b_1) @ w_2`` (without ``b_2``: the caller's Add & Norm adds it).

        The hidden ``(n, dim_feedforward)`` activation is a per-thread scratch buffer; bias and
        activation run fused in the native core for the named activations.
        """
        dt = self.dtype
        hid = np.matmul(x, self.w_1, out=self._buf("ff", (x.shape[0], self.dim_feedforward), dt))
        act = self.activation
        if isinstance(act, str) and act in _ACTIVATIONS:
            _bias_act(hid, self.b_1, act, out=hid)
        else:
            if self.b_1 is not None:
                _bias_act(hid, self.b_1, "none", out=hid)
            hid = np.asarray(self._act(hid), dtype=dt)
        return np.matmul(hid, self.w_2, out=out)

    def _rows(self, n: int, name: str) -> np.ndarray:
        return self._buf(name, (n, self.d_model), self.dtype)

    def _encode_rows(self, x: np.ndarray, attend) -> np.ndarray:
        """One encoder layer on token rows ``x (n, d_model)``; ``attend(z)`` returns the
        self-attention of ``z`` without its output bias. Returns a fresh ``(n, d_model)``."""
        n, eps = x.shape[0], self.layer_norm_eps
        b_o = self.self_attn.b_o
        out = np.empty((n, self.d_model), self.dtype)
        if self.norm_first:
            z = self._rows(n, "norm")
            _add_norm(x, None, None, *self._norm_args("norm1"), eps, out=z)
            y = attend(z)
            # out = x + sa + b_o (the residual stream); z = norm2(out), in one pass.
            _add_norm(x, y, b_o, *self._norm_args("norm2"), eps, sum_out=out, out=z)
            f = self._ff_into(z, self._rows(n, "ff_out"))
            _add_norm(out, f, self.b_2, None, None, eps, sum_out=out)
        else:
            y = attend(x)
            _add_norm(x, y, b_o, *self._norm_args("norm1"), eps, out=y)  # y = norm1(x + sa)
            self._ff_into(y, out)
            _add_norm(y, out, self.b_2, *self._norm_args("norm2"), eps, out=out)
        return out

    def _input(self, x, name: str) -> np.ndarray:
        a = _real(x, name, self.dtype)
        if a.ndim not in (2, 3) or a.shape[-1] != self.d_model:
            raise ValueError(
                f"{name}: expected shape (B, L, {self.d_model}) or (L, {self.d_model}), "
                f"got {a.shape}"
            )
        return a

    def _packed_input(self, x, name: str, packing) -> np.ndarray:
        if not isinstance(packing, Packing):
            raise TypeError(f"{name}: expected a mha_ext.layers.Packing, got {type(packing).__name__}")
        a = _rows_input(_real(x, name, self.dtype))
        if a.shape != (packing.num_tokens, self.d_model):
            raise ValueError(
                f"{name}: expected packed shape ({packing.num_tokens}, {self.d_model}), got {a.shape}"
            )
        return a

    def forward_packed(self, x, packing: Packing, *, causal=False) -> np.ndarray:
        """The layer on packed tokens: ``x (N, d_model)`` = ``packing.pack(src)``; returns
        ``(N, d_model)``. Projections, FFN and norms see only the N real tokens; each sequence
        attends within itself (``causal=True`` hides its later tokens). Chain layers on the
        packed array and call ``packing.unpack`` once at the end (see ``encoder_stack``).
        """
        x = self._packed_input(x, "x", packing)
        causal = _causal_arg(causal, "causal")
        sa = self.self_attn
        return self._encode_rows(x, lambda z: sa._attend_packed(z, packing, z, packing, causal))

    def __call__(
        self,
        src: ArrayLike,
        *,
        mask: ArrayLike | None = None,
        key_padding_mask: ArrayLike | None = None,
        causal: bool | str = False,
    ) -> np.ndarray:
        """Encode ``src``.

        Parameters
        ----------
        src : array_like, shape (B, L, d_model)
            Or unbatched ``(L, d_model)``.
        mask : array_like of bool, optional
            Broadcastable to ``(B, nhead, L, L)``, **True = may attend**.
        key_padding_mask : array_like of bool, shape (B, L), optional
            **True = real token**.
        causal : {False, True, "bottom_right", "top_left"}, default False
            As in :class:`MultiHeadAttention`.

        Returns
        -------
        numpy.ndarray
            The shape of ``src``, in the layer's dtype.

        Raises
        ------
        TypeError, ValueError
            A bad argument; the message names it.

        Notes
        -----
        PyTorch's ``src_mask`` / ``src_key_padding_mask`` bool masks mean the opposite (True
        = hidden / padding): pass ``~src_mask`` and ``~src_key_padding_mask``; a 0/-inf float
        ``src_mask`` ``m`` is ``mask=(m == 0)``.

        With ``key_padding_mask`` the **padded positions of the output are 0** (like PyTorch's
        nested-tensor ``TransformerEncoder``); without a dense ``mask`` the layer packs the
        real tokens (``Packing``) so padding costs no work.
        """
        x = self._input(src, "src")
        causal = _causal_arg(causal, "causal")
        batched = x.ndim == 3
        x3 = x if batched else x[None]
        shape = x3.shape
        kpm = _kpm(key_padding_mask, "key_padding_mask", shape[:2], batched)
        if kpm is not None and mask is None:
            packing = Packing(kpm)
            out = packing.unpack(self.forward_packed(packing.pack(x3), packing, causal=causal))
            return out if batched else out[0]
        n = shape[0] * shape[1]

        def attend(z):
            z = z.reshape(shape if batched else shape[1:])
            return self.self_attn._forward(
                z, None, None, mask, key_padding_mask, causal, False, True, None, out_bias=False
            )[0].reshape(n, self.d_model)

        out = self._encode_rows(_rows_input(x3.reshape(n, self.d_model)), attend).reshape(shape)
        if kpm is not None:
            out[~kpm] = 0
        return out if batched else out[0]

    def load_torch(self, state_dict: Mapping[str, Any] | Any) -> TransformerEncoderLayer:
        """Copy a ``torch.nn.TransformerEncoderLayer`` (or ``DecoderLayer``) state dict.

        Parameters
        ----------
        state_dict : Mapping
            ``module.state_dict()`` (tensors or arrays; the module itself is accepted too).

        Returns
        -------
        TransformerEncoderLayer
            ``self``.

        Raises
        ------
        ValueError
            Unknown or missing keys, or wrong shapes.

        Notes
        -----
        Keys: ``self_attn.*`` (and ``multihead_attn.*`` for the decoder),
        see ``MultiHeadAttention.load_torch``; ``linear1.weight (dff, d)`` → ``w_1`` (its
        transpose), ``linear1.bias`` → ``b_1``, ``linear2.weight (d, dff)`` → ``w_2``,
        ``linear2.bias`` → ``b_2``, ``normN.weight`` / ``normN.bias`` → ``normN_weight`` /
        ``normN_bias``. The layer must be built with the module's sizes, ``bias`` and
        ``layer_norm_eps``; activation and norm_first are not in a state dict: set them to
        the module's.
        """
        sd = _state_dict(state_dict)
        # All or nothing: the attention sub-layers are filled first, so a bad key further on
        # must put them back as they were.
        saved = {name: dict(vars(getattr(self, name))) for name in self._ATTNS}
        try:
            used: set = set()
            for name in self._ATTNS:
                getattr(self, name)._load_torch(sd, name + ".", used)
            self._load_torch_rest(sd, used)
        except BaseException:
            for name, attrs in saved.items():
                vars(getattr(self, name)).clear()
                vars(getattr(self, name)).update(attrs)
            raise
        return self

    def _load_torch_rest(self, sd: Mapping, used: set) -> None:
        # Everything but the attention sub-layers; assigns only after every key was checked.
        d, f, dt = self.d_model, self.dim_feedforward, self.dtype
        w_1 = _take(sd, "linear1.weight", (f, d), dt, used).T
        w_2 = _take(sd, "linear2.weight", (d, f), dt, used).T
        keys = {"linear1.bias": (f,), "linear2.bias": (d,)}
        for name in self._NORMS:
            keys[name + ".bias"] = (d,)
        got = {}
        if self.bias:
            for key, shape in keys.items():
                got[key] = _take(sd, key, shape, dt, used)
        else:
            for key in keys:
                if key in sd:
                    raise ValueError(f"state_dict: {key!r} found but this layer has bias=False")
        norms = {name: _take(sd, name + ".weight", (d,), dt, used) for name in self._NORMS}
        _check_unused(sd, used)
        self.w_1, self.w_2 = np.ascontiguousarray(w_1), np.ascontiguousarray(w_2)
        self.b_1, self.b_2 = got.get("linear1.bias"), got.get("linear2.bias")
        for name in self._NORMS:
            setattr(self, name + "_weight", norms[name])
            setattr(self, name + "_bias", got.get(name + ".bias"))


class TransformerDecoderLayer(TransformerEncoderLayer):
    """Masked self-attention, cross-attention on ``memory`` and feed-forward, each with Add & Norm.

    Takes the arguments of :class:`TransformerEncoderLayer`.

    Notes
    -----
    - post-norm: ``x = norm1(x + self_attn(x)); x = norm2(x + multihead_attn(x, memory));
      x = norm3(x + ff(x))``;
    - pre-norm (``norm_first=True``): ``x = x + self_attn(norm1(x)); x = x +
      multihead_attn(norm2(x), memory); x = x + ff(norm3(x))``.

    Attributes: ``self_attn`` and ``multihead_attn`` (``MultiHeadAttention(d_model,
    nhead)``, the cross-attention with queries from the decoder and keys/values from
    ``memory``), ``w_1, b_1, w_2, b_2`` and ``norm{1,2,3}_{weight,bias}`` as in
    ``TransformerEncoderLayer``. ``load_torch`` copies a ``torch.nn.TransformerDecoderLayer``.
    """

    _NORMS = ("norm1", "norm2", "norm3")
    _ATTNS = ("self_attn", "multihead_attn")
    multihead_attn: MultiHeadAttention

    def __call__(  # type: ignore[override]  # (tgt, memory), not (src,)
        self,
        tgt: ArrayLike,
        memory: ArrayLike,
        *,
        tgt_mask: ArrayLike | None = None,
        memory_mask: ArrayLike | None = None,
        tgt_key_padding_mask: ArrayLike | None = None,
        memory_key_padding_mask: ArrayLike | None = None,
        tgt_causal: bool | str = False,
    ) -> np.ndarray:
        """Decode ``tgt`` against ``memory``.

        Parameters
        ----------
        tgt : array_like, shape (B, Lt, d_model)
            The target sequence (unbatched 2-D ``(Lt, d_model)`` too).
        memory : array_like, shape (B, Ls, d_model)
            The encoder output; the same batch shape as ``tgt``.
        tgt_mask : array_like of bool, optional
            Broadcastable to ``(B, nhead, Lt, Lt)``, **True = may attend**.
        memory_mask : array_like of bool, optional
            Broadcastable to ``(B, nhead, Lt, Ls)``, **True = may attend**.
        tgt_key_padding_mask : array_like of bool, shape (B, Lt), optional
            **True = real token**.
        memory_key_padding_mask : array_like of bool, shape (B, Ls), optional
            **True = real token**.
        tgt_causal : bool or str, default False
            True hides future target positions (PyTorch's ``tgt_is_causal`` with
            ``generate_square_subsequent_mask``).

        Returns
        -------
        numpy.ndarray, shape (B, Lt, d_model)

        Raises
        ------
        TypeError, ValueError
            A bad argument; the message names it.

        Notes
        -----
        PyTorch's bool masks mean the opposite (True = hidden / padding): pass
        ``~tgt_mask``, ``~memory_key_padding_mask`` and so on.
        """
        x = self._input(tgt, "tgt")
        mem = self._input(memory, "memory")
        if mem.ndim != x.ndim or mem.shape[:-2] != x.shape[:-2]:
            raise ValueError(
                f"memory: expected the batch shape of tgt {x.shape[:-2]}, got {mem.shape}"
            )
        tgt_causal = _causal_arg(tgt_causal, "tgt_causal")
        batched = x.ndim == 3
        x3, m3 = (x, mem) if batched else (x[None], mem[None])
        tk = _kpm(tgt_key_padding_mask, "tgt_key_padding_mask", x3.shape[:2], batched)
        mk = _kpm(memory_key_padding_mask, "memory_key_padding_mask", m3.shape[:2], batched)
        if (tk is not None or mk is not None) and tgt_mask is None and memory_mask is None:
            pt = Packing(tk) if tk is not None else Packing.dense(*x3.shape[:2])
            pm = Packing(mk) if mk is not None else Packing.dense(*m3.shape[:2])
            out = pt.unpack(
                self.forward_packed(pt.pack(x3), pt, pm.pack(m3), pm, tgt_causal=tgt_causal)
            )
            return out if batched else out[0]
        n = x3.shape[0] * x3.shape[1]
        d = self.d_model

        def sa(z):
            z = z.reshape(x.shape)
            return self.self_attn._forward(
                z,
                None,
                None,
                tgt_mask,
                tgt_key_padding_mask,
                tgt_causal,
                False,
                True,
                None,
                names=("tgt_mask", "tgt_key_padding_mask", "tgt_causal"),
                out_bias=False,
            )[0].reshape(n, d)

        def ca(z):
            z = z.reshape(x.shape)
            return self.multihead_attn._forward(
                z,
                mem,
                mem,
                memory_mask,
                memory_key_padding_mask,
                False,
                False,
                True,
                None,
                names=("memory_mask", "memory_key_padding_mask", "causal"),
                out_bias=False,
            )[0].reshape(n, d)

        out = self._decode_rows(_rows_input(x3.reshape(n, d)), sa, ca).reshape(x3.shape)
        if tk is not None:
            out[~tk] = 0
        return out if batched else out[0]

    def forward_packed(  # type: ignore[override]
        self, tgt, tgt_packing: Packing, memory, memory_packing: Packing, *, tgt_causal=False
    ) -> np.ndarray:
        """The layer on packed tokens: ``tgt (Nt, d_model)`` = ``tgt_packing.pack(tgt)`` and
        ``memory (Nm, d_model)`` = ``memory_packing.pack(memory)`` (same batch size); returns
        ``(Nt, d_model)``. Target sequence b attends to itself (``tgt_causal``: to its earlier
        tokens) and to memory sequence b's real tokens.
        """
        x = self._packed_input(tgt, "tgt", tgt_packing)
        mem = self._packed_input(memory, "memory", memory_packing)
        if memory_packing.batch != tgt_packing.batch:
            raise ValueError(
                f"memory_packing: expected batch {tgt_packing.batch}, got {memory_packing.batch}"
            )
        tgt_causal = _causal_arg(tgt_causal, "tgt_causal")
        sa_l, ca_l = self.self_attn, self.multihead_attn
        return self._decode_rows(
            x,
            lambda z: sa_l._attend_packed(z, tgt_packing, z, tgt_packing, tgt_causal),
            lambda z: ca_l._attend_packed(z, tgt_packing, mem, memory_packing, False),
        )

    def _decode_rows(self, x: np.ndarray, sa, ca) -> np.ndarray:
        n, eps = x.shape[0], self.layer_norm_eps
        out = np.empty((n, self.d_model), self.dtype)
        sa_bo, ca_bo = self.self_attn.b_o, self.multihead_attn.b_o
        if self.norm_first:
            z = self._rows(n, "norm")
            _add_norm(x, None, None, *self._norm_args("norm1"), eps, out=z)
            y = sa(z)
            _add_norm(x, y, sa_bo, *self._norm_args("norm2"), eps, sum_out=out, out=z)
            y = ca(z)
            _add_norm(out, y, ca_bo, *self._norm_args("norm3"), eps, sum_out=out, out=z)
            f = self._ff_into(z, self._rows(n, "ff_out"))
            _add_norm(out, f, self.b_2, None, None, eps, sum_out=out)
        else:
            y = sa(x)
            _add_norm(x, y, sa_bo, *self._norm_args("norm1"), eps, out=y)
            y2 = ca(y)
            _add_norm(y, y2, ca_bo, *self._norm_args("norm2"), eps, out=y2)
            self._ff_into(y2, out)
            _add_norm(y2, out, self.b_2, *self._norm_args("norm3"), eps, out=out)
        return out


def _rows_input(x: np.ndarray) -> np.ndarray:
    """Token rows the native kernels read in place (C order); a copy only when needed."""
    return x if x.flags.c_contiguous else np.ascontiguousarray(x)


def _kpm(m, name: str, shape: tuple, batched: bool):
    """A key padding mask checked against ``(B, L)`` (``(L,)`` unbatched), as ``(B, L)``."""
    if m is None:
        return None
    a = _bool_mask(m, name)
    want = shape if batched else shape[1:]
    if a.shape != want:
        raise ValueError(f"{name}: expected shape {want}, got {a.shape}")
    return a.reshape(shape)


def encoder_stack(
    layers: Sequence[TransformerEncoderLayer], src, *, key_padding_mask=None, causal=False
) -> np.ndarray:
    """Run a stack of ``TransformerEncoderLayer`` on ``src (B, L, d_model)``, packed once.

    With ``key_padding_mask`` (bool ``(B, L)``, True = real token) the real tokens are packed
    before the first layer and unpacked after the last (padded positions 0), so no layer
    touches padding and nothing is re-packed between layers; without it the layers run in
    turn. Equal to ``for layer in layers: src = layer(src, key_padding_mask=..., causal=...)``.
    """
    layers = list(layers)
    for i, layer in enumerate(layers):
        if not isinstance(layer, TransformerEncoderLayer) or isinstance(
            layer, TransformerDecoderLayer
        ):
            raise TypeError(f"layers: item {i} is not a TransformerEncoderLayer")
    if not layers:
        raise ValueError("layers: expected at least one layer")
    x = layers[0]._input(src, "src")
    if key_padding_mask is None:
        for layer in layers:
            x = layer(x, causal=causal)
        return x
    batched = x.ndim == 3
    x3 = x if batched else x[None]
    packing = Packing(_kpm(key_padding_mask, "key_padding_mask", x3.shape[:2], batched))
    y = packing.pack(x3)
    for layer in layers:
        y = layer.forward_packed(y, packing, causal=causal)
    out = packing.unpack(y)
    return out if batched else out[0]
