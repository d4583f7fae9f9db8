"""The classic attention layers on top of ``mha_ext.attention`` (SPEC section 5).

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
from collections.abc import Mapping

import numpy as np

from ._attention import attention
from ._nn import (
    _activation,
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

__all__ = ["MultiHeadAttention", "TransformerDecoderLayer", "TransformerEncoderLayer"]


# ------------------------------------------------------------------------------------------
# MultiHeadAttention


class MultiHeadAttention:
    """Multi-head attention: project, split heads, attend (native core), concat, project.

    ``MultiHeadAttention(embed_dim, num_heads, *, kdim=None, vdim=None, num_kv_heads=None,
    bias=True, score=None, dtype=np.float32, seed=None)``

    With ``E = embed_dim``, ``H = num_heads``, ``Hk = num_kv_heads`` (default ``H``;
    ``H % Hk == 0``: grouped-query attention, ``Hk = 1`` is multi-query) and
    ``hd = E // H`` (``E % H == 0``), the weights are NumPy attributes applied as
    ``x @ w + b``:

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

    ``score``: ``None``/``"scaled_dot"`` (``1/sqrt(hd)``), ``"dot"``, or a ``General`` /
    ``Additive`` / ``Concat`` object sized for one head (``D = Dk = hd``), shared by all
    heads. It is forwarded to ``mha_ext.attention``.

    ``load_torch(state_dict)`` copies a ``torch.nn.MultiheadAttention`` (its outputs are
    reproduced with ``batch_first=True``); ``load_keras(weights)`` copies a
    ``keras.layers.MultiHeadAttention``.
    """

    def __init__(
        self,
        embed_dim,
        num_heads,
        *,
        kdim=None,
        vdim=None,
        num_kv_heads=None,
        bias=True,
        score=None,
        dtype=np.float32,
        seed=None,
    ):
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

    def load_torch(self, state_dict) -> MultiHeadAttention:
        """Copy the weights of a ``torch.nn.MultiheadAttention``; returns ``self``.

        ``state_dict`` is ``module.state_dict()`` (tensors or NumPy arrays; the module itself
        is accepted too). The mapping (torch's ``nn.Linear`` weights are ``(out, in)``):

        - ``in_proj_weight (3E, E)`` → ``w_q, w_k, w_v = in_proj_weight[:E].T,
          [E:2E].T, [2E:].T``; when torch was built with ``kdim``/``vdim != embed_dim`` it
          stores ``q_proj_weight (E, E)``, ``k_proj_weight (E, kdim)``, ``v_proj_weight
          (E, vdim)`` instead, which map to ``w_q, w_k, w_v`` transposed;
        - ``in_proj_bias (3E,)`` → ``b_q, b_k, b_v``;
        - ``out_proj.weight (E, E)`` → ``w_o = out_proj.weight.T``, ``out_proj.bias`` → ``b_o``.

        The layer must match the module (``embed_dim``, ``kdim``, ``vdim``, ``bias``,
        ``num_kv_heads == num_heads``); ``add_bias_kv`` (``bias_k``/``bias_v``) is not
        supported. Unknown or missing keys raise ``ValueError``.

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

    def load_keras(self, weights) -> MultiHeadAttention:
        """Copy the weights of a ``keras.layers.MultiHeadAttention``; returns ``self``.

        ``weights``: the list ``layer.get_weights()`` (or the variables' values as arrays /
        tensors), in Keras' order ``[query/kernel (E, H, hd), query/bias (H, hd),
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
        query,
        key=None,
        value=None,
        *,
        mask=None,
        key_padding_mask=None,
        causal=False,
        need_weights=False,
        average_weights=True,
        attn_bias=None,
    ):
        """Attend from ``query`` to ``key``/``value``; returns ``(out, weights or None)``.

        - ``query (B, Lq, E)``, ``key (B, Lk, kdim)`` (default: ``query``), ``value
          (B, Lk, vdim)`` (default: ``key``), batch first. Unbatched 2-D ``(L, E)`` inputs
          give 2-D outputs (then masks broadcast to ``(H, Lq, Lk)`` and
          ``key_padding_mask`` is ``(Lk,)``).
        - ``mask``: bool, broadcastable to ``(B, H, Lq, Lk)`` (e.g. ``(Lq, Lk)``), **True =
          may attend**. PyTorch's ``attn_mask`` is the opposite (True = hidden): pass
          ``mask=~attn_mask``.
        - ``key_padding_mask``: bool ``(B, Lk)``, **True = real token**. PyTorch's
          ``key_padding_mask`` is the opposite (True = padding): pass ``~key_padding_mask``.
          It is combined with ``mask`` as a ``(B, 1, 1, Lk)`` broadcast, never expanded to
          ``Lq x Lk`` on its own.
        - ``causal``: ``False``, ``True``/``"bottom_right"`` or ``"top_left"`` as in
          ``mha_ext.attention`` (they agree when ``Lq == Lk``; PyTorch's ``is_causal`` is
          ``"top_left"``). Relative to the full key length, padding included.
        - ``need_weights``: also return the softmax weights: ``(B, Lq, Lk)`` averaged over
          the heads when ``average_weights`` (PyTorch's ``average_attn_weights``), else
          ``(B, H, Lq, Lk)``.
        - ``attn_bias``: optional real array broadcastable to ``(B, H, Lq, Lk)`` added to
          the scores: PyTorch's float ``attn_mask`` (0 / ``-inf`` or any additive values).

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
        if isinstance(causal, np.bool_):
            causal = bool(causal)
        if not (
            isinstance(causal, bool)
            or (isinstance(causal, str) and causal in ("bottom_right", "top_left"))
        ):
            raise ValueError(
                f"{causal_name}: expected False, True, 'bottom_right' or 'top_left', got {causal!r}"
            )
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
        out = self._project(o.reshape(b, lq, self.embed_dim), self.w_o, self.b_o)
        if weights is not None and average_weights:
            weights = weights.mean(axis=1)
        if not batched:
            out = out[0]
            weights = None if weights is None else weights[0]
        return out, weights

    @staticmethod
    def _project(x: np.ndarray, w: np.ndarray, b) -> np.ndarray:
        y = x @ w
        if b is not None:
            y += b
        return y


# ------------------------------------------------------------------------------------------
# Transformer layers


class TransformerEncoderLayer:
    """Self-attention and feed-forward blocks with residual Add & Norm (inference only).

    ``TransformerEncoderLayer(d_model, nhead, dim_feedforward=2048, *, activation="relu",
    norm_first=False, layer_norm_eps=1e-5, bias=True, dtype=np.float32, seed=None)``

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
    """

    _NORMS = ("norm1", "norm2")

    def __init__(
        self,
        d_model,
        nhead,
        dim_feedforward=2048,
        *,
        activation="relu",
        norm_first=False,
        layer_norm_eps=1e-5,
        bias=True,
        dtype=np.float32,
        seed=None,
    ):
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

    _ATTNS = ("self_attn",)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.d_model}, {self.nhead}, {self.dim_feedforward}, "
            f"activation={self.activation!r}, norm_first={self.norm_first}, "
            f"layer_norm_eps={self.layer_norm_eps}, bias={self.bias}, dtype={self.dtype.name})"
        )

    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        return layer_norm(
            x, getattr(self, name + "_weight"), getattr(self, name + "_bias"), self.layer_norm_eps
        )

    def _ff(self, x: np.ndarray) -> np.ndarray:
        y = x @ self.w_1
        if self.b_1 is not None:
            y += self.b_1
        y = np.asarray(self._act(y), dtype=self.dtype)
        y = y @ self.w_2
        if self.b_2 is not None:
            y += self.b_2
        return y

    def _input(self, x, name: str) -> np.ndarray:
        a = _real(x, name, self.dtype)
        if a.ndim not in (2, 3) or a.shape[-1] != self.d_model:
            raise ValueError(
                f"{name}: expected shape (B, L, {self.d_model}) or (L, {self.d_model}), "
                f"got {a.shape}"
            )
        return a

    def __call__(self, src, *, mask=None, key_padding_mask=None, causal=False) -> np.ndarray:
        """Encode ``src (B, L, d_model)`` (or unbatched ``(L, d_model)``); returns the same shape.

        ``mask``: bool broadcastable to ``(B, nhead, L, L)``, **True = may attend**;
        ``key_padding_mask``: bool ``(B, L)``, **True = real token**; ``causal``: as in
        ``MultiHeadAttention``. PyTorch's ``src_mask`` / ``src_key_padding_mask`` bool masks
        mean the opposite (True = hidden / padding): pass ``~src_mask`` and
        ``~src_key_padding_mask``; a 0/-inf float ``src_mask`` ``m`` is ``mask=(m == 0)``.
        """
        x = self._input(src, "src")

        def sa(y):
            return self.self_attn._forward(
                y, None, None, mask, key_padding_mask, causal, False, True, None
            )[0]

        if self.norm_first:
            x = x + sa(self._norm(x, "norm1"))
            x = x + self._ff(self._norm(x, "norm2"))
        else:
            x = self._norm(x + sa(x), "norm1")
            x = self._norm(x + self._ff(x), "norm2")
        return x

    def load_torch(self, state_dict):
        """Copy a ``torch.nn.TransformerEncoderLayer`` (or ``DecoderLayer``) state dict.

        Keys (tensors or arrays): ``self_attn.*`` (and ``multihead_attn.*`` for the decoder),
        see ``MultiHeadAttention.load_torch``; ``linear1.weight (dff, d)`` → ``w_1`` (its
        transpose), ``linear1.bias`` → ``b_1``, ``linear2.weight (d, dff)`` → ``w_2``,
        ``linear2.bias`` → ``b_2``, ``normN.weight`` / ``normN.bias`` → ``normN_weight`` /
        ``normN_bias``. The layer must be built with the module's sizes, ``bias`` and
        ``layer_norm_eps``; activation and norm_first are not in a state dict: set them to
        the module's. Returns ``self``.
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

    ``TransformerDecoderLayer(d_model, nhead, dim_feedforward=2048, *, activation="relu",
    norm_first=False, layer_norm_eps=1e-5, bias=True, dtype=np.float32, seed=None)``

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

    def __call__(
        self,
        tgt,
        memory,
        *,
        tgt_mask=None,
        memory_mask=None,
        tgt_key_padding_mask=None,
        memory_key_padding_mask=None,
        tgt_causal=False,
    ) -> np.ndarray:
        """Decode ``tgt (B, Lt, d_model)`` against ``memory (B, Ls, d_model)``.

        ``tgt_mask`` (broadcastable to ``(B, nhead, Lt, Lt)``) and ``memory_mask``
        (``(B, nhead, Lt, Ls)``): bool, **True = may attend**. ``tgt_key_padding_mask``
        ``(B, Lt)`` and ``memory_key_padding_mask`` ``(B, Ls)``: bool, **True = real
        token**. ``tgt_causal=True`` hides future target positions (PyTorch's
        ``tgt_is_causal`` with ``generate_square_subsequent_mask``). PyTorch's bool masks mean
        the opposite (True = hidden / padding): pass ``~tgt_mask``, ``~memory_key_padding_mask``
        and so on. Unbatched 2-D inputs are accepted. Returns ``(B, Lt, d_model)``.
        """
        x = self._input(tgt, "tgt")
        mem = self._input(memory, "memory")
        if mem.ndim != x.ndim or mem.shape[:-2] != x.shape[:-2]:
            raise ValueError(
                f"memory: expected the batch shape of tgt {x.shape[:-2]}, got {mem.shape}"
            )

        def sa(y):
            return self.self_attn._forward(
                y,
                None,
                None,
                tgt_mask,
                tgt_key_padding_mask,
                tgt_causal,
                False,
                True,
                None,
                names=("tgt_mask", "tgt_key_padding_mask", "tgt_causal"),
            )[0]

        def ca(y):
            return self.multihead_attn._forward(
                y,
                mem,
                mem,
                memory_mask,
                memory_key_padding_mask,
                False,
                False,
                True,
                None,
                names=("memory_mask", "memory_key_padding_mask", "causal"),
            )[0]

        if self.norm_first:
            x = x + sa(self._norm(x, "norm1"))
            x = x + ca(self._norm(x, "norm2"))
            x = x + self._ff(self._norm(x, "norm3"))
        else:
            x = self._norm(x + sa(x), "norm1")
            x = self._norm(x + ca(x), "norm2")
            x = self._norm(x + self._ff(x), "norm3")
        return x
