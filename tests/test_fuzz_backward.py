"""Hypothesis fuzzing of mha_ext.attention_backward against torch autograd (float64 math).

Like test_fuzz_diff.py for the forward: random ranks, layouts, GQA groups, lengths that cross
tiles, odd head dims, causal alignments, windows, key_lengths, bool masks and broadcast
biases (with dbias), ALiBi slopes ((Hq,) or (B, Hq)) and softcap, every score (dot,
scaled-dot, General, Additive, Concat), float32 and float64. A fixed
example sequence by default (MHA_EXT_FUZZ_RANDOM=1 draws fresh ones).
"""

from __future__ import annotations

import os

import mha_ext
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import from_bhld

pytest.importorskip("torch")
import torch  # noqa: E402
from test_backward import rel_err, torch_grads  # noqa: E402

EXAMPLES = int(os.environ.get("MHA_EXT_FUZZ_EXAMPLES", "300")) // 6

SETTINGS = settings(
    max_examples=max(1, EXAMPLES),
    deadline=None,
    database=None,
    print_blob=True,
    derandomize=os.environ.get("MHA_EXT_FUZZ_RANDOM") != "1",
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

lengths = st.one_of(st.sampled_from([1, 2, 7, 63, 64, 65, 97]), st.integers(1, 80))
dims = st.one_of(st.sampled_from([1, 3, 8, 16, 17, 33, 64]), st.integers(1, 40))
side = st.one_of(st.none(), st.integers(0, 10), st.integers(11, 100))


@st.composite
def problems(draw):
    rank = draw(st.sampled_from([2, 3, 4]))
    layout = draw(st.sampled_from(["bhld", "blhd"]))
    B = draw(st.integers(1, 2)) if rank == 4 else 1
    Hk = draw(st.integers(1, 2)) if rank >= 3 else 1
    Hq = Hk * (draw(st.integers(1, 3)) if rank >= 3 else 1)
    Lq, Lk = draw(lengths), draw(lengths)
    D, Dv = draw(dims), draw(dims)
    score = draw(st.sampled_from(["scaled_dot", "dot", "general", "additive", "concat"]))
    Dk = draw(dims) if score in ("general", "additive", "concat") else D
    p = {
        "rank": rank, "layout": layout, "shape": (B, Hq, Hk, Lq, Lk, D, Dk, Dv),
        "score": score, "dtype": draw(st.sampled_from([np.float32, np.float64])),
        "causal": draw(st.sampled_from([False, True, "top_left"])),
        "window": draw(st.one_of(st.none(), st.tuples(side, side))),
        "key_lengths": draw(st.one_of(st.none(), st.lists(st.integers(0, Lk), min_size=B,
                                                            max_size=B))) if rank == 4 else None,
        "mask": draw(st.sampled_from([None, "keys", "full"])),
        "bias": draw(st.sampled_from([None, "lk", "full"])),
        "alibi": draw(st.sampled_from([None, "heads", "batch"])),
        "softcap": draw(st.one_of(st.none(), st.floats(0.3, 20.0))),
        "seed": draw(st.integers(0, 2**31)),
    }
    return p


@SETTINGS
@given(problems())
def test_backward_matches_autograd(p):
    rng = np.random.default_rng(p["seed"])
    B, Hq, Hk, Lq, Lk, D, Dk, Dv = p["shape"]
    rank, layout, dtype = p["rank"], p["layout"], p["dtype"]

    def make(h, L, d):
        return from_bhld(rng.standard_normal((B, h, L, d)), rank, layout).astype(dtype)

    q, k, v = make(Hq, Lq, D), make(Hk, Lk, Dk), make(Hk, Lk, Dv)
    lead = (B, Hq)[4 - rank:] if rank > 2 else ()
    kw = {"causal": p["causal"], "layout": layout}
    if p["window"] is not None:
        kw["window"] = p["window"]
    if p["key_lengths"] is not None:
        kw["key_lengths"] = p["key_lengths"]
    if p["mask"] == "keys":
        kw["mask"] = rng.random(Lk) < 0.8
    elif p["mask"] == "full":
        kw["mask"] = rng.random((*lead, Lq, Lk)) < 0.7
    if p["bias"] == "lk":
        kw["bias"] = rng.standard_normal(Lk).astype(np.float32)
    elif p["bias"] == "full":
        kw["bias"] = rng.standard_normal((*lead, Lq, Lk)).astype(np.float32)
    if p["alibi"] is not None:
        kw["alibi_slopes"] = rng.uniform(0.0, 1.0, (B, Hq) if p["alibi"] == "batch" else Hq)
    if p["softcap"] is not None:
        kw["softcap"] = p["softcap"]
    A = 1 + p["seed"] % 13
    if p["score"] == "general":
        kw["score"] = mha_ext.General(rng.standard_normal((D, Dk)) / np.sqrt(D))
    elif p["score"] == "additive":
        kw["score"] = mha_ext.Additive(rng.standard_normal((D, A)) / np.sqrt(D),
                                       rng.standard_normal((Dk, A)) / np.sqrt(Dk),
                                       rng.standard_normal(A))
    elif p["score"] == "concat":
        kw["score"] = mha_ext.Concat(rng.standard_normal((D + Dk, A)) / np.sqrt(D + Dk),
                                     rng.standard_normal(A))
    elif p["score"] == "dot":
        kw["score"] = "dot"
        kw["scale"] = 0.2
    out, lse = mha_ext.attention(q, k, v, return_lse=True, **kw)
    dout = rng.standard_normal(out.shape).astype(dtype)
    grads = mha_ext.attention_backward(dout, q, k, v, out, lse,
                                       return_dbias="bias" in kw, **kw)
    ref = torch_grads(dout, q, k, v, **kw)
    tol = 1e-5 if dtype == np.float32 else 1e-11
    pairs = [("dq", grads[0], ref[1]), ("dk", grads[1], ref[2]), ("dv", grads[2], ref[3])]
    if p["score"] == "general":
        pairs.append(("dW", grads[3].W, ref[4]))
    elif p["score"] == "additive":
        pairs += zip(("dW_q", "dW_k", "dw"), (grads[3].W_q, grads[3].W_k, grads[3].w), ref[4])
    elif p["score"] == "concat":
        pairs += zip(("dW", "dw"), (grads[3].W, grads[3].w), ref[4])
    if "bias" in kw:
        pairs.append(("dbias", grads[-1], ref[5]))
    naive = None
    for i, (name, got, want) in enumerate(pairs):
        assert got.shape == want.shape, name
        if rel_err(got, want) < tol:
            continue
        # float32 cancellation (an exactly-zero gradient, e.g. dk with one key, comes out as
        # rounding of sum_i dS_ij q_i): then the 2x rule against torch's float32 autograd.
        assert dtype == np.float32, (name, rel_err(got, want))
        if naive is None:
            nv = torch_grads(dout, q, k, v, dtype=torch.float32, **kw)
            extra = [] if nv[4] is None else [nv[4]] if p["score"] == "general" else nv[4]
            naive = [nv[1], nv[2], nv[3], *extra]
            naive += [nv[5]] if "bias" in kw else []
        ours = np.abs(got - want).max()
        theirs = np.abs(naive[i] - want).max()
        # torch's formula can be exactly 0 where ours rounds (one visible key: P = 1 exactly
        # for torch, exp(s - lse) for us): allow float32 rounding of the call's largest
        # gradient on top of the 2x rule.
        scale = max(max(float(np.abs(w).max()) for _, _, w in pairs if w.size), 1.0)
        assert ours <= 2 * theirs + 1e-5 * scale, (name, ours, theirs)
