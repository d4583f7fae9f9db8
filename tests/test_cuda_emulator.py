"""The CUDA host emulator's own tests (MHA_EXT_CUDA_EMULATOR=ON builds only).

Each primitive of csrc/cuda/ptx.cuh, run by the emulator in a tiny kernel
(csrc/cuda/emu/selftest.cpp, module ``mha_ext._cuda_emu``), against a plain NumPy computation
written here from the PTX ISA's documented layouts -- independently of the attention kernels
and of the emulator's own code. Then the checks the emulator must make: a wrong fragment
mapping gives a wrong product, a missing barrier is reported as a shared-memory race naming
the kernel, the offset and both threads, cp.async data read before its wait_group is
reported, and deadlocks, divergent warp operations, out-of-bounds and misaligned accesses
fail the launch.
"""

from __future__ import annotations

import os

import mha_ext
import numpy as np
import pytest

emu = pytest.importorskip("mha_ext._cuda_emu", reason="needs the MHA_EXT_CUDA_EMULATOR build")

try:
    import ml_dtypes

    BF16 = ml_dtypes.bfloat16
except ImportError:  # pragma: no cover - optional dependency
    BF16 = None

LANES = np.arange(32)
G, T = LANES >> 2, LANES & 3  # groupID, threadID_in_group


@pytest.fixture(autouse=True)
def _racecheck_on(monkeypatch):
    for name in ("MHA_EXT_CUDA_EMU_RACECHECK", "MHA_EXT_CUDA_EMU_SCHEDULE", "MHA_EXT_CUDA_EMU_FAIL"):
        monkeypatch.delenv(name, raising=False)


def test_build_reports_emulation():
    info = mha_ext.build_info()
    assert info["cuda_emulated"] is True
    assert info["cuda_built"] is True
    assert mha_ext.cuda_available() is True


# ------------------------------------------------------------------------------------------
# Shuffles and votes.


@pytest.mark.parametrize("mask", [1, 2, 4, 8, 16, 31])
def test_shfl_xor(rng, mask):
    x = rng.standard_normal(32)
    out, fault = emu.shfl(x, 0, mask, np.zeros(32, np.int32))
    assert fault == ""
    np.testing.assert_array_equal(out, x[LANES ^ mask])


def test_shfl_indexed_and_reductions(rng):
    x = rng.standard_normal(32)
    src = rng.integers(0, 64, 32).astype(np.int32)  # the source lane is taken mod 32
    out, fault = emu.shfl(x, 1, 0, src)
    assert fault == ""
    np.testing.assert_array_equal(out, x[src % 32])
    out, _ = emu.shfl(x, 2, 0, src)
    np.testing.assert_array_equal(out, np.full(32, x.max()))
    out, _ = emu.shfl(x, 3, 0, src)
    np.testing.assert_allclose(out, np.full(32, x.sum()), rtol=1e-14)
    out, _ = emu.shfl(x, 5, 0, src)  # quad_sum in float
    quads = x.astype(np.float32).reshape(8, 4).sum(axis=1)
    np.testing.assert_allclose(out, np.repeat(quads, 4), rtol=1e-6)


def test_ballot(rng):
    pred = (rng.random(32) < 0.5).astype(np.float64)
    out, fault = emu.shfl(pred, 4, 0, np.zeros(32, np.int32))
    assert fault == ""
    expected = sum(1 << int(lane) for lane in LANES if pred[lane])
    assert np.all(out == expected)


# ------------------------------------------------------------------------------------------
# mma.sync.m16n8k16.row.col.f32.{f16,bf16}: fragments built from the ISA's tables.


def _bits(x, bf16):
    if bf16:
        return x.astype(BF16).view(np.uint16).astype(np.uint32)
    return x.astype(np.float16).view(np.uint16).astype(np.uint32)


def _pack(lo, hi):
    return (lo | (hi << 16)).astype(np.uint32)


def a_fragments(A, bf16, swap=False):
    """(32, 4) registers: a_i at row groupID + 8 * (i in {2,3,6,7}), col 2*tid + (i&1) + 8*(i>=4)."""
    bits = _bits(A, bf16)
    regs = np.zeros((32, 4), np.uint32)
    for r in range(4):
        i0 = 2 * r
        rows = G + 8 * ((i0 >> 1) & 1)
        cols = 2 * T + 8 * (i0 >> 2)
        regs[:, r] = _pack(bits[rows, cols], bits[rows, cols + 1])
    if swap:  # a typical slip: registers 1 and 2 (row + 8 vs col + 8) exchanged
        regs[:, [1, 2]] = regs[:, [2, 1]]
    return regs


def b_fragments(B, bf16):
    """(32, 2) registers: b_i at row 2*tid + (i&1) + 8*(i>=2), col groupID."""
    bits = _bits(B, bf16)
    regs = np.zeros((32, 2), np.uint32)
    for r in range(2):
        rows = 2 * T + 8 * r
        regs[:, r] = _pack(bits[rows, G], bits[rows + 1, G])
    return regs


def cd_fragments(C):
    """(32, 4): c_i at row groupID + 8*(i>=2), col 2*tid + (i&1)."""
    out = np.zeros((32, 4), np.float32)
    for i in range(4):
        out[:, i] = C[G + 8 * (i >> 1), 2 * T + (i & 1)]
    return out


def cd_matrix(frags):
    D = np.zeros((16, 8), np.float64)
    for i in range(4):
        D[G + 8 * (i >> 1), 2 * T + (i & 1)] = frags[:, i]
    return D


def _rounded(x, bf16):
    return x.astype(BF16 if bf16 else np.float16).astype(np.float64)


BF16_CASES = [False] + ([True] if BF16 is not None else [])


@pytest.mark.parametrize("bf16", BF16_CASES, ids=lambda b: "bf16" if b else "f16")
def test_mma_matches_the_documented_layout(rng, bf16):
    A = rng.standard_normal((16, 16))
    B = rng.standard_normal((16, 8))
    C = rng.standard_normal((16, 8)).astype(np.float32)
    d, fault = emu.mma(a_fragments(A, bf16), b_fragments(B, bf16), cd_fragments(C), bf16)
    assert fault == ""
    ref = _rounded(A, bf16) @ _rounded(B, bf16) + C.astype(np.float64)
    np.testing.assert_allclose(cd_matrix(d), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bf16", BF16_CASES, ids=lambda b: "bf16" if b else "f16")
def test_mma_catches_a_wrong_fragment_mapping(rng, bf16):
    A = rng.standard_normal((16, 16))
    B = rng.standard_normal((16, 8))
    C = np.zeros((16, 8), np.float32)
    d, _ = emu.mma(a_fragments(A, bf16, swap=True), b_fragments(B, bf16), cd_fragments(C), bf16)
    ref = _rounded(A, bf16) @ _rounded(B, bf16)
    assert np.max(np.abs(cd_matrix(d) - ref)) > 0.1


# ------------------------------------------------------------------------------------------
# ldmatrix.sync.m8n8.{x1,x2,x4}{,.trans}.b16


@pytest.mark.parametrize("num", [1, 2, 4])
@pytest.mark.parametrize("trans", [False, True])
def test_ldmatrix(rng, num, trans):
    tile = rng.integers(0, 1 << 16, (32, 8)).astype(np.uint16)
    rows = rng.permutation(32).astype(np.int32)  # lane l gives the address of row rows[l]
    regs, fault = emu.ldmatrix(tile, rows, num, trans)
    assert fault == ""
    for i in range(num):
        M = tile[rows[8 * i : 8 * i + 8]].astype(np.uint32)  # matrix i: rows from lanes 8i..8i+7
        if trans:
            lo, hi = M[2 * T, G], M[2 * T + 1, G]
        else:
            lo, hi = M[G, 2 * T], M[G, 2 * T + 1]
        np.testing.assert_array_equal(regs[:, i], lo | (hi << 16))


def test_ldmatrix_misaligned_row_is_a_fault(rng):
    tile = rng.integers(0, 1 << 16, (32, 8)).astype(np.uint16)
    rows = (np.arange(32) % 16).astype(np.int32)  # every row address stays inside the tile
    _, fault = emu.ldmatrix(tile, rows, 4, False, offset_bytes=4)
    assert "ldmatrix row address" in fault and "16-byte aligned" in fault


@pytest.mark.parametrize("bf16", BF16_CASES, ids=lambda b: "bf16" if b else "f16")
def test_ldmatrix_feeds_mma_like_the_kernel(rng, bf16):
    A = rng.standard_normal((16, 16))
    B = rng.standard_normal((16, 8))
    D, fault = emu.mma_ldmatrix(_bits(A, bf16).astype(np.uint16), _bits(B, bf16).astype(np.uint16), bf16)
    assert fault == ""
    np.testing.assert_allclose(D, _rounded(A, bf16) @ _rounded(B, bf16), rtol=1e-6, atol=1e-6)
    # The matrices' row addresses given in the wrong order: a wrong product, caught.
    D, _ = emu.mma_ldmatrix(
        _bits(A, bf16).astype(np.uint16), _bits(B, bf16).astype(np.uint16), bf16, wrong=True
    )
    assert np.max(np.abs(D - _rounded(A, bf16) @ _rounded(B, bf16))) > 0.1


# ------------------------------------------------------------------------------------------
# cp.async with src-size zero fill, commit_group / wait_group.


def test_cp_async_zero_fill_and_groups(rng):
    src = rng.integers(1, 256, 64 * 32).astype(np.uint8)
    src_bytes = rng.integers(0, 17, 128).astype(np.int32)
    src_bytes[:3] = [0, 16, 7]
    out, fault = emu.cp_async(src, src_bytes, 0)
    assert fault == ""
    expected = np.zeros(64 * 32, np.uint8)
    for c in range(128):
        n = src_bytes[c]
        expected[16 * c : 16 * c + n] = src[16 * c : 16 * c + n]
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("mode", [1, 2], ids=["wait_group1", "no_wait"])
def test_cp_async_read_before_wait_is_reported(rng, mode):
    src = rng.integers(1, 256, 64 * 32).astype(np.uint8)
    _, fault = emu.cp_async(src, np.full(128, 16, np.int32), mode)
    assert "cp_async_kernel" in fault
    assert "destination of a cp.async" in fault and "has not completed" in fault


# ------------------------------------------------------------------------------------------
# Barriers and the race detector.


def test_correct_reduction_has_no_race():
    value, fault = emu.sync_pattern(0)
    assert fault == ""
    assert value == sum(range(1, 129))


def test_missing_syncthreads_is_reported():
    _, fault = emu.sync_pattern(1)
    assert "shared-memory race" in fault
    assert "sync_kernel" in fault  # the kernel
    assert "byte offset" in fault and "address 0x" in fault  # the address
    assert fault.count("thread (") >= 2  # both threads
    assert "with no barrier in between" in fault


def test_missing_syncthreads_also_changes_the_result(monkeypatch):
    # Without the detector, the schedule decides what the racy kernel computes.
    monkeypatch.setenv("MHA_EXT_CUDA_EMU_RACECHECK", "0")
    values = []
    for schedule in ("forward", "reverse", "shuffle"):
        monkeypatch.setenv("MHA_EXT_CUDA_EMU_SCHEDULE", schedule)
        value, fault = emu.sync_pattern(1)
        assert fault == ""
        values.append(value)
    assert any(v != sum(range(1, 129)) for v in values)


def test_syncwarp_orders_lanes_of_one_warp():
    value, fault = emu.sync_pattern(2)
    assert fault == ""
    assert value == 1.0


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        (3, ["shared-memory race", "written by thread (0,0,0)", "thread (1,0,0)"]),
        (4, ["shared-memory race", "written by thread (0,0,0)", "thread (32,0,0) [warp 1"]),
        (5, ["shared-memory race", "writes", "read by thread (40,0,0)"]),
        (6, ["out-of-bounds shared-memory write", "offset 520 of a 512-byte allocation"]),
        (7, ["deadlock", "__syncthreads"]),
        (8, ["divergent"]),
    ],
    ids=["no_syncwarp", "syncwarp_across_warps", "write_after_read", "out_of_bounds", "deadlock",
         "divergent_warp_ops"],
)
def test_faults_are_reported(kind, words):
    _, fault = emu.sync_pattern(kind)
    for w in words:
        assert w in fault, (w, fault)


def test_fresh_shared_memory_reads_as_nan():
    value, fault = emu.sync_pattern(9)
    assert fault == ""
    assert np.isnan(value)


def test_dynamic_shared_memory_limit():
    assert emu.launch_config(48 * 1024, -1) == ""
    assert "invalid argument" in emu.launch_config(48 * 1024 + 16, -1)
    assert emu.launch_config(100_000, 100_000) == ""
    assert "cudaFuncSetAttribute" in emu.launch_config(200_000, 200_000)


# ------------------------------------------------------------------------------------------
# The attention kernels under the detector: every launch is logged with its fault count.


def test_attention_kernels_run_race_free(rng, tmp_path, monkeypatch):
    log = tmp_path / "launches.txt"
    monkeypatch.setenv("MHA_EXT_CUDA_EMU_LOG", str(log))
    for dtype in (np.float16, np.float32):
        q = rng.standard_normal((1, 2, 70, 64)).astype(dtype)
        k = rng.standard_normal((1, 2, 90, 64)).astype(dtype)
        v = rng.standard_normal((1, 2, 90, 64)).astype(dtype)
        mha_ext.attention(q, k, v, causal=True, device="cuda", return_weights=True)
    lines = log.read_text().splitlines()
    kernels = {line.split(" kernel=", 1)[1] for line in lines}
    assert any("attention_tc_kernel" in k for k in kernels), kernels
    assert any("attention_simt_kernel" in k for k in kernels), kernels
    assert any("attention_weights_kernel" in k for k in kernels), kernels
    assert all(" faults=0 " in line for line in lines), lines
    # the detector saw the shared-memory traffic of the kernels that have any
    checked = {}
    for line in lines:
        head, name = line.split(" kernel=", 1)
        fields = dict(f.split("=", 1) for f in head.split())
        checked[name.split("<")[0]] = checked.get(name.split("<")[0], 0) + int(fields["checked"])
    assert checked["mha::cuda::attention_tc_kernel"] > 0, checked
    assert checked["mha::cuda::attention_simt_kernel"] > 0, checked
    assert os.environ.get("MHA_EXT_CUDA_EMU_RACECHECK") is None  # the detector was on
