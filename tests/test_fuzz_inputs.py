"""Bad-input fuzzing of every public entry point (SPEC section 4).

``mha_ext.attention``, the score constructors (``General``, ``Additive``, ``Concat``) and the
layers (``MultiHeadAttention``, ``TransformerEncoderLayer``, ``TransformerDecoderLayer``:
constructors and calls) get wrong types, ranks, shapes and dtypes, negative and huge sizes,
NaN/Inf, object and non-native-byte-order arrays, zero-size axes, ``out=`` aliasing an input,
and random combinations of those. Each call must either

- succeed with the documented result -- for ``attention`` the float64 reference's (NaN/Inf
  only where the reference has them), for the layers a finite array of the right shape when
  the inputs are finite -- or
- raise ``ValueError`` / ``TypeError`` whose message names the offending argument
  (``RuntimeError`` only for ``device="cuda"`` without CUDA; ``MemoryError`` only for a
  result that genuinely cannot be allocated, e.g. a (1, 1, 2**40, 8) output).

The calls run in a child interpreter: a segfault, an abort or a hang (timeout) fails the test
with the name of the last case started instead of killing pytest.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
# Random combinations of single-argument mutations run by the child (deterministic seed).
N_RANDOM = int(os.environ.get("MHA_EXT_FUZZ_INPUTS", "1500"))

ALLOWED = (ValueError, TypeError)
GENERIC_PYBIND = "incompatible function arguments"


# ------------------------------------------------------------------------------------------
# The child: builds the cases, runs them, prints one JSON line per case.


class Case:
    """One call. ``names``: arguments an error message may name; ``expect``: "error" (must
    raise), "ok" (must succeed) or "either"; ``huge``: MemoryError is acceptable."""

    def __init__(self, name, fn, names, expect="either", huge=False, cuda=False, check=None):
        self.name, self.fn, self.names = name, fn, tuple(names)
        self.expect, self.huge, self.cuda, self.check = expect, huge, cuda, check


def _names_arg(msg: str, names) -> bool:
    if GENERIC_PYBIND in msg:  # pybind11's overload error names no argument in particular
        return False
    return any(re.search(r"(?<![A-Za-z_])" + re.escape(n) + r"(?![A-Za-z_])", msg) for n in names)


def _native(a):
    """a as a native-byte-order NumPy array (what the reference should see)."""
    a = np.asarray(a)
    if a.dtype.byteorder not in "=|":
        a = a.astype(a.dtype.newbyteorder("="))
    return a


def _compare(got, exp, what: str):
    got = np.asarray(got).astype(np.float64)
    exp = np.asarray(exp, dtype=np.float64)
    if got.shape != exp.shape:
        return f"{what}: shape {got.shape}, expected {exp.shape}"
    fin_g, fin_e = np.isfinite(got), np.isfinite(exp)
    if not np.array_equal(fin_g, fin_e):
        bad = np.argwhere(fin_g != fin_e)[:3].tolist()
        return f"{what}: non-finite pattern differs from the reference at {bad}"
    # NaN vs +-Inf is not compared: 0 * inf (a weight that underflowed to 0 times an
    # infinite value) is NaN in the reference but has no single right answer.
    scale = max(1.0, float(np.max(np.abs(exp[fin_e]), initial=0.0)))
    err = float(np.max(np.abs(got[fin_g] - exp[fin_e]), initial=0.0))
    if err > 1e-3 * scale:
        return f"{what}: max abs error {err:.3g} vs the float64 reference"
    return None


def _check_attention(res, q, k, v, kw):
    """Compare a successful attention call against the float64 reference."""
    from reference import attention_ref

    kw = dict(kw)
    rw, rl = bool(kw.pop("return_weights", False)), bool(kw.pop("return_lse", False))
    for drop in ("device", "num_threads", "out"):
        kw.pop(drop, None)
    for key in ("mask", "bias", "key_lengths"):
        if kw.get(key) is not None:
            kw[key] = _native(kw[key])
    qn, kn, vn = (_native(x) for x in (q, k, v))
    with np.errstate(all="ignore"):
        ref = attention_ref(qn, kn, vn, **kw)
    res = res if isinstance(res, tuple) else (res,)
    if len(res) != 1 + rw + rl:
        return f"returned {len(res)} arrays, expected {1 + rw + rl}"
    if not isinstance(res[0], np.ndarray) or res[0].dtype.kind not in "fV":
        return f"out: not a float array: {type(res[0]).__name__}"
    if res[0].dtype.newbyteorder("=") != qn.dtype:
        return f"out: dtype {res[0].dtype}, expected {qn.dtype}"
    exp = [ref[0]] + [ref[1]] * rw + [ref[2]] * rl
    for got, e, what in zip(res, exp, ["out", *(["weights"] * rw), *(["lse"] * rl)]):
        problem = _compare(_native(got), e, what)
        if problem:
            return problem
    return None


def _build_cases():  # noqa: C901 - one long catalogue reads best as one function
    import mha_ext
    import ml_dtypes

    A = mha_ext.attention
    rng = np.random.default_rng(20240501)
    B, HQ, HK, LQ, LK, D, DV = 2, 4, 2, 5, 7, 8, 6

    def rnd(*shape, dtype=np.float32):
        return rng.standard_normal(shape).astype(dtype)

    q, k, v = rnd(B, HQ, LQ, D), rnd(B, HK, LK, D), rnd(B, HK, LK, DV)
    base = {"q": q, "k": k, "v": v}
    cases = []

    def att(name, names, expect="either", huge=False, cuda=False, **over):
        """An attention call: the base arguments with some replaced."""
        args = dict(base)
        args.update(over)
        a_q, a_k, a_v = args.pop("q"), args.pop("k"), args.pop("v")

        def fn():
            return A(a_q, a_k, a_v, **args)

        def check(res):
            return _check_attention(res, a_q, a_k, a_v, args)

        cases.append(Case(name, fn, names, expect, huge, cuda, check))

    # Single-argument mutations, reused by the random combinations below.
    mutations = []  # (name, override dict, names, expect)

    def mut(name, names, expect, **over):
        mutations.append((name, over, names, expect))
        att(name, names, expect, **over)

    # --- q, k, v: types, ranks, dtypes, shapes ----------------------------------------------
    bad_values = {
        "None": None,
        "int": 3,
        "float": 1.5,
        "str": "abc",
        "0d": np.float32(1.0),
        "1d": np.ones(8, np.float32),
        "5d": np.ones((1, B, HQ, LQ, D), np.float32),
        "object": np.ones((B, HQ, LQ, D), dtype=object),
        "int32": np.ones((B, HQ, LQ, D), np.int32),
        "bool": np.ones((B, HQ, LQ, D), bool),
        "complex": np.ones((B, HQ, LQ, D), np.complex64),
        "longdouble": np.ones((B, HQ, LQ, D), np.longdouble),
        "str_array": np.full((B, HQ, LQ, D), "x"),
        "datetime": np.zeros((B, HQ, LQ, D), "M8[s]"),
        "structured": np.zeros((B, HQ, LQ, D), [("a", "f4")]),
        "void2": np.zeros((B, HQ, LQ, D), "V2"),
    }
    for which in ("q", "k", "v"):
        for label, val in bad_values.items():
            mut(f"{which}={label}", [which], "error", **{which: val})
        mut(f"{which}=list", [which], "either", **{which: base[which].tolist()})
        mut(f"{which}=float64 (mixed)", [which], "error", **{which: base[which].astype(np.float64)})
        mut(f"{which}=float16 (mixed)", [which], "error", **{which: base[which].astype(np.float16)})
        mut(
            f"{which}=bfloat16 (mixed)",
            [which],
            "error",
            **{which: base[which].astype(ml_dtypes.bfloat16)},
        )
        # Non-native byte order: convert or refuse, never misread the bytes.
        mut(f"{which}=big-endian", [which], "either", **{which: base[which].astype(">f4")})
        mut(f"{which}=nan", [which], "ok", **{which: np.full_like(base[which], np.nan)})
        mut(f"{which}=inf", [which], "ok", **{which: np.full_like(base[which], np.inf)})
        mut(f"{which}=-inf", [which], "ok", **{which: np.full_like(base[which], -np.inf)})
        mut(f"{which}=read-only view", [which], "ok", **{which: base[which][::-1]})
        unaligned = np.frombuffer(
            b"\0" + base[which].tobytes(), np.float32, offset=1
        ).reshape(base[which].shape)
        mut(f"{which}=unaligned", [which], "either", **{which: unaligned})
    mut("all big-endian", ["q", "k", "v"], "either", q=q.astype(">f4"), k=k.astype(">f4"), v=v.astype(">f4"))
    mut("k rank 3", ["k"], "error", k=k[0])
    mut("v rank 3", ["v"], "error", v=v[0])
    mut("k head dim", ["k"], "error", k=rnd(B, HK, LK, D + 1))
    mut("v length", ["v"], "error", v=rnd(B, HK, LK + 1, DV))
    mut("v heads", ["v"], "error", v=rnd(B, 1, LK, DV))
    mut("k batch", ["k", "v", "batch"], "error", k=rnd(1, HK, LK, D), v=rnd(1, HK, LK, DV))
    mut("Hq % Hk", ["q", "k"], "error", k=rnd(B, 3, LK, D), v=rnd(B, 3, LK, DV))
    mut("Hk = 0", ["k"], "error", k=rnd(B, 0, LK, D), v=rnd(B, 0, LK, DV))
    mut("D = 0", ["q", "k", "D"], "error", q=rnd(B, HQ, LQ, 0), k=rnd(B, HK, LK, 0))
    att("B = 0", ["q"], "ok", q=rnd(0, HQ, LQ, D), k=rnd(0, HK, LK, D), v=rnd(0, HK, LK, DV), return_lse=True, return_weights=True)
    att("Hq = Hk = 0", ["q"], "ok", q=rnd(B, 0, LQ, D), k=rnd(B, 0, LK, D), v=rnd(B, 0, LK, DV))
    att("Lq = 0", ["q"], "ok", q=rnd(B, HQ, 0, D), return_lse=True, return_weights=True)
    att("Lk = 0", ["k"], "ok", k=rnd(B, HK, 0, D), v=rnd(B, HK, 0, DV), return_lse=True, return_weights=True)
    att("Dv = 0", ["v"], "ok", v=rnd(B, HK, LK, 0))
    att("all 1", ["q"], "ok", q=rnd(1, 1, 1, 1), k=rnd(1, 1, 1, 1), v=rnd(1, 1, 1, 1))
    att("2-D", ["q"], "ok", q=q[0, 0], k=k[0, 0], v=v[0, 0])
    att("2-D vs 4-D", ["k"], "error", q=q[0, 0])
    att("np.matrix", ["q"], "either", q=np.matrix(q[0, 0]), k=k[0, 0], v=v[0, 0])
    att("masked array", ["q"], "either", q=np.ma.masked_array(q), k=k, v=v)
    # Huge logical sizes through stride-0 views: refuse or fail to allocate, never hang.
    huge = np.broadcast_to(np.ones(D, np.float32), (1, 1, 2**40, D))
    att("q (1,1,2**40,8) broadcast", ["q", "out"], "error", huge=True, q=huge, k=k[:1, :1], v=v[:1, :1])
    att(
        "k (1,1,2**40,8) broadcast + weights",
        ["k", "weights"],
        "error",
        huge=True,
        q=q[:1, :1],
        k=huge,
        v=np.broadcast_to(np.ones(DV, np.float32), (1, 1, 2**40, DV)),
        return_weights=True,
    )
    # Only the first key_lengths[b] keys are ever read: a 2**40-key view costs nothing.
    hv = np.broadcast_to(np.arange(DV, dtype=np.float32), (1, 1, 2**40, DV))
    hq = q[:1, :1]
    cases.append(
        Case(
            "k (1,1,2**40,8) broadcast, key_lengths=[5]",
            lambda: A(hq, huge, hv, key_lengths=np.array([5]), return_lse=True),
            ["k"],
            "ok",
            check=lambda res: _check_attention(
                res, hq, huge[:, :, :5], hv[:, :, :5], {"return_lse": True}
            ),
        )
    )

    # --- mask ---------------------------------------------------------------------------------
    m = rng.random((B, HQ, LQ, LK)) < 0.7
    mut("mask=object", ["mask"], "error", mask=m.astype(object))
    mut("mask=int", ["mask"], "error", mask=m.astype(np.int8))
    mut("mask=float", ["mask"], "error", mask=m.astype(np.float32))
    mut("mask=str", ["mask"], "error", mask="abc")
    mut("mask=5d", ["mask"], "error", mask=m[None])
    mut("mask wrong Lk", ["mask"], "error", mask=m[..., :-1])
    mut("mask wrong Lq", ["mask"], "error", mask=m[:, :, :-1])
    mut("mask wrong B", ["mask"], "error", mask=np.ones((3, 1, 1, 1), bool))
    mut("mask=list", ["mask"], "either", mask=m[0, 0].tolist())
    mut("mask=0d", ["mask"], "ok", mask=np.bool_(False))
    mut("mask all False", ["mask"], "ok", mask=np.zeros((LQ, LK), bool), return_lse=True)
    mut("mask reversed view", ["mask"], "ok", mask=m[:, :, ::-1, ::-1])
    mut("mask stride-0", ["mask"], "ok", mask=np.broadcast_to(m[:1, :1], m.shape))
    mut("mask big-endian-tagged", ["mask"], "ok", mask=m.astype(">?"))

    # --- bias ---------------------------------------------------------------------------------
    b = rng.standard_normal((B, HQ, LQ, LK))
    mut("bias=bool", ["bias"], "error", bias=m)
    mut("bias=complex", ["bias"], "error", bias=b.astype(complex))
    mut("bias=object", ["bias"], "error", bias=b.astype(object))
    mut("bias=str", ["bias"], "error", bias="abc")
    mut("bias=5d", ["bias"], "error", bias=b[None])
    mut("bias wrong shape", ["bias"], "error", bias=b[..., :3])
    mut("bias=list", ["bias"], "either", bias=b[0, 0].tolist())
    mut("bias=int", ["bias"], "ok", bias=(b * 3).astype(np.int32))
    mut("bias=float16", ["bias"], "ok", bias=b.astype(np.float16))
    mut("bias=bfloat16", ["bias"], "ok", bias=b.astype(ml_dtypes.bfloat16))
    mut("bias=nan", ["bias"], "ok", bias=np.where(m, b, np.nan))
    mut("bias=-inf", ["bias"], "ok", bias=np.where(m, b, -np.inf))
    mut("bias=big-endian f4", ["bias"], "either", bias=b.astype(">f4"))
    mut("bias=big-endian f8", ["bias"], "either", bias=b.astype(">f8"))
    mut("bias huge", ["bias"], "ok", bias=b * 1e30)

    # --- key_lengths --------------------------------------------------------------------------
    mut("key_lengths=float", ["key_lengths"], "error", key_lengths=np.array([1.0, 2.0]))
    mut("key_lengths=bool", ["key_lengths"], "error", key_lengths=np.array([True, False]))
    mut("key_lengths=object", ["key_lengths"], "error", key_lengths=np.array([1, 2], dtype=object))
    mut("key_lengths=str", ["key_lengths"], "error", key_lengths="ab")
    mut("key_lengths=-1", ["key_lengths"], "error", key_lengths=np.array([-1, 3]))
    mut("key_lengths>Lk", ["key_lengths"], "error", key_lengths=np.array([LK + 1, 3]))
    mut("key_lengths=2**70", ["key_lengths"], "error", key_lengths=[2**70, 1])
    mut("key_lengths=int64 max", ["key_lengths"], "error", key_lengths=np.array([2**63 - 1, 1]))
    mut("key_lengths=int64 min", ["key_lengths"], "error", key_lengths=np.array([-(2**63), 1]))
    mut("key_lengths=uint64 max", ["key_lengths"], "error", key_lengths=np.array([2**64 - 1, 1], np.uint64))
    mut("key_lengths wrong shape", ["key_lengths"], "error", key_lengths=np.array([1, 2, 3]))
    mut("key_lengths 2-D", ["key_lengths"], "error", key_lengths=np.array([[1, 2]]))
    mut("key_lengths 0-d", ["key_lengths"], "error", key_lengths=np.array(3))
    mut("key_lengths=list", ["key_lengths"], "ok", key_lengths=[3, 0])
    mut("key_lengths=uint8", ["key_lengths"], "ok", key_lengths=np.array([7, 2], np.uint8))
    mut("key_lengths=big-endian", ["key_lengths"], "ok", key_lengths=np.array([4, 6], ">i8"))
    mut("key_lengths reversed", ["key_lengths"], "ok", key_lengths=np.array([1, 2, 6])[::-2])

    # --- causal / window ------------------------------------------------------------------------
    for val in (2, -1, "yes", "top-left", [1], 1.5, None):
        mut(f"causal={val!r}", ["causal"], "ok" if val is None else "error", causal=val)
    mut("causal=np.bool_", ["causal"], "ok", causal=np.bool_(True))
    for val in ((-2, 0), (0, -5), (-(2**40), 0), (2**70, 0), (0, -(2**70)), (np.uint64(2**64 - 1), 0)):
        mut(f"window={val!r}", ["window"], "error", window=val)
    for val in (3, (1, 2, 3), "ab", (1.5, 0), (0, "x"), ((1,), 0), object()):
        mut(f"window={val!r}", ["window", "left", "right"], "error", window=val)
    for val in ((None, None), (-1, -1), [2, 3], (np.int64(3), None), (2**62, 2**62), (0, 0)):
        mut(f"window={val!r}", ["window"], "ok", window=val, causal=True)

    # --- scale --------------------------------------------------------------------------------
    for val in (float("nan"), float("inf"), -float("inf")):
        mut(f"scale={val}", ["scale"], "error", scale=val)
    for val in ("1", [1.0], np.array([1.0, 2.0]), 1j, object()):
        mut(f"scale={val!r}", ["scale"], "error", scale=val)
    for val in (0.0, -1.0, np.float32(2), np.int64(3), 1e-300, 10):
        mut(f"scale={val!r}", ["scale"], "ok", scale=val)
    # Finite scales whose logits overflow float32 accumulation: refuse, or stay finite.
    mut("scale=1e38", ["scale"], "either", scale=1e38)
    mut("scale=-1e38", ["scale"], "either", scale=-1e38)
    mut("scale=1e300", ["scale"], "either", scale=1e300)

    # --- score --------------------------------------------------------------------------------
    for val in ("additive", "Dot", 0, [1], object()):
        mut(f"score={val!r}", ["score"], "error", score=val)
    mut("General wrong shape", ["General.W", "W"], "error", score=mha_ext.General(np.ones((D + 1, D))))
    mut("General nan", ["score"], "ok", score=mha_ext.General(np.full((D, D), np.nan)))
    mut(
        "Additive wrong W_q",
        ["W_q", "Additive.W_q"],
        "error",
        score=mha_ext.Additive(np.ones((D + 2, 3)), np.ones((D, 3)), np.ones(3)),
    )
    mut(
        "Additive wrong W_k",
        ["W_k", "Additive.W_k"],
        "error",
        score=mha_ext.Additive(np.ones((D, 3)), np.ones((D + 1, 3)), np.ones(3)),
    )
    mut("Concat W too short", ["Concat.W"], "error", score=mha_ext.Concat(np.ones((D, 3)), np.ones(3)))
    mut("Concat W too long", ["W_k", "Concat.W"], "error", score=mha_ext.Concat(np.ones((3 * D, 3)), np.ones(3)))
    mut("Concat inf", ["score"], "ok", score=mha_ext.Concat(np.full((2 * D, 3), np.inf), np.ones(3)))

    # --- return options, layout, device, threads ---------------------------------------------
    mut("return_weights=array", ["return_weights"], "error", return_weights=np.array([1, 2]))
    mut("return_lse=array", ["return_lse"], "error", return_lse=np.array([1, 2]))
    mut("return_weights=1", ["return_weights"], "ok", return_weights=1)
    for val in (None, "BHLD", "bhl", 1):
        mut(f"layout={val!r}", ["layout"], "error", layout=val)
    for val in (None, "gpu", 0, "CPU"):
        mut(f"device={val!r}", ["device"], "error", device=val)
    att("device='cuda'", ["device", "cuda", "CUDA"], "either", cuda=True, device="cuda")
    att("device='cuda' empty", ["device", "cuda", "CUDA"], "either", cuda=True, device="cuda", q=rnd(B, HQ, 0, D))
    for val in (0, -1, 4097, 2**31, 2**70):
        mut(f"num_threads={val}", ["num_threads"], "error", num_threads=val)
    for val in (1.5, "2", [2], object()):
        mut(f"num_threads={val!r}", ["num_threads"], "error", num_threads=val)
    mut("num_threads=np.int8(2)", ["num_threads"], "ok", num_threads=np.int8(2))

    # --- out= ---------------------------------------------------------------------------------
    good = np.empty((B, HQ, LQ, DV), np.float32)
    mut("out=list", ["out"], "error", out=good.tolist())
    mut("out wrong shape", ["out"], "error", out=good[:1])
    mut("out wrong rank", ["out"], "error", out=good[0])
    mut("out wrong dtype", ["out"], "error", out=good.astype(np.float64))
    mut("out big-endian", ["out"], "error", out=good.astype(">f4"))
    mut("out Fortran", ["out"], "error", out=np.asfortranarray(good))
    mut("out reversed", ["out"], "error", out=good[::-1])
    mut("out stride-0", ["out"], "error", out=np.broadcast_to(good[:1], good.shape))
    ro = good.copy()
    ro.setflags(write=False)
    mut("out read-only", ["out"], "error", out=ro)
    mut("out object", ["out"], "error", out=good.astype(object))
    same = rnd(B, HQ, LQ, D)  # q-shaped: out may alias q when Dv == D
    att("out=q", ["out"], "error", q=same, k=k, v=rnd(B, HK, LK, D), out=same)
    att("out=k", ["out"], "error", q=rnd(B, HK, LK, D), v=rnd(B, HK, LK, D), out=k)
    vv = rnd(B, HK, LK, D)
    att("out=v alias", ["out"], "error", q=rnd(B, HK, LK, D), v=vv, out=vv)
    buf = rnd(2 * B, HQ, LQ, D)
    att("out overlaps q (partial)", ["out"], "error", q=buf[:B], v=rnd(B, HK, LK, D), out=buf[1 : B + 1])
    att("out adjacent to q", ["out"], "ok", q=buf[:B], v=rnd(B, HK, LK, D), out=buf[B:])
    # Not forbidden by the contract, but must not give garbage: out is the bias buffer.
    bb = rnd(B, HQ, LQ, LK)
    att("out=bias", ["out", "bias"], "either", v=rnd(B, HK, LK, LK), bias=bb, out=bb)

    # --- unknown keyword ----------------------------------------------------------------------
    cases.append(Case("unknown kwarg", lambda: A(q, k, v, foo=1), ["foo"], "error"))
    cases.append(Case("positional mask", lambda: A(q, k, v, m), ["positional", "attention"], "error"))

    # --- score constructors ---------------------------------------------------------------------
    ctor_bad = {
        "None": None,
        "str": "abc",
        "object": np.ones((2, 2), object),
        "bool": np.ones((2, 2), bool),
        "complex": np.ones((2, 2), complex),
        "list of str": [["a"]],
    }
    for label, val in ctor_bad.items():
        cases.append(Case(f"General({label})", lambda val=val: mha_ext.General(val), ["General.W"], "error"))
        cases.append(
            Case(f"Additive(W_q={label})", lambda val=val: mha_ext.Additive(val, np.ones((2, 2)), np.ones(2)), ["Additive.W_q"], "error")
        )
        cases.append(
            Case(f"Additive(w={label})", lambda val=val: mha_ext.Additive(np.ones((2, 2)), np.ones((2, 2)), val), ["Additive.w"], "error")
        )
        cases.append(Case(f"Concat(W={label})", lambda val=val: mha_ext.Concat(val, np.ones(2)), ["Concat.W"], "error"))
        cases.append(Case(f"Concat(w={label})", lambda val=val: mha_ext.Concat(np.ones((4, 2)), val), ["Concat.w"], "error"))
    for shape in ((3,), (2, 2, 2), ()):
        cases.append(Case(f"General{shape}", lambda s=shape: mha_ext.General(np.ones(s)), ["General.W"], "error"))
    cases.append(Case("Additive A mismatch", lambda: mha_ext.Additive(np.ones((2, 3)), np.ones((2, 2)), np.ones(3)), ["Additive.W_k"], "error"))
    cases.append(Case("Additive w 2-D", lambda: mha_ext.Additive(np.ones((2, 3)), np.ones((2, 3)), np.ones((3, 1))), ["Additive.w"], "error"))
    cases.append(Case("Concat A mismatch", lambda: mha_ext.Concat(np.ones((4, 2)), np.ones(3)), ["Concat.W"], "error"))
    cases.append(Case("General empty", lambda: mha_ext.General(np.ones((0, 0))), ["General.W"], "either"))
    cases.append(Case("Additive A=0", lambda: mha_ext.Additive(np.ones((2, 0)), np.ones((2, 0)), np.ones(0)), ["Additive.w"], "either"))
    cases.append(
        Case(
            "Additive A=0 used",
            lambda: A(q, k, v, score=mha_ext.Additive(np.ones((D, 0)), np.ones((D, 0)), np.ones(0))),
            ["w", "Additive.w", "score"],
            "error",
        )
    )

    _layer_cases(cases, rng)
    return cases, mutations


def _layer_cases(cases, rng):
    import mha_ext

    MHA = mha_ext.MultiHeadAttention
    Enc, Dec = mha_ext.TransformerEncoderLayer, mha_ext.TransformerDecoderLayer
    E, H = 8, 2

    def finite_shape(shape):
        def check(res):
            out = res[0] if isinstance(res, tuple) else res
            if out.shape != shape:
                return f"shape {out.shape}, expected {shape}"
            if not np.isfinite(out).all():
                return "non-finite output from finite inputs"
            return None

        return check

    # Constructors.
    ctor = [
        ("embed_dim", {"embed_dim": 0}),
        ("embed_dim", {"embed_dim": -8}),
        ("embed_dim", {"embed_dim": 8.0}),
        ("embed_dim", {"embed_dim": "8"}),
        ("embed_dim", {"embed_dim": None}),
        ("embed_dim", {"embed_dim": True}),
        ("embed_dim", {"embed_dim": 7}),
        ("num_heads", {"num_heads": 0}),
        ("num_heads", {"num_heads": 3}),
        ("num_heads", {"num_heads": 2.5}),
        ("kdim", {"kdim": 0}),
        ("vdim", {"vdim": "x"}),
        ("num_kv_heads", {"num_kv_heads": 3}),
        ("num_kv_heads", {"num_kv_heads": 0}),
        ("bias", {"bias": "yes"}),
        ("dtype", {"dtype": np.float16}),
        ("dtype", {"dtype": "int32"}),
        ("dtype", {"dtype": "nonsense"}),
        ("score", {"score": "additive"}),
        ("score", {"score": 3}),
        ("seed", {"seed": "x"}),
        ("seed", {"seed": 1.5}),
        ("seed", {"seed": -1}),
    ]
    for name, kw in ctor:
        args = {"embed_dim": E, "num_heads": H, **kw}
        e, h = args.pop("embed_dim"), args.pop("num_heads")
        cases.append(Case(f"MHA({kw})", lambda e=e, h=h, a=args: MHA(e, h, **a), [name], "error"))
    cases.append(Case("MHA(2**40, 1)", lambda: MHA(2**40, 1), ["embed_dim"], "error", huge=True))
    cases.append(Case("MHA(2**20, 1)", lambda: MHA(2**20, 1), ["embed_dim"], "error", huge=True))
    for name, kw in [
        ("d_model", {"d_model": 0}),
        ("d_model", {"d_model": 7}),
        ("nhead", {"nhead": -1}),
        ("dim_feedforward", {"dim_feedforward": 0}),
        ("dim_feedforward", {"dim_feedforward": 1.5}),
        ("activation", {"activation": "tanh"}),
        ("activation", {"activation": 3}),
        ("norm_first", {"norm_first": "no"}),
        ("layer_norm_eps", {"layer_norm_eps": -1.0}),
        ("layer_norm_eps", {"layer_norm_eps": float("nan")}),
        ("layer_norm_eps", {"layer_norm_eps": "x"}),
        ("bias", {"bias": None}),
        ("dtype", {"dtype": np.int64}),
    ]:
        for cls in (Enc, Dec):
            args = {"d_model": E, "nhead": H, "dim_feedforward": 16, **kw}
            cases.append(
                Case(f"{cls.__name__}({kw})", lambda c=cls, a=args: c(**a), [name], "error")
            )

    mha = MHA(E, H, num_kv_heads=1, seed=0)
    enc = Enc(E, H, 16, seed=0)
    dec = Dec(E, H, 16, seed=0)
    x = rng.standard_normal((2, 5, E)).astype(np.float32)
    mem = rng.standard_normal((2, 6, E)).astype(np.float32)
    calls = [
        ("query", "error", lambda: mha(None)),
        ("query", "error", lambda: mha("abc")),
        ("query", "error", lambda: mha(x.astype(object))),
        ("query", "error", lambda: mha(x.astype(complex))),
        ("query", "error", lambda: mha(x > 0)),
        ("query", "error", lambda: mha(x[0, 0])),
        ("query", "error", lambda: mha(x[None])),
        ("query", "error", lambda: mha(x[..., :-1])),
        ("key", "error", lambda: mha(x, mem[..., :-1])),
        ("key", "error", lambda: mha(x, mem[:1])),
        ("value", "error", lambda: mha(x, mem, mem[:, :-1])),
        ("mask", "error", lambda: mha(x, mask=np.ones((5, 5), np.float32))),
        ("mask", "error", lambda: mha(x, mask=np.ones((5, 4), bool))),
        ("mask", "error", lambda: mha(x, mask=np.ones((1, 1, 1, 5, 5), bool))),
        ("key_padding_mask", "error", lambda: mha(x, key_padding_mask=np.ones((2, 4), bool))),
        ("key_padding_mask", "error", lambda: mha(x, key_padding_mask=np.ones((2, 5), int))),
        ("causal", "error", lambda: mha(x, causal="yes")),
        ("causal", "error", lambda: mha(x, causal=2)),
        ("need_weights", "error", lambda: mha(x, need_weights="yes")),
        ("average_weights", "error", lambda: mha(x, need_weights=True, average_weights=None)),
        ("attn_bias", "error", lambda: mha(x, attn_bias=np.ones((5, 5), bool))),
        ("attn_bias", "error", lambda: mha(x, attn_bias=np.ones((5, 4)))),
        ("attn_bias", "error", lambda: mha(x, attn_bias=np.ones((5, 5), object))),
        ("src", "error", lambda: enc(x[..., :-1])),
        ("src", "error", lambda: enc(x.astype(object))),
        ("src", "error", lambda: enc(None)),
        ("mask", "error", lambda: enc(x, mask=np.ones((5, 5)))),
        ("key_padding_mask", "error", lambda: enc(x, key_padding_mask=np.ones((2, 6), bool))),
        ("causal", "error", lambda: enc(x, causal="no")),
        ("tgt", "error", lambda: dec(x[0, 0], mem)),
        ("memory", "error", lambda: dec(x, mem[:1])),
        ("memory", "error", lambda: dec(x, mem[..., :-1])),
        ("memory", "error", lambda: dec(x, mem.astype(object))),
        ("tgt_mask", "error", lambda: dec(x, mem, tgt_mask=np.ones((5, 5), int))),
        ("memory_mask", "error", lambda: dec(x, mem, memory_mask=np.ones((5, 5), bool))),
        ("memory_key_padding_mask", "error", lambda: dec(x, mem, memory_key_padding_mask=np.ones((2, 5), bool))),
        ("tgt_key_padding_mask", "error", lambda: dec(x, mem, tgt_key_padding_mask=np.ones((2, 5)))),
        ("tgt_causal", "error", lambda: dec(x, mem, tgt_causal="x")),
    ]
    for name, expect, fn in calls:
        cases.append(Case(f"layer call: {name} #{len(cases)}", fn, [name], expect))
    ok_calls = [
        ("MHA L=0", lambda: mha(x[:, :0]), (2, 0, E)),
        ("MHA B=0", lambda: mha(x[:0]), (0, 5, E)),
        ("MHA Lk=0", lambda: mha(x, mem[:, :0]), (2, 5, E)),
        ("MHA list input", lambda: mha(x.tolist()), (2, 5, E)),
        ("MHA int input", lambda: mha((x * 4).astype(np.int32)), (2, 5, E)),
        ("MHA float64 input", lambda: mha(x.astype(np.float64)), (2, 5, E)),
        ("MHA big-endian input", lambda: mha(x.astype(">f4")), (2, 5, E)),
        ("MHA reversed view", lambda: mha(x[:, ::-1]), (2, 5, E)),
        ("MHA all masked", lambda: mha(x, mask=np.zeros((5, 5), bool)), (2, 5, E)),
        ("MHA weights", lambda: mha(x, need_weights=True), (2, 5, E)),
        ("enc L=1", lambda: enc(x[:, :1]), (2, 1, E)),
        ("enc unbatched", lambda: enc(x[0]), (5, E)),
        ("dec unbatched", lambda: dec(x[0], mem[0]), (5, E)),
        ("dec causal", lambda: dec(x, mem, tgt_causal=True), (2, 5, E)),
    ]
    for name, fn, shape in ok_calls:
        cases.append(Case(name, fn, ["query"], "ok", check=finite_shape(shape)))

    def nan_rows(res):
        out = res[0] if isinstance(res, tuple) else res
        if out.shape != (2, 5, E):
            return f"shape {out.shape}"
        if not np.isfinite(out[1]).all():  # batch 1 never sees batch 0's NaN
            return "NaN in query batch 0 leaked into batch 1"
        return None

    xn = x.copy()
    xn[0, 2, 3] = np.nan
    cases.append(Case("MHA nan in one batch", lambda: mha(xn), ["query"], "ok", check=nan_rows))


def _run_one(case):
    try:
        res = case.fn()
    except BaseException as e:  # noqa: BLE001 - classify everything the call raised
        return {"outcome": "raised", "exc": type(e).__name__, "msg": str(e)[:400]}
    problem = None
    if case.check is not None:
        try:
            problem = case.check(res)
        except Exception as e:  # noqa: BLE001
            problem = f"check failed: {type(e).__name__}: {e}"
    return {"outcome": "ok", "problem": problem}


def _judge(case, rec, cuda_available: bool):
    """None if the outcome is acceptable, else a description of what went wrong."""
    if rec["outcome"] == "ok":
        if case.expect == "error":
            return "accepted an invalid call" + (f" ({rec['problem']})" if rec["problem"] else "")
        return rec["problem"]
    exc, msg = rec["exc"], rec["msg"]
    if case.expect == "ok":
        return f"valid call raised {exc}: {msg}"
    if case.cuda and not cuda_available and exc == "RuntimeError":
        return None if _names_arg(msg, case.names) else f"RuntimeError without 'cuda': {msg}"
    if case.huge and exc == "MemoryError":
        return None
    if exc not in ("ValueError", "TypeError"):
        return f"raised {exc} (expected ValueError/TypeError): {msg}"
    if case.huge:
        return None
    if not _names_arg(msg, case.names):
        return f"{exc} message names none of {list(case.names)}: {msg!r}"
    return None


def _random_combos(mutations, n, seed):
    """Cases that apply 2-3 single-argument mutations at once (the later one wins on a clash)."""
    import mha_ext

    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        picks = rng.choice(len(mutations), size=int(rng.integers(2, 4)), replace=False)
        over, names, must_fail = {}, [], False
        for j in picks:
            name, o, nm, expect = mutations[j]
            over.update(o)
            names += list(nm)
            must_fail |= expect == "error"
        label = " + ".join(mutations[j][0] for j in picks)
        case_args = dict(over)

        def fn(a=case_args):
            kw = dict(a)
            return mha_ext.attention(kw.pop("q", Q), kw.pop("k", K), kw.pop("v", V), **kw)

        def check(res, a=case_args):
            kw = dict(a)
            return _check_attention(res, kw.pop("q", Q), kw.pop("k", K), kw.pop("v", V), kw)

        # A clash can undo a mutation (e.g. two values for one argument): "either" then.
        keys = [k for j in picks for k in mutations[j][1]]
        expect = "error" if must_fail and len(keys) == len(set(keys)) else "either"
        cases.append(Case(f"combo {i}: {label}", fn, names, expect, check=check))
    return cases


Q = K = V = None  # the base q, k, v, set by _worker (used by the random combinations)


def _worker(n_random: int) -> None:
    """Child entry point: runs every case, one JSON line each ("start" then the result)."""
    global Q, K, V
    import mha_ext

    cases, mutations = _build_cases()
    # The same base arrays as the catalogue (same seed, same draws).
    rng = np.random.default_rng(20240501)
    Q = rng.standard_normal((2, 4, 5, 8)).astype(np.float32)
    K = rng.standard_normal((2, 2, 7, 8)).astype(np.float32)
    V = rng.standard_normal((2, 2, 7, 6)).astype(np.float32)
    cases += _random_combos(mutations, n_random, seed=7)
    cuda = mha_ext.cuda_available()
    out = sys.stdout
    for case in cases:
        out.write(json.dumps({"start": case.name}) + "\n")
        out.flush()
        rec = _run_one(case)
        rec["name"] = case.name
        rec["verdict"] = _judge(case, rec, cuda)
        out.write(json.dumps(rec) + "\n")
        out.flush()
    out.write(json.dumps({"done": len(cases)}) + "\n")


# ------------------------------------------------------------------------------------------
# The test: run the child, fail on a crash / hang or on any bad verdict.


def _run_child(n_random: int, timeout: float):
    code = (
        "import sys, warnings; warnings.simplefilter('ignore');"
        f"sys.path.insert(0, {str(HERE)!r});"
        f"import test_fuzz_inputs as t; t._worker({n_random})"
    )
    env = dict(os.environ, OMP_NUM_THREADS="2")
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
        stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        rc = None
    records = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return rc, records, stderr


@pytest.fixture(scope="module")
def fuzz_run():
    """Runs the child once for all the tests below: (exit code, records, stderr)."""
    return _run_child(N_RANDOM, timeout=240)


def _results(fuzz_run):
    rc, records, _ = fuzz_run
    return [r for r in records if "verdict" in r]


def _failures(results, predicate) -> list:
    bad = [r for r in results if r["verdict"] and predicate(r)]
    # Every catalogue case by name, then a few random combinations (they repeat the causes).
    single = [r for r in bad if not r["name"].startswith("combo ")]
    combos = [r for r in bad if r["name"].startswith("combo ")]
    lines = [f"{r['name']}: {r['verdict'][:300]}" for r in single + combos[:8]]
    if len(combos) > 8:
        lines.append(f"... and {len(combos) - 8} more random combinations")
    return lines if bad else []


def test_no_crash_or_hang(fuzz_run):
    """Every call returns or raises: the child finishes with exit code 0."""
    rc, records, stderr = fuzz_run
    started = [r["start"] for r in records if "start" in r]
    last = started[-1] if started else "<none>"
    if rc is None:
        pytest.fail(f"the fuzz child hung (timeout) in case {last!r}")
    assert rc == 0, f"the fuzz child died with exit code {rc} in case {last!r}:\n{stderr[-3000:]}"
    assert records and "done" in records[-1], f"incomplete run; last case {last!r}\n{stderr[-2000:]}"
    assert len(_results(fuzz_run)) == records[-1]["done"]


def test_only_value_and_type_errors(fuzz_run):
    bad = _failures(_results(fuzz_run), lambda r: r["verdict"].startswith("raised "))
    assert not bad, "unexpected exception types:\n" + "\n".join(bad)


def test_error_messages_name_the_argument(fuzz_run):
    bad = _failures(_results(fuzz_run), lambda r: "message names none of" in r["verdict"])
    assert not bad, "error messages that do not name the argument:\n" + "\n".join(bad)


def test_invalid_calls_are_refused(fuzz_run):
    bad = _failures(_results(fuzz_run), lambda r: r["verdict"].startswith("accepted "))
    assert not bad, "invalid calls that returned a result:\n" + "\n".join(bad)


def test_accepted_calls_give_the_documented_result(fuzz_run):
    """A call that returns must match the float64 reference (finite where it is finite)."""
    known = ("raised ", "accepted ")
    bad = _failures(
        _results(fuzz_run),
        lambda r: not r["verdict"].startswith(known) and "message names none of" not in r["verdict"],
    )
    assert not bad, "wrong results (silent garbage) or valid calls refused:\n" + "\n".join(bad)
