"""Shared fixtures: a per-test seeded rng, --runslow, CUDA auto-skip and a per-device param."""

from __future__ import annotations

import zlib

import mha_ext
import numpy as np
import pytest

# One test body per device: "cpu" always, "cuda" only where a GPU is visible.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--runslow")
    have_cuda = mha_ext.cuda_available()
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    skip_cuda = pytest.mark.skip(reason="needs CUDA: mha_ext.cuda_available() is False")
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "cuda" in item.keywords and not have_cuda:
            item.add_marker(skip_cuda)


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A NumPy generator seeded from the test's node id: fresh per test, reproducible."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


# The CPU instruction-set paths this build and CPU run, best first (amx, avx512, avx2, generic).
SIMD_PATHS = list(mha_ext.build_info()["simd_supported"])


@pytest.fixture(params=SIMD_PATHS)
def simd(request) -> str:
    """Runs the test body once per CPU instruction-set path, restoring the path afterwards."""
    before = mha_ext._core._set_simd(request.param)
    yield request.param
    mha_ext._core._set_simd(before)


def pytest_report_header(config):
    info = mha_ext.build_info()
    return f"mha_ext CPU paths: {', '.join(SIMD_PATHS)} (default {info['simd']})"


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Runs the test body once per device ("cuda" is marked and skipped without a GPU)."""
    return request.param
