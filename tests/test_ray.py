"""The Ray executor: same bytes as local, survives a dead worker, resumes.

One local Ray session (2 CPUs) is shared by all tests (conftest.ray_session).
"""

from __future__ import annotations

import os

import killpoints
import pytest
from checkpoints import write_zoo

from tadmerge.cluster import ray_executor
from tadmerge.cluster.driver import run_merge
from tadmerge.config import parse_config

pytestmark = pytest.mark.ray

CASES = {
    "ties-tadrop-global": (
        {"method": "tadrop", "scope": "global"},
        {"method": "ties", "scale": 0.8},
    ),
    "emr-tadrop": ({"method": "tadrop"}, {"method": "emr"}),
    # no sparsifier: the units stream from the raw inputs (engine/stream.py)
    "ta-streamed": ({"method": "none"}, {"method": "task_arithmetic", "scale": 0.5}),
    # bf16 units try the raw path (engine/raw.py) and hand back those whose keys
    # are not sparse: the choice is the unit's own, on any executor
    "ta-tadrop": ({"method": "tadrop"}, {"method": "task_arithmetic", "scale": 0.5}),
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("rayzoo")
    base, models, *_ = write_zoo(str(root))
    return root, base, models


def cfg(zoo, out: str, sp: dict, merge: dict, executor: str, workers: int):
    root, base, models = zoo
    return parse_config(
        {
            "base": base,
            "models": [{"path": p, "name": f"t{i}"} for i, p in enumerate(models)],
            "sparsify": sp,
            "merge": merge,
            "exclude": ["^head\\."],
            "output": {"path": str(root / out)},
            "runtime": {
                "executor": executor,
                "workers": workers,
                "block_elements": 64,
                "max_unit_elements": 256,  # several tensors split across workers
                "memory_budget": "256MB",
                "progress": "none",
            },
        }
    )


def files(d: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, fs in os.walk(d):
        for f in fs:
            if f not in ("merge_report.json", "manifest.json", "merge_config.yaml"):
                p = os.path.join(dirpath, f)
                out[os.path.relpath(p, d)] = open(p, "rb").read()
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_ray_matches_local_bytes(ray_session, zoo, case):
    sp, merge = CASES[case]
    local = run_merge(cfg(zoo, f"{case}-local", sp, merge, "local", 1))
    assert any(t.split for t in local.plan.tensors)
    for workers in (1, 2):
        r = run_merge(cfg(zoo, f"{case}-ray{workers}", sp, merge, "ray", workers))
        assert files(r.output) == files(local.output), f"ray x{workers} differs from local"
        assert len(r.report["peak_rss_workers_bytes"]) == workers


def dying_worker(victim: int, marker: str) -> type:
    """The actor class, except that the first actor handed unit `victim` kills its
    own process (no cleanup) before running it. Defined in a function so that Ray
    ships the class to the actors by value: they need not import this file."""

    class DyingWorker(ray_executor._UnitWorker):
        def run(self, unit_id, resolved):
            if unit_id == victim:
                try:  # O_EXCL: exactly one death, whichever actor gets there first
                    os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    pass
                else:
                    os._exit(1)
            return ray_executor._UnitWorker.run(self, unit_id, resolved)

    return DyingWorker


def test_worker_killed_mid_merge_is_replaced(ray_session, zoo, monkeypatch, tmp_path):
    sp, merge = CASES["emr-tadrop"]
    ref = run_merge(cfg(zoo, "kill-ref", sp, merge, "local", 1))
    marker = tmp_path / "died"
    worker = dying_worker(len(ref.plan.units) // 2, str(marker))
    monkeypatch.setattr(ray_executor, "_UnitWorker", worker)  # RayExecutor wraps this class
    r = run_merge(cfg(zoo, "kill", sp, merge, "ray", 2))
    assert marker.exists(), "no worker died"
    assert r.report["executor"]["workers_replaced"] == 1
    assert files(r.output) == files(ref.output)


def test_driver_stopped_then_resume_reuses_units(ray_session, zoo, monkeypatch):
    sp, merge = CASES["ties-tadrop-global"]
    ref = run_merge(cfg(zoo, "resume-ref", sp, merge, "local", 1))
    c = cfg(zoo, "resume", sp, merge, "ray", 2)
    # the driver is interrupted (Ctrl-C) as its sixth finished unit arrives: the
    # five before it are logged as the merge winds down, and reused
    with monkeypatch.context() as m:
        killpoints.install("unit-written:6", killpoints.interrupt, m.setattr)
        with pytest.raises(KeyboardInterrupt):
            run_merge(c)
    assert not os.path.exists(c.output.path)  # nothing published
    r = run_merge(c, resume=True)
    assert r.report["units"]["reused"] == 5
    assert files(r.output) == files(ref.output)
