"""Memory stays flat over many calls: 100,000 small ``attention`` calls cycling through every
return option, ``out=``, masks, scores, strided views and raised errors, then the layers in a
loop. RSS (``/proc/self/statm``) is read after a warmup; native leaks under LeakSanitizer
are checked by ``scripts/sanitize.sh``."""

from __future__ import annotations

import gc
import os

import mha_ext
import numpy as np
import pytest
from reference import random_inputs

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/self/statm"), reason="RSS from /proc/self/statm (Linux)"
)

CALLS = 100_000
WARMUP = 10_000
# 10 MB over 100k calls: a leak of 100 bytes per call or more fails.
TOLERANCE = 10 * 2**20


def _rss() -> int:
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _call_cycle(rng):
    """A list of zero-argument callables covering the options; each is tiny (a few us)."""
    q, k, v = random_inputs(rng, (1, 2, 3, 8), (1, 1, 4, 8), (1, 1, 4, 4))
    q16, k16, v16 = (x.astype(np.float16) for x in (q, k, v))
    out = np.empty((1, 2, 3, 4), np.float32)
    mask = rng.random((3, 4)) < 0.7
    bias = rng.standard_normal((2, 3, 4))
    kl = np.array([3])
    gen = mha_ext.General(rng.standard_normal((8, 8)))
    add = mha_ext.Additive(rng.standard_normal((8, 3)), rng.standard_normal((8, 3)), np.ones(3))
    A = mha_ext.attention

    def bad():
        try:
            A(q, k[..., :-1], v)
        except ValueError:
            pass

    def bad_type():
        try:
            A(q, k, v, mask=bias)
        except TypeError:
            pass

    return [
        lambda: A(q, k, v),
        lambda: A(q, k, v, return_weights=True),
        lambda: A(q, k, v, return_lse=True),
        lambda: A(q, k, v, return_weights=True, return_lse=True),
        lambda: A(q, k, v, out=out),
        lambda: A(q, k, v, out=out, return_weights=True, return_lse=True),
        lambda: A(q, k, v, mask=mask, bias=bias, key_lengths=kl, causal=True, window=(1, 0)),
        lambda: A(q16, k16, v16, return_lse=True),
        lambda: A(q[:, :, ::-1], k, v),  # copy path
        lambda: A(q, k, v, bias=bias.astype(np.float16)),  # converted bias
        lambda: A(q, k, v, score=gen),
        lambda: A(q, k, v, score=add, return_weights=True),
        lambda: A(q[:, :, :0], k, v, return_weights=True, return_lse=True),
        lambda: A(q, k, v, num_threads=2),
        bad,
        bad_type,
    ]


def test_attention_memory_is_stable(rng):
    calls = _call_cycle(rng)
    n = len(calls)
    for i in range(WARMUP):
        calls[i % n]()
    before = _rss()
    for i in range(CALLS):
        calls[i % n]()
    growth = _rss() - before
    assert growth < TOLERANCE, f"RSS grew by {growth / 2**20:.1f} MiB over {CALLS} calls"


def test_layers_memory_is_stable(rng):
    mha = mha_ext.MultiHeadAttention(16, 4, num_kv_heads=2, seed=0)
    dec = mha_ext.TransformerDecoderLayer(16, 2, 32, seed=0)
    x = rng.standard_normal((2, 5, 16)).astype(np.float32)
    mem = rng.standard_normal((2, 7, 16)).astype(np.float32)
    kpm = np.ones((2, 7), bool)
    kpm[1, 5:] = False

    def step():
        mha(x, need_weights=True, causal=True)
        mha(x, mem, mem, key_padding_mask=kpm)
        dec(x, mem, tgt_causal=True, memory_key_padding_mask=kpm)

    for _ in range(500):
        step()
    before = _rss()
    for _ in range(3_000):
        step()
    growth = _rss() - before
    assert growth < TOLERANCE, f"RSS grew by {growth / 2**20:.1f} MiB over 3,000 layer steps"
