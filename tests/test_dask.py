"""mha_ext.dask.attention: chunked over batch, heads, queries and keys (SPEC 6.6).

Every result is checked against one in-process ``mha_ext.attention`` call (and the float64
reference). The distributed tests start a real ``distributed.LocalCluster`` with two worker
processes and shut it down.
"""

from __future__ import annotations

import logging

import mha_ext
import ml_dtypes
import numpy as np
import pytest

da = pytest.importorskip("dask.array")
import mha_ext.dask as mdask
from dask.core import get_dependencies
from reference import assert_out_close, attention_ref

OPTIONS = [
    {},
    {"causal": True},
    {"causal": "top_left"},
    {"window": (20, 5)},
    {"window": (None, 0), "causal": False},
    {"key_lengths": np.array([300, 123])},
    {"causal": True, "key_lengths": np.array([250, 123]), "window": (30, None)},
    {"score": "dot", "scale": 0.3},
]


def inputs(rng, dtype=np.float32, hq=4, hk=2, lq=50, lk=300, d=16, dv=8):
    q = rng.standard_normal((2, hq, lq, d)).astype(dtype)
    k = rng.standard_normal((2, hk, lk, d)).astype(dtype)
    v = rng.standard_normal((2, hk, lk, dv)).astype(dtype)
    return q, k, v


def chunked(q, k, v, qc=17, kc=64):
    return (
        da.from_array(q, chunks=(1, q.shape[1], qc, q.shape[3])),
        da.from_array(k, chunks=(1, 1, kc, k.shape[3])),
        da.from_array(v, chunks=(1, 1, kc, v.shape[3])),
    )


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(sorted(o)) or "plain")
def test_matches_one_in_process_call(rng, opts):
    q, k, v = inputs(rng)
    ref, ref_lse = mha_ext.attention(q, k, v, return_lse=True, **opts)
    out, lse = mdask.attention(*chunked(q, k, v), return_lse=True, **opts)
    out, lse = out.compute(scheduler="threads"), lse.compute(scheduler="threads")
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)
    ref64 = attention_ref(q, k, v, **opts)[0]
    np.testing.assert_allclose(out, ref64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float64, np.float16, ml_dtypes.bfloat16],
                         ids=lambda d: np.dtype(d).name)
def test_dtypes(rng, dtype):
    q, k, v = inputs(rng, dtype=dtype, d=16, dv=16)
    out = mdask.attention(*chunked(q, k, v), causal=True).compute(scheduler="sync")
    assert out.dtype == np.dtype(dtype)
    assert_out_close(out, q, k, v, causal=True)


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
@pytest.mark.parametrize("rank", [2, 3, 4])
def test_layouts_and_ranks(rng, layout, rank):
    q, k, v = inputs(rng, hq=2, hk=2)
    if layout == "blhd":
        q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    q, k, v = (x[(0,) * (4 - rank)] for x in (q, k, v))
    ref = mha_ext.attention(q, k, v, layout=layout, causal=True)
    dq, dk, dv = (da.from_array(x, chunks=(*tuple(max(1, s // 3) for s in x.shape[:-1]), -1))
                  for x in (q, k, v))
    out = mdask.attention(dq, dk, dv, layout=layout, causal=True)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out.compute(scheduler="sync"), ref, rtol=1e-5, atol=1e-5)


def test_numpy_inputs_and_one_key_chunk(rng):
    q, k, v = inputs(rng)
    out = mdask.attention(q, k, v).compute(scheduler="sync")
    np.testing.assert_allclose(out, mha_ext.attention(q, k, v), rtol=1e-6, atol=1e-6)


def test_no_task_sees_more_than_one_key_chunk(rng):
    q, k, v = inputs(rng, lk=640)
    dq, dk, dv = chunked(q, k, v, kc=64)
    out = mdask.attention(dq, dk, dv, causal=True, split_every=3)
    graph = dict(out.__dask_graph__())
    kv_names = {dk.name, dv.name}
    worst = 0
    for key in graph:
        deps = get_dependencies(graph, key)
        n = len({d for d in deps if isinstance(d, tuple) and d[0] in kv_names and d[0] == dk.name})
        worst = max(worst, n)
    assert worst == 1, f"a task depends on {worst} key chunks"
    np.testing.assert_allclose(out.compute(scheduler="threads"),
                               mha_ext.attention(q, k, v, causal=True), rtol=1e-5, atol=1e-5)


def test_processes_scheduler(rng):
    q, k, v = inputs(rng)
    out = mdask.attention(*chunked(q, k, v), causal=True).compute(scheduler="processes",
                                                                  num_workers=2)
    np.testing.assert_allclose(out, mha_ext.attention(q, k, v, causal=True), rtol=1e-5,
                               atol=1e-5)


def test_errors(rng):
    q, k, v = inputs(rng)
    dq, dk, dv = chunked(q, k, v)
    with pytest.raises(TypeError, match="q: expected a dask"):
        mdask.attention([1.0], dk, dv)
    with pytest.raises(TypeError, match="one dtype"):
        mdask.attention(dq.astype(np.float64), dk, dv)
    with pytest.raises(ValueError, match="same rank"):
        mdask.attention(dq[0], dk, dv)
    with pytest.raises(ValueError, match="multiple"):
        mdask.attention(dq[:, :3], dk, dv)
    with pytest.raises(ValueError, match="key_lengths"):
        mdask.attention(dq, dk, dv, key_lengths=np.array([1, 301]))
    with pytest.raises(ValueError, match="split_every"):
        mdask.attention(dq, dk, dv, split_every=1)
    with pytest.raises(ValueError, match="causal"):
        mdask.attention(dq, dk, dv, causal="diagonal")
    with pytest.raises(ValueError, match="layout"):
        mdask.attention(dq, dk, dv, layout="x")
    with pytest.raises(TypeError, match="mask"):
        mdask.attention(dq, dk, dv, mask=np.ones((50, 300), bool))  # type: ignore[call-arg]


@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
        silence_logs=logging.ERROR,
    )
    c = distributed.Client(cluster)
    yield c
    c.close()
    cluster.close()


def test_local_cluster_keys_stay_on_their_workers(rng, client):
    """Keys generated on the workers stay sharded there; the merged result matches."""
    import distributed

    B, H, Lq, Lk, D = 1, 2, 64, 32768, 32
    q = rng.standard_normal((B, H, Lq, D)).astype(np.float32)
    gen = da.random.default_rng(7)
    k = gen.standard_normal((B, H, Lk, D), chunks=(1, H, 4096, D), dtype=np.float32)
    # v_j made from k_j (as a K/V projection would): each pair lives on one worker.
    v = k.map_blocks(lambda x: np.cos(3 * x) * x, dtype=np.float32)
    k, v = client.persist([k, v])
    distributed.wait([k, v])
    holders = set().union(*map(set, client.who_has(k).values()))
    assert len(holders) == 2, "the key chunks were not spread over both workers"
    out, lse = mdask.attention(da.from_array(q, chunks=q.shape), k, v, return_lse=True)
    out, lse = client.compute([out, lse], sync=True)
    # No worker received the whole K/V: what each one holds or fetched of k and v stays
    # below the total (the partial tasks run next to their chunks).
    names = {k.name, v.name}

    def kv_bytes(dask_worker, names=tuple(names)):
        seen = {key: ts.nbytes for key, ts in dask_worker.state.tasks.items()
                if isinstance(key, tuple) and key[0] in names and ts.state == "memory"}
        for entry in dask_worker.transfer_incoming_log:
            seen.update((key, nb) for key, nb in entry["keys"].items()
                        if isinstance(key, tuple) and key[0] in names)
        return sum(seen.values())

    total = k.nbytes + v.nbytes
    per_worker = client.run(kv_bytes)
    assert len(per_worker) == 2
    assert all(0 < b < total for b in per_worker.values()), (per_worker, total)
    kn, vn = client.compute([k, v], sync=True)
    ref, ref_lse = mha_ext.attention(q, kn, vn, return_lse=True)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)
