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


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Runs the test body once per device ("cuda" is marked and skipped without a GPU)."""
    return request.param
