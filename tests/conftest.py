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


@pytest.fixture
def c_kernels():
    """The C kernels (engine/native.py), loaded in this process (taken by the
    backends auto and c); skipped where the machine cannot build or load them."""
    from tadmerge.engine import native

    if not native.available():
        pytest.skip(f"C kernels {native.describe()}")
    return native.kernels()


@pytest.fixture
def without_c(monkeypatch, tmp_path):
    """This process as on a machine where the C library cannot be built (a
    compiler that fails, an empty cache): native.describe() says why, and the
    merges run the torch reference."""
    from tadmerge.engine import native

    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("CC", "false")
    monkeypatch.setenv("TADMERGE_CACHE_DIR", str(tmp_path / "no-cache"))
    assert not native.available()
    yield native.describe()
    monkeypatch.undo()  # (the real library again, for the tests after this one)
    native._state.clear()
