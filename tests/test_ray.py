"""The Ray executor: same bytes as local, survives a dead worker, resumes.

One local Ray session (2 CPUs) is shared by all tests (conftest.ray_session).
"""

from __future__ import annotations

import os
import time
from dataclasses import replace

import killpoints
import pytest
from checkpoints import write_zoo
from outputs import model_files

from tadmerge.cluster import ray_executor
from tadmerge.config import parse_config
from tadmerge.errors import MergeRuntimeError
from tadmerge.run.driver import run_merge

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
    # a combiner's whole-tensor statistics: the variance cut's and sums' rounds on actors
    "sce-select": ({"method": "none"}, {"method": "sce", "select_topk": 0.4}),
    # a tensor-sums combiner: a round of exact sums for the split tensors, answered
    # by the actors (engine/sums.py), the whole ones resolved in their block
    "model_stock": ({"method": "none"}, {"method": "model_stock"}),
    # values per tensor ({filter, value} entries, a gradient): each unit and each
    # statistics round resolves its tensor's values (MergeSpec.for_tensor)
    "ties-per-tensor": (
        {"method": "magnitude", "density": [{"filter": "attn", "value": 0.3}, {"value": 0.6}]},
        {"method": "ties", "scale": [{"filter": "norm", "value": 0.5}, {"value": [1.0, 0.7]}]},
    ),
    "sce-per-tensor": (
        {"method": "none"},
        {"method": "sce", "select_topk": [{"filter": "emb", "value": 0.3}, {"value": 0.6}]},
    ),
    # a signed score's quantile rounds on actors (one model)
    "arcee-fusion": ({"method": "none"}, {"method": "arcee_fusion"}, 1),
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("rayzoo")
    base, models, *_ = write_zoo(str(root))
    return root, base, models


def cfg(zoo, out: str, sp: dict, merge: dict, executor: str, workers: int, k: int | None = None):
    root, base, models = zoo
    return parse_config(
        {
            "base": base,
            "models": [{"path": p, "name": f"t{i}"} for i, p in enumerate(models[:k])],
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


@pytest.mark.parametrize("case", sorted(CASES))
def test_ray_matches_local_bytes(ray_session, zoo, case):
    sp, merge, *k = CASES[case]
    local = run_merge(cfg(zoo, f"{case}-local", sp, merge, "local", 1, *k))
    assert any(t.split for t in local.plan.tensors)
    for workers in (1, 2):
        r = run_merge(cfg(zoo, f"{case}-ray{workers}", sp, merge, "ray", workers, *k))
        assert model_files(r.output) == model_files(local.output), (
            f"ray x{workers} differs from local"
        )
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
    assert model_files(r.output) == model_files(ref.output)


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
    assert model_files(r.output) == model_files(ref.output)


def _squatted_replacements(monkeypatch, squatters: list) -> None:
    """Replacement actors find no CPU, as when the node that ran the dead one is
    gone with its CPUs: before each replacement a squatter takes the CPU the
    dead actor freed (test-only, by wrapping the executor's actor factory)."""
    import ray

    class Squatter:
        def ping(self) -> int:
            return os.getpid()

    real = ray_executor.RayExecutor._new_actor

    def new_actor(self):
        if getattr(self, "actors", None):  # a replacement: every CPU but the survivors' taken
            survivors = sum(a is not None for a in self.actors) - 1  # (less the dead one)
            free = int(ray.cluster_resources()["CPU"]) - survivors
            squatter = ray.remote(num_cpus=free)(Squatter).remote()
            ray.get(squatter.ping.remote(), timeout=60)  # (once the dead one's CPU is back)
            squatters.append(squatter)
        return real(self)

    monkeypatch.setattr(ray_executor.RayExecutor, "_new_actor", new_actor)


def test_unschedulable_replacement_hands_its_units_to_survivors(
    ray_session, zoo, monkeypatch, tmp_path
):
    import ray

    sp, merge = CASES["ta-tadrop"]
    ref = run_merge(cfg(zoo, "lost-ref", sp, merge, "local", 1))
    marker = tmp_path / "died"
    monkeypatch.setattr(
        ray_executor, "_UnitWorker", dying_worker(len(ref.plan.units) // 2, str(marker))
    )
    squatters: list = []
    _squatted_replacements(monkeypatch, squatters)
    c = cfg(zoo, "lost", sp, merge, "ray", 2)
    c = replace(c, runtime=replace(c.runtime, worker_start_timeout=3.0))
    try:
        r = run_merge(c)
    finally:
        for s in squatters:
            ray.kill(s)
    assert marker.exists() and squatters, "no worker died"
    assert r.report["executor"]["workers_lost"] == 1
    assert model_files(r.output) == model_files(ref.output)


def test_all_workers_lost_fails_in_bounded_time_with_the_staging_kept(
    ray_session, zoo, monkeypatch, tmp_path
):
    import ray

    sp, merge = CASES["ta-tadrop"]
    marker = tmp_path / "died"
    monkeypatch.setattr(ray_executor, "_UnitWorker", dying_worker(3, str(marker)))
    squatters: list = []
    _squatted_replacements(monkeypatch, squatters)
    c = cfg(zoo, "all-lost", sp, merge, "ray", 1)
    c = replace(c, runtime=replace(c.runtime, worker_start_timeout=2.0))
    t0 = time.monotonic()
    try:
        with pytest.raises(MergeRuntimeError, match="Ray workers were lost") as err:
            run_merge(c)
    finally:
        for s in squatters:
            ray.kill(s)
    assert time.monotonic() - t0 < 60
    assert err.value.exit_code == 4 and "--resume" in str(err.value)
    assert not os.path.exists(c.output.path)
    staging = os.path.join(os.path.dirname(c.output.path), ".all-lost.tadmerge-staging")
    assert os.path.isdir(staging)
    r = run_merge(c, resume=True)  # the cluster has room again
    assert r.report["units"]["reused"] >= 1


def test_no_room_for_any_worker_fails_in_bounded_time(ray_session, zoo):
    """A merge (or a --resume after a lost node) on a cluster with no room for even
    its first workers: exit 4 after worker_start_timeout, not a wait forever; with
    room again, --resume finishes with the bytes of a local run."""
    import ray

    class Squatter:
        def ping(self) -> int:
            return os.getpid()

    sp, merge = CASES["ta-tadrop"]
    ref = run_merge(cfg(zoo, "no-room-ref", sp, merge, "local", 1))
    # every CPU of the session (scheduled once earlier tests' actors have let go)
    squatter = ray.remote(num_cpus=ray.cluster_resources()["CPU"])(Squatter).remote()
    c = cfg(zoo, "no-room", sp, merge, "ray", 2)
    c = replace(c, runtime=replace(c.runtime, worker_start_timeout=2.0))
    try:
        ray.get(squatter.ping.remote(), timeout=60)
        t0 = time.monotonic()
        with pytest.raises(MergeRuntimeError, match="Ray workers were lost") as err:
            run_merge(c)
        assert time.monotonic() - t0 < 30
    finally:
        ray.kill(squatter)
    assert err.value.exit_code == 4 and not os.path.exists(c.output.path)
    c = replace(c, runtime=replace(c.runtime, worker_start_timeout=60.0))
    r = run_merge(c, resume=True)
    assert model_files(r.output) == model_files(ref.output)
