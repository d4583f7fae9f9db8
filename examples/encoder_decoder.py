"""An encoder-decoder Transformer forward pass on mha_ext layers.

Two encoder and two decoder layers (post-norm, like the original Transformer) translate a
padded batch of "source" embeddings into decoder states for a "target" prefix. The script
checks what the masks promise, with NumPy only:

- causal target: changing future target tokens leaves earlier outputs unchanged;
- padding: changing padded source tokens (memory) leaves every output unchanged;

and, when PyTorch is installed, that ``torch.nn.TransformerEncoderLayer`` /
``TransformerDecoderLayer`` stacks with the same weights (copied with ``load_torch``) give the
same result.

Run: ``python examples/encoder_decoder.py``
"""

from __future__ import annotations

import mha_ext
import numpy as np

rng = np.random.default_rng(0)
d_model, heads, d_ff, n_layers = 32, 4, 64, 2
batch, src_len, tgt_len = 3, 9, 6
src_lengths = np.array([9, 5, 7])
src_real = np.arange(src_len) < src_lengths[:, None]  # (B, Ls) True = real token
tgt_real = np.ones((batch, tgt_len), bool)

encoder = [mha_ext.TransformerEncoderLayer(d_model, heads, d_ff, seed=i) for i in range(n_layers)]
decoder = [
    mha_ext.TransformerDecoderLayer(d_model, heads, d_ff, seed=100 + i) for i in range(n_layers)
]


def forward(src, tgt):
    memory = src
    for layer in encoder:
        memory = layer(memory, key_padding_mask=src_real)
    y = tgt
    for layer in decoder:
        y = layer(
            y,
            memory,
            tgt_causal=True,
            tgt_key_padding_mask=tgt_real,
            memory_key_padding_mask=src_real,
        )
    return memory, y


src = rng.standard_normal((batch, src_len, d_model)).astype(np.float32)
tgt = rng.standard_normal((batch, tgt_len, d_model)).astype(np.float32)
memory, out = forward(src, tgt)
print(
    f"encoder-decoder: {n_layers}+{n_layers} layers, d_model {d_model}, {heads} heads, "
    f"src {src.shape} (lengths {src_lengths.tolist()}), tgt {tgt.shape} -> out {out.shape}"
)
ok = bool(np.isfinite(out).all())

# Causality: perturb target positions >= 3; outputs at positions < 3 must not move.
tgt2 = tgt.copy()
tgt2[:, 3:] = rng.standard_normal(tgt2[:, 3:].shape)
_, out2 = forward(src, tgt2)
causal_diff = np.abs(out2[:, :3] - out[:, :3]).max()
print(f"causal: max change of outputs before the perturbed positions = {causal_diff:.1e}")
ok &= causal_diff < 1e-6

# Padding: perturb padded source tokens; nothing may move.
src2 = np.where(src_real[..., None], src, 100.0).astype(np.float32)
_, out3 = forward(src2, tgt)
pad_diff = np.abs(out3 - out).max()
print(f"padding: max change of outputs when padded source tokens change = {pad_diff:.1e}")
ok &= pad_diff < 1e-6

try:
    import torch
except ImportError:
    print("PyTorch not installed: comparison skipped")
else:
    torch.manual_seed(0)
    t_enc = [
        torch.nn.TransformerEncoderLayer(d_model, heads, d_ff, dropout=0.0, batch_first=True).eval()
        for _ in range(n_layers)
    ]
    t_dec = [
        torch.nn.TransformerDecoderLayer(d_model, heads, d_ff, dropout=0.0, batch_first=True).eval()
        for _ in range(n_layers)
    ]
    for ours, theirs in zip(encoder + decoder, t_enc + t_dec):
        ours.load_torch(theirs.state_dict())
    memory, out = forward(src, tgt)
    causal = torch.triu(torch.ones(tgt_len, tgt_len, dtype=torch.bool), 1)  # True = hidden
    pad = torch.from_numpy(~src_real)  # torch: True = padding
    with torch.no_grad():
        m = torch.from_numpy(src)
        for layer in t_enc:
            m = layer(m, src_key_padding_mask=pad)
        y = torch.from_numpy(tgt)
        for layer in t_dec:
            y = layer(y, m, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=pad)
    # torch's fast path may zero the padded encoder rows; compare the decoder output.
    diff = np.abs(out - y.numpy()).max()
    print(f"vs PyTorch (same weights via load_torch): max abs diff {diff:.2e}")
    ok &= diff < 1e-4

print("CHECK", "OK" if ok else "FAILED")
raise SystemExit(0 if ok else 1)
