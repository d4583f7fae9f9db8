"""Extreme values and sizes (SPEC section 4): large logits, NaN/Inf propagation, sequence
lengths above 65,536, outputs above 2**31 elements, and Ctrl-C during a long call."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import mha_ext
import ml_dtypes
import numpy as np
import pytest
from reference import attention_ref, random_inputs, visible_mask

DTYPES = [np.float32, np.float64, np.float16, ml_dtypes.bfloat16]
DTYPE_IDS = ["f32", "f64", "f16", "bf16"]
EPS32 = float(np.finfo(np.float32).eps)


def _assert_same_nonfinite(got, exp, what="out"):
    """Non-finite entries exactly where the reference has them; the rest close to it."""
    got = np.asarray(got).astype(np.float64)
    exp = np.asarray(exp, dtype=np.float64)
    assert got.shape == exp.shape
    np.testing.assert_array_equal(np.isnan(got), np.isnan(exp), err_msg=f"{what}: NaN pattern")
    np.testing.assert_array_equal(np.isinf(got), np.isinf(exp), err_msg=f"{what}: Inf pattern")
    fin = np.isfinite(exp)
    np.testing.assert_allclose(got[fin], exp[fin], rtol=2e-3, atol=2e-3, err_msg=what)


# ------------------------------------------------------------------------------------------
# Large logits: |s| up to 1e4 stays finite and matches the (max-subtracted) reference.


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_logits_1e4_stay_finite(rng, dtype, sign):
    B, H, Lq, Lk, D = 2, 2, 33, 70, 16
    q, k, v = random_inputs(rng, (B, H, Lq, D), (B, H, Lk, D), (B, H, Lk, D), dtype=dtype)
    raw = np.einsum("bhid,bhjd->bhij", q.astype(np.float64), k.astype(np.float64))
    scale = sign * 1e4 / np.abs(raw).max()  # logits span [-1e4, 1e4]
    mask = rng.random((Lq, Lk)) < 0.9
    bias = np.where(rng.random((Lq, Lk)) < 0.1, -1e4, 0.0)  # additive "soft" masking
    kw = {"scale": scale, "mask": mask, "bias": bias, "causal": "top_left"}
    out, w, lse = mha_ext.attention(q, k, v, return_weights=True, return_lse=True, **kw)
    ref_out, ref_w, ref_lse = attention_ref(q, k, v, **kw)
    assert np.isfinite(out.astype(np.float64)).all()
    assert np.isfinite(w).all()
    assert np.isfinite(lse[np.isfinite(ref_lse)]).all()
    # The logits are accumulated in float32 (float64 for float64): a logit error of
    # |s| * D * eps moves the weights by that much (relative), hence the tolerance.
    acc_eps = 1e-15 if dtype == np.float64 else EPS32
    out_eps = float(ml_dtypes.finfo(dtype).eps)
    tol_s = 1e4 * D * acc_eps
    vmax = float(np.abs(v.astype(np.float64)).max())
    np.testing.assert_allclose(lse, ref_lse, rtol=0, atol=4 * tol_s + 1e-6)
    np.testing.assert_allclose(w, ref_w, rtol=0, atol=4 * tol_s + 1e-6)
    np.testing.assert_allclose(
        out.astype(np.float64), ref_out, rtol=0, atol=(4 * tol_s + out_eps) * vmax + 1e-6
    )


def test_all_logits_equal_and_huge():
    """Equal logits of 1e4 give uniform weights (no overflow in exp)."""
    q = np.full((1, 1, 3, 4), 50.0, np.float32)
    k = np.full((1, 1, 5, 4), 50.0, np.float32)
    v = np.arange(20, dtype=np.float32).reshape(1, 1, 5, 4)
    out, w, lse = mha_ext.attention(q, k, v, scale=1.0, return_weights=True, return_lse=True)
    # Weights come out as exp(s - lse) with lse in float32: relative error up to |lse| * eps.
    np.testing.assert_allclose(w, np.full((1, 1, 3, 5), 0.2), rtol=2 * 1e4 * EPS32)
    np.testing.assert_allclose(out[0, 0], np.tile(v[0, 0].mean(axis=0), (3, 1)), rtol=1e-6)
    np.testing.assert_allclose(lse, 1e4 + np.log(5), rtol=1e-7)


@pytest.mark.parametrize("scale", [1e38, -1e38, 1e300])
def test_finite_scale_overflowing_float32(rng, scale):
    """A finite scale whose logits overflow float32: refuse it (ValueError naming scale) or
    compute a finite softmax (the float64 reference's: the weight goes to the max logit)."""
    q, k, v = random_inputs(rng, (1, 2, 4, 8), (1, 2, 6, 8), (1, 2, 6, 8))
    try:
        out = mha_ext.attention(q, k, v, scale=scale)
    except ValueError as e:
        assert "scale" in str(e)
        return
    ref = attention_ref(q, k, v, scale=scale)[0]
    assert np.isfinite(out).all(), f"scale={scale}: NaN/Inf output from finite inputs"
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------
# NaN / Inf reach only the rows that see them.


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16], ids=["f32", "f64", "f16"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nonfinite_inputs_reach_only_their_rows(rng, dtype, value, where):
    B, Hq, Hk, Lq, Lk, D = 2, 4, 2, 9, 13, 8
    q, k, v = random_inputs(rng, (B, Hq, Lq, D), (B, Hk, Lk, D), (B, Hk, Lk, D), dtype=dtype)
    kl = np.array([13, 8])
    mask = rng.random((B, 1, Lq, Lk)) < 0.8
    kw = {"causal": True, "key_lengths": kl, "mask": mask}
    x = {"q": q, "k": k, "v": v}[where]
    x[0, 1, 4, 3] = value  # q row (0, 1, 4) / key 4 of kv head 1, seen by query heads 2-3
    if where == "q":
        x[1, 0, 2, 5] = value  # a query row that sees no key at all
        mask[1, 0, 2, :] = False
    else:
        x[1, 0, 10, 5] = value  # key 10 of batch 1 is padding (key_lengths[1] = 8)
    out, w, lse = mha_ext.attention(q, k, v, return_weights=True, return_lse=True, **kw)
    ref_out, ref_w, ref_lse = attention_ref(q, k, v, **kw)
    _assert_same_nonfinite(out, ref_out)
    _assert_same_nonfinite(lse, ref_lse, "lse")
    _assert_same_nonfinite(w, ref_w, "weights")
    # What "the rows they touch" means, spelled out:
    bad_rows = ~np.isfinite(out.astype(np.float64)).all(axis=-1)
    if where == "q":
        expected = np.zeros_like(bad_rows)
        expected[0, 1, 4] = True  # only that query row (and not if NaN only hits a hidden row)
        assert (bad_rows <= expected).all()
    else:
        vis = visible_mask(B, Hq, Lq, Lk, mask=mask, causal=True, key_lengths=kl)
        sees = np.zeros_like(bad_rows)
        sees[0, 2:4] = vis[0, 2:4, :, 4]  # query heads 2, 3 read kv head 1
        assert (bad_rows <= sees).all()
        assert not bad_rows[1].any(), "a padding key (beyond key_lengths) was read"


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nonfinite_bias_reaches_only_its_row(rng, value):
    q, k, v = random_inputs(rng, (1, 2, 6, 8), (1, 2, 7, 8), (1, 2, 7, 8))
    bias = rng.standard_normal((2, 6, 7))
    bias[1, 3, 2] = value
    mask = np.ones((6, 7), bool)
    mask[4, 5] = False
    bias[0, 4, 5] = np.nan  # hidden by the mask: no effect
    out = mha_ext.attention(q, k, v, bias=bias, mask=mask)
    ref = attention_ref(q, k, v, bias=bias, mask=mask)[0]
    _assert_same_nonfinite(out, ref)
    bad = ~np.isfinite(out).all(axis=-1)
    assert bad.sum() <= 1 and (not bad.any() or bad[0, 1, 3])


# ------------------------------------------------------------------------------------------
# Long sequences (> 65,536) and huge outputs (> 2**31 elements): 64-bit indexing.


def _rows_ref(q, k, v, rows, causal, window=None):
    """Reference for some query rows of a 2-D problem with Lq == Lk (bottom-right causal
    equals top-left then): the visibility of those rows only, as an explicit mask."""
    i = np.asarray(rows)[:, None]
    j = np.arange(k.shape[0])[None, :]
    vis = j <= i if causal else np.ones((len(rows), k.shape[0]), bool)
    if window is not None:
        vis &= (j >= i - window[0]) & (j <= i + window[1])
    return attention_ref(q[rows], k, v, mask=vis)


def test_prefill_above_65536_windowed(rng):
    """Lq = Lk = 70,003 with a causal sliding window (cheap), every query-tile boundary past
    2**16 included in the checked rows."""
    L, D = 70_003, 8
    q, k, v = random_inputs(rng, (L, D), (L, D), (L, 4))
    kw = {"causal": True, "window": (64, 3)}
    out, lse = mha_ext.attention(q, k, v, return_lse=True, **kw)
    rows = np.r_[0:3, 65_530:65_542, 69_990:L, rng.integers(0, L, 40)]
    ref_out, _, ref_lse = _rows_ref(q, k, v, rows, **kw)
    np.testing.assert_allclose(out[rows], ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse[rows], ref_lse, rtol=1e-5, atol=1e-5)


def test_decode_above_65536_gqa_blhd_weights(rng):
    """One query over 70,001 keys, GQA, layout blhd, bias and mask over the key axis, weights."""
    Lk = 70_001
    q, k, v = random_inputs(rng, (2, 1, 4, 8), (2, Lk, 2, 8), (2, Lk, 2, 4))
    mask = rng.random((2, 1, 1, Lk)) < 0.9
    bias = rng.standard_normal((1, Lk)).astype(np.float32)
    kw = {"mask": mask, "bias": bias, "key_lengths": np.array([Lk, 66_001]), "layout": "blhd"}
    out, w, lse = mha_ext.attention(q, k, v, return_weights=True, return_lse=True, **kw)
    ref_out, ref_w, ref_lse = attention_ref(q, k, v, **kw)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(w, ref_w, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_prefill_above_65536_full_causal(rng):
    """Lq = Lk = 70,001, plain causal (about 6 s on 2 cores)."""
    L = 70_001
    q, k, v = random_inputs(rng, (1, L, 4), (1, L, 4), (1, L, 4))
    out = mha_ext.attention(q, k, v, causal=True)
    rows = np.r_[0:2, 65_535:65_538, L - 3 : L, rng.integers(0, L, 20)]
    ref = _rows_ref(q[0], k[0], v[0], rows, causal=True)[0]
    np.testing.assert_allclose(out[0, rows], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_output_above_2_31_elements(rng):
    """out (2**21 + 5, 1024) float16: 2**31 + 5,120 elements (4 GiB), written through out=.

    The rows around element 2**31 and the last rows are checked against the reference, and
    no element is left unwritten (out starts as NaN). Peak memory about 4.1 GiB; about 15 s.
    """
    Lq, Lk, Dv = 2**21 + 5, 3, 1024
    q = rng.standard_normal((Lq, 1)).astype(np.float16)
    k = rng.standard_normal((Lk, 1)).astype(np.float16)
    v = rng.standard_normal((Lk, Dv)).astype(np.float16)
    out = np.empty((Lq, Dv), np.float16)
    assert out.size > 2**31
    out.view(np.uint16).fill(0x7E00)  # NaN
    res = mha_ext.attention(q, k, v, out=out)
    assert res is out
    boundary = 2**31 // Dv  # row holding element 2**31
    rows = np.r_[0:2, boundary - 2 : boundary + 3, Lq - 3 : Lq, rng.integers(0, Lq, 30)]
    ref = attention_ref(q[rows], k, v)[0]
    err = np.abs(out[rows].astype(np.float64) - ref).max()
    assert err <= 2 * float(np.finfo(np.float16).eps) * max(1.0, np.abs(ref).max()), err
    chunk = 1 << 18
    for s in range(0, Lq, chunk):  # every element written: no NaN bit pattern left
        u = out[s : s + chunk].view(np.uint16)
        assert not ((u & 0x7C00) == 0x7C00).any(), f"unwritten/non-finite rows from {s}"


# ------------------------------------------------------------------------------------------
# Ctrl-C: KeyboardInterrupt within 0.5 s, the process stays usable.

_INTERRUPT_CHILD = textwrap.dedent(
    """
    import sys, time
    import numpy as np, mha_ext
    q_shape, kv_len, D, threads = eval(sys.argv[1])
    rng = np.random.default_rng(0)
    def heads(shape):  # one real head, the others stride-0 views of it
        one = rng.standard_normal((*shape[:1], 1, *shape[2:])).astype(np.float32)
        return np.broadcast_to(one, shape)
    q = heads(q_shape)
    if kv_len is None:  # keys as real arrays, like q
        k = heads(q_shape)
    else:  # a huge key axis through a stride-0 view (no memory)
        k = np.broadcast_to(rng.standard_normal(D).astype(np.float32), (1, 1, kv_len, D))
    print("ready", flush=True)
    try:
        mha_ext.attention(q, k, k, num_threads=threads)
        print("finished", flush=True)
    except KeyboardInterrupt:
        print("interrupted", time.monotonic(), flush=True)
    # Still usable: a later call gives the right numbers.
    a = rng.standard_normal((2, 3, 17, 8)).astype(np.float32)
    got = mha_ext.attention(a, a, a, causal=True)
    s = np.einsum("bhid,bhjd->bhij", a.astype(np.float64), a.astype(np.float64)) / np.sqrt(8)
    s = np.where(np.tril(np.ones((17, 17), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True)); p /= p.sum(-1, keepdims=True)
    ok = np.allclose(got, p @ a.astype(np.float64), rtol=1e-5, atol=1e-5)
    print("after", "ok" if ok else "WRONG", flush=True)
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize(
    "config",
    [
        pytest.param(((1, 1, 32768, 64), None, 64, 1), id="prefill-1thread"),
        # 4.4 TFLOP: still running when SIGINT comes on a many-core machine.
        pytest.param(((1, 16, 32768, 64), None, 64, None), id="prefill-threads"),
        # One query tile over 2**22 keys: 0.4 TFLOP inside a single tile.
        pytest.param(((1, 1, 192, 128), 2**22, 128, None), id="long-keys-one-tile"),
        # Decode (Lq = 1) over 2**32 keys.
        pytest.param(((1, 1, 1, 64), 2**32, 64, None), id="decode-long-keys"),
    ],
)
def test_ctrl_c_interrupts_a_long_call(config):
    proc = subprocess.Popen(
        [sys.executable, "-c", _INTERRUPT_CHILD, repr(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(1.0)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            stdout, stderr = proc.communicate(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            pytest.fail(f"no KeyboardInterrupt within 3 s of SIGINT ({config}); output {stdout!r}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    lines = dict(line.split(" ", 1) for line in stdout.splitlines() if " " in line)
    assert "interrupted" in lines, f"call was not interrupted: {stdout!r} {stderr[-2000:]}"
    latency = float(lines["interrupted"]) - sent
    assert latency < 0.5, f"KeyboardInterrupt {latency:.2f} s after SIGINT"
    assert lines.get("after") == "ok", f"process unusable after the interrupt: {stdout!r}"
    assert proc.returncode == 0, stderr[-2000:]
