"""Many Python threads calling ``mha_ext.attention`` at once.

The kernel is deterministic: each output element is reduced in a fixed order whatever the
thread count (``test_attention.py::test_num_threads_identical``), so concurrent calls must
give the serial results *bitwise*, with any ``num_threads``. The GIL is released during the
native call, so another Python thread keeps running while a call is in progress.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import mha_ext
import ml_dtypes
import numpy as np
from reference import attention_ref, random_inputs


def _problems(rng):
    """Different shapes, dtypes, masks, scores, return options and thread counts."""
    probs = []
    specs = [
        ((2, 4, 97, 32), (2, 2, 130, 32), (2, 2, 130, 16), np.float32, 1),
        ((1, 8, 1, 64), (1, 2, 700, 64), (1, 2, 700, 64), np.float32, 2),  # decode, GQA
        ((3, 2, 33, 8), (3, 2, 33, 8), (3, 2, 33, 8), np.float64, None),
        ((2, 2, 65, 16), (2, 2, 65, 16), (2, 2, 65, 16), np.float16, 2),
        ((1, 3, 50, 24), (1, 3, 77, 24), (1, 3, 77, 12), ml_dtypes.bfloat16, 1),
        ((7, 16), (9, 16), (9, 5), np.float32, None),  # 2-D
        ((2, 2, 40, 16), (2, 2, 40, 16), (2, 2, 40, 16), np.float32, 3),
    ]
    for n, (qs, ks, vs, dt, threads) in enumerate(specs):
        q, k, v = random_inputs(rng, qs, ks, vs, dtype=dt)
        kw = {"num_threads": threads, "causal": n % 2 == 0}
        if n == 2:
            kw["score"] = mha_ext.Additive(
                rng.standard_normal((8, 5)), rng.standard_normal((8, 5)), rng.standard_normal(5)
            )
        if n in (0, 6):
            kw["mask"] = rng.random(qs[:2] + (qs[2], ks[2])) < 0.8
            kw["key_lengths"] = np.array([ks[2], ks[2] // 2])
            kw["return_weights"] = kw["return_lse"] = True
        if n == 6:
            kw["window"] = (5, 2)
            kw["q_view"] = True
        probs.append((q, k, v, kw))
    return probs


def _call(problem):
    q, k, v, kw = problem
    kw = dict(kw)
    if kw.pop("q_view", False):
        q = q[:, :, ::-1]  # strided: the copy path, under concurrency too
    res = mha_ext.attention(q, k, v, **kw)
    return res if isinstance(res, tuple) else (res,)


def test_threads_match_serial_bitwise(rng):
    problems = _problems(rng)
    serial = [_call(p) for p in problems]
    # Sanity: the serial results are right (one of them against the reference).
    q, k, v, kw = problems[0]
    ref = attention_ref(q, k, v, causal=True, mask=kw["mask"], key_lengths=kw["key_lengths"])
    np.testing.assert_allclose(serial[0][0], ref[0], rtol=1e-5, atol=1e-5)
    jobs = [i for _ in range(6) for i in range(len(problems))]
    rng.shuffle(jobs)
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(lambda i: (i, _call(problems[i])), jobs))
    for i, res in got:
        assert len(res) == len(serial[i])
        for a, b in zip(res, serial[i]):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(
                a.view(np.uint8), b.view(np.uint8), err_msg=f"problem {i}"
            )


def test_threads_with_out_and_errors(rng):
    """Concurrent calls writing their own out= buffers while other threads raise errors."""
    q, k, v = random_inputs(rng, (2, 4, 31, 16), (2, 2, 45, 16), (2, 2, 45, 8))
    expected = mha_ext.attention(q, k, v, causal=True)
    bad_k = k[..., :-1]
    failures = []

    def worker(n):
        for _ in range(20):
            if n % 3 == 0:
                try:
                    mha_ext.attention(q, bad_k, v)
                except ValueError as e:
                    assert "k" in str(e)
                else:
                    failures.append("bad call accepted")
            else:
                out = np.empty_like(expected)
                mha_ext.attention(q, k, v, causal=True, out=out, num_threads=1 + n % 2)
                if not np.array_equal(out, expected):
                    failures.append(f"thread {n}: result differs")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:5]


def test_layers_shared_across_threads(rng):
    """One layer object used from several threads (weights only read) gives serial results."""
    enc = mha_ext.TransformerEncoderLayer(32, 4, 64, seed=1)
    xs = [rng.standard_normal((2, n, 32)).astype(np.float32) for n in (5, 17, 33, 1)]
    serial = [enc(x, causal=True) for x in xs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda x: enc(x, causal=True), xs * 4))
    for i, out in enumerate(got):
        np.testing.assert_array_equal(out, serial[i % len(xs)])


def test_gil_is_released_during_a_call():
    """While one Python thread is inside a long native call, another keeps running.

    This asserts no speed ratio (the machine may be shared, with less than a core free): if
    the call held the GIL, the main thread could not run a single bytecode while it lasts, so
    it would record no timestamp inside the call. With the GIL released it keeps looping, and
    its longest pause is a scheduler time slice. The parallel speedup itself is measured by
    ``benchmarks/bench_forward.py`` (the "threads" rows), not asserted here.
    """
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 1, 192, 64)).astype(np.float32)
    row = rng.standard_normal(64).astype(np.float32)

    def keys(n):  # a long key axis through a stride-0 view: no memory
        return np.broadcast_to(row, (1, 1, n, 64))

    # Size one single-threaded call to at least ~0.3 s.
    n = 1 << 14
    while True:
        t0 = time.perf_counter()
        mha_ext.attention(q, keys(n), keys(n), num_threads=1)
        took = time.perf_counter() - t0
        if took >= 0.3 or n >= 1 << 26:
            break
        n *= max(2, min(16, int(0.35 / max(took, 1e-4)) + 1))
    k = keys(n)

    window = {}
    started = threading.Event()

    def worker():
        started.set()
        window["start"] = time.perf_counter()
        mha_ext.attention(q, k, k, num_threads=1)
        window["end"] = time.perf_counter()

    thread = threading.Thread(target=worker)
    thread.start()
    started.wait()
    stamps = []
    while thread.is_alive():
        stamps.append(time.perf_counter())
    thread.join()

    start, end = window["start"], window["end"]
    inside = [t for t in stamps if start < t < end]
    assert len(inside) > 100, (
        f"the main thread ran only {len(inside)} loop iterations during a {end - start:.2f} s "
        "call: the GIL is held during native work"
    )
    edges = [start, *inside, end]
    longest = max(b - a for a, b in zip(edges, edges[1:]))
    assert longest < 0.5 * (end - start), (
        f"the main thread paused {longest:.3f} s during a {end - start:.3f} s call"
    )
