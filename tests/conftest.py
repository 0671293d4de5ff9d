"""Shared fixtures: tiny checkpoints built by the tests, and one Ray session."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray session for the whole test run (2 CPUs, no dashboard)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def _kernels_backend_restored():
    """A merge applies its dispatch's kernels backend to the process
    (cluster/dispatch.apply); each test starts from auto, whatever ran before it."""
    from tadmerge.engine import kernels

    yield
    kernels.set_backend("auto")


@pytest.fixture(params=["native", "numba"])
def compiled_kernels(request):
    """The kernels of raw bf16 blocks (kernels.stream_raw, coarse_sparse_raw,
    tie_end_raw, cut_combine_raw) in C (native.py: the backend auto) or in
    numba; skipped where the machine cannot build or load them."""
    from tadmerge.engine import kernels, native

    if request.param == "native":
        if not native.available():
            pytest.skip("no C compiler")
        kernels.set_backend("auto")
    else:
        if not kernels.load():
            pytest.skip("numba kernels not installed")
        kernels.set_backend("numba")
    return request.param
