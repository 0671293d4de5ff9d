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
    """A merge applies its runtime.kernels to the process (kernels.configure);
    each test starts from the environment's choice, whatever ran before it."""
    from tadmerge.engine import kernels

    yield
    kernels.configure("auto")
