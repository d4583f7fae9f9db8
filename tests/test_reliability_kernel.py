"""Reliability inside the kernel and the binding (issue 15, items 2, 3, 4 and the native part of
8): a key_lengths buffer rewritten by another thread, windows up to sys.maxsize, a call
re-entered from a signal handler, and the smaller edges (scratch MemoryError message, a
byte-swapped out, huge float64 scales, Dv = 0). Process-level cases run in subprocesses with
timeouts, so a crash or a hang fails the test instead of the suite."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import mha_ext
from reference import attention_ref


def _run(script: str, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=dict(os.environ, **(env or {})),
    )


# ------------------------------------------------------------------------------------------
# Item 2: key_lengths is snapshotted before it is checked.


def test_key_lengths_rewritten_by_another_thread():
    """A thread flips kl[0] between 2**30 and 64 while the main thread calls attention: every
    call either raises the range error or computes with a checked value; none crashes."""
    script = """
        import threading, time
        import numpy as np
        import mha_ext
        rng = np.random.default_rng(0)
        q = rng.standard_normal((1, 2, 4, 16)).astype(np.float32)
        k = rng.standard_normal((1, 2, 64, 16)).astype(np.float32)
        kl = np.array([64], dtype=np.int64)
        ref = mha_ext.attention(q, k, k, key_lengths=np.array([64]))
        done = False
        def flip():
            while not done:
                kl[0] = 2**30
                kl[0] = 64
        t = threading.Thread(target=flip, daemon=True)
        sys_switch = __import__("sys").setswitchinterval(1e-5)
        t.start()
        ok = refused = 0
        deadline = time.monotonic() + 15
        for n in range(100_000):
            try:
                out = mha_ext.attention(q, k, k, key_lengths=kl, num_threads=1)
            except ValueError as e:
                assert str(e).startswith("key_lengths: entry 0 is 1073741824"), e
                refused += 1
            else:
                assert np.array_equal(out, ref)
                ok += 1
            if time.monotonic() > deadline:
                break
        done = True
        t.join()
        print("calls", ok + refused, "ok", ok, "refused", refused)
    """
    proc = _run(script, timeout=60)
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    assert "calls" in proc.stdout


# ------------------------------------------------------------------------------------------
# Item 3: windows up to sys.maxsize behave exactly like None.

BIG = [sys.maxsize, sys.maxsize - 1, 2**62]


@pytest.mark.parametrize("causal", [False, True, "top_left"])
@pytest.mark.parametrize(("lq", "lk"), [(8, 8), (13, 5), (5, 13)], ids=["eq", "lk<lq", "lk>lq"])
@pytest.mark.parametrize("big", BIG, ids=["maxsize", "maxsize-1", "2**62"])
def test_huge_windows_equal_none(rng, causal, lq, lk, big):
    q = rng.standard_normal((2, 2, lq, 16)).astype(np.float32)
    k = rng.standard_normal((2, 2, lk, 16)).astype(np.float32)
    v = rng.standard_normal((2, 2, lk, 8)).astype(np.float32)
    kw = dict(causal=causal, return_weights=True, return_lse=True, key_lengths=[lk, lk - 2])
    for window, same in [
        ((big, big), None),
        ((big, None), None),
        ((None, big), None),
        ((0, big), (0, None)),
        ((big, 0), (None, 0)),
        ((3, big), (3, None)),
    ]:
        got = mha_ext.attention(q, k, v, window=window, **kw)
        want = mha_ext.attention(q, k, v, window=same, **kw)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b, err_msg=f"window={window}")
    # And against the float64 reference (None = unbounded).
    out, _, lse = mha_ext.attention(q, k, v, window=(big, big), **kw)
    ref_out, _, ref_lse = attention_ref(q, k, v, causal=causal, key_lengths=[lk, lk - 2])
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_huge_window_naive_kernel_and_decode(rng):
    from mha_ext import _core

    q = rng.standard_normal((1, 2, 1, 32)).astype(np.float32)
    k = rng.standard_normal((1, 2, 300, 32)).astype(np.float32)
    big = sys.maxsize
    for naive in (False, True):
        a = _core.attention(q, k, k, None, None, 1, big, big, None, None, naive=naive)
        b = _core.attention(q, k, k, None, None, 1, -1, -1, None, None, naive=naive)
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------
# Item 4: a call from a signal handler during the outer call's Ctrl-C poll.


def test_reentrant_call_from_signal_handler():
    script = """
        import signal
        import numpy as np
        import mha_ext
        rng = np.random.default_rng(3)
        # Single-threaded and long enough (~0.1-1 s) for several 20 ms Ctrl-C polls; small
        # enough per thread that the outer call uses the per-thread cached scratch.
        q = rng.standard_normal((1, 1, 256, 64)).astype(np.float32)
        k = rng.standard_normal((1, 1, 16384, 64)).astype(np.float32)
        v = rng.standard_normal((1, 1, 16384, 64)).astype(np.float32)
        small = rng.standard_normal((1, 1, 64, 64)).astype(np.float32) * 30
        clean = mha_ext.attention(q, k, v, num_threads=1)
        inner_ref = mha_ext.attention(small, small, small, num_threads=1)
        calls = []
        def handler(signum, frame):
            calls.append(mha_ext.attention(small, small, small, num_threads=1))
        signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, 0.005, 0.005)
        try:
            out = mha_ext.attention(q, k, v, num_threads=1)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        assert calls, "the handler never ran during the outer call"
        for c in calls:
            assert np.array_equal(c, inner_ref)
        err = float(np.abs(out - clean).max())
        assert np.array_equal(out, clean), f"outer result changed: max error {err}"
        print("handler calls", len(calls))
    """
    proc = _run(script, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    assert "handler calls" in proc.stdout


# ------------------------------------------------------------------------------------------
# Item 8 (native): MemoryError message, byte-swapped out, huge float64 scales, Dv = 0.


@pytest.mark.skipif(
    "libasan" in os.environ.get("LD_PRELOAD", ""),
    reason="an address-space limit cannot work under ASan (it reserves terabytes of shadow)",
)
def test_scratch_memory_error_has_a_message():
    """Under an address-space limit the kernel's scratch allocation fails: MemoryError says so."""
    script = """
        import resource
        import numpy as np
        import mha_ext
        D = 1 << 22  # one query row and one key of 4 Mi floats: ~0.3 GB of tile scratch
        q = np.ones((1, 1, 1, D), np.float32)
        k = np.ones((1, 1, 1, D), np.float32)
        v = np.ones((1, 1, 1, 8), np.float32)
        mha_ext.attention(q[..., :64], k[..., :64], v, num_threads=1)  # warm up the process
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * resource.getpagesize()
        limit = used + (96 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        try:
            mha_ext.attention(q, k, v, num_threads=1)
        except MemoryError as e:
            print("MemoryError:", e)
        else:
            raise SystemExit("no MemoryError")
    """
    proc = _run(script, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    msg = proc.stdout.split("MemoryError:", 1)[1].strip()
    assert msg.startswith("attention: out of memory allocating"), msg
    assert "bytes of kernel scratch" in msg


def test_out_byte_swapped_says_byte_order(rng):
    q = rng.standard_normal((1, 2, 3, 8)).astype(np.float32)
    out = np.empty((1, 2, 3, 8), ">f4")
    with pytest.raises(TypeError, match=r"^out: .*native byte order.*byte-swapped float32") as e:
        mha_ext.attention(q, q, q, out=out)
    assert "expected float32, got float32" not in str(e.value)
    # A wrong dtype still reads as before.
    with pytest.raises(TypeError, match=r"^out: expected dtype float32, got float64"):
        mha_ext.attention(q, q, q, out=np.empty((1, 2, 3, 8)))


def test_huge_float64_scale_is_refused_not_nan(rng):
    """float64 scores that would overflow to inf (NaN rows) are refused with a clear error."""
    q = rng.standard_normal((1, 2, 5, 8))
    k = rng.standard_normal((1, 2, 7, 8))
    with pytest.raises(ValueError, match=r"^scale: .*float64 scores of these inputs overflow"):
        mha_ext.attention(q, k, k, scale=1e308)
    with pytest.raises(ValueError, match=r"^scale: "):
        mha_ext.attention(q, k, k, scale=-1e300, score=mha_ext.General(np.eye(8) * 1e10))
    # Large scales that cannot overflow for these inputs are computed, finite, like the reference.
    for scale, data in [(1e300, 1e-150), (1e40, 1.0), (-1e200, 1e-100)]:
        qs, ks = q * data, k * data
        out, lse = mha_ext.attention(qs, ks, k, scale=scale, return_lse=True)
        assert np.isfinite(out).all() and np.isfinite(lse).all()
        ref_out, _, ref_lse = attention_ref(qs, ks, k, scale=scale)
        np.testing.assert_allclose(out, ref_out, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(lse, ref_lse, rtol=1e-9)


def test_dv_zero_does_no_work():
    """Dv = 0 returns the empty output at once: the O(Lq Lk D) scores are not computed (here
    ~9e12 flops on stride-0 inputs, hours of work if they were)."""
    script = """
        import numpy as np
        import mha_ext
        L, D = 1 << 16, 1024
        q = np.broadcast_to(np.ones((1, 1, 1, D), np.float32), (1, 1, L, D))
        v = np.empty((1, 1, L, 0), np.float32)
        out = mha_ext.attention(q, q, v)
        assert out.shape == (1, 1, L, 0), out.shape
        print("ok")
    """
    proc = _run(script, timeout=60)
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr[-2000:])


def test_dv_zero_lse_is_correct(rng):
    q = rng.standard_normal((2, 4, 9, 16)).astype(np.float32)
    k = rng.standard_normal((2, 2, 11, 16)).astype(np.float32)
    v = np.empty((2, 2, 11, 0), np.float32)
    kw = dict(causal=True, key_lengths=[11, 6])
    out, w, lse = mha_ext.attention(q, k, v, return_weights=True, return_lse=True, **kw)
    _, ref_w, ref_lse = attention_ref(q, k, np.zeros((2, 2, 11, 1), np.float32), **kw)
    assert out.shape == (2, 4, 9, 0)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(w, ref_w, rtol=1e-5, atol=1e-5)
