"""The tutorials' masked multi-head attention, in a few lines of mha_ext.

The classic tutorial builds it by hand: project Q, K, V, split into heads, scores
``Q Kᵀ / sqrt(d)``, hide padding and future positions, softmax, weighted sum, concat heads,
output projection. With mha_ext that is one layer call; this script does it on a padded
batch with a causal mask and checks the result against the tutorial's float64 NumPy code.

Run: ``python examples/masked_mha.py``
"""

from __future__ import annotations

import mha_ext
import numpy as np

rng = np.random.default_rng(0)
batch, length, d_model, heads = 4, 10, 64, 8
lengths = np.array([10, 7, 3, 9])  # real tokens per sequence, the rest is padding
x = rng.standard_normal((batch, length, d_model)).astype(np.float32)
real = np.arange(length) < lengths[:, None]  # (B, L) True = real token

# --- with mha_ext -------------------------------------------------------------------------
mha = mha_ext.MultiHeadAttention(d_model, heads, seed=0)
out, weights = mha(x, key_padding_mask=real, causal=True, need_weights=True)

# --- the tutorial, by hand, in float64 ----------------------------------------------------
f = np.float64
hd = d_model // heads


def split(t):  # (B, L, E) -> (B, H, L, hd)
    return t.reshape(batch, length, heads, hd).transpose(0, 2, 1, 3)


q = split(x.astype(f) @ mha.w_q + mha.b_q)
k = split(x.astype(f) @ mha.w_k + mha.b_k)
v = split(x.astype(f) @ mha.w_v + mha.b_v)
scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
look_ahead = np.tril(np.ones((length, length), bool))  # True = may attend
visible = look_ahead & real[:, None, None, :]
scores = np.where(visible, scores, -np.inf)
p = np.exp(scores - scores.max(-1, keepdims=True))
p /= p.sum(-1, keepdims=True)
concat = (p @ v).transpose(0, 2, 1, 3).reshape(batch, length, d_model)
ref = concat @ mha.w_o + mha.b_o

err = np.abs(out - ref).max()
werr = np.abs(weights - p.mean(axis=1)).max()
print(
    f"masked MHA: batch {batch}, length {length}, d_model {d_model}, {heads} heads, "
    f"padding lengths {lengths.tolist()}, causal"
)
print(f"out {out.shape} {out.dtype}: max |mha_ext - float64 tutorial| = {err:.2e}")
print(f"head-averaged weights {weights.shape}: max diff = {werr:.2e}")
print(f"weights on padded keys: {weights[~np.broadcast_to(real[:, None, :], weights.shape)].max()}")
ok = err < 1e-4 and werr < 1e-5
print("CHECK", "OK" if ok else "FAILED")
raise SystemExit(0 if ok else 1)
