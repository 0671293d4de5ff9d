"""Losing a node mid-merge on a real two-node Ray cluster (README "Lost nodes").

A head started as in test_ray_cluster.py, and a second node joined to it with
`ray start --address` (its own HOME, temp dir, ports and process group; the token
through RAY_AUTH_MODE=token and RAY_AUTH_TOKEN). A merge submitted with `ray job
submit --working-dir` (its driver runs on the head) starts one actor on each node;
once the second node's actor is up, that node's raylet is SIGKILLed:

- spare CPU on the head (a blocker job holding it is stopped after the kill): the
  dead actor is replaced on the head and the merge publishes the bytes of a local run;
- no spare CPU (the blocker stays): the replacement is given up after
  `worker_start_timeout` (or never asked for more once the survivor has done the
  rest) and the merge finishes on the head's actor with the same bytes, or exits 4
  with the staging kept and `--resume` finishes it; within a fixed bound either way;
- no worker left (both actors on the second node, the head full): exit 4 within the
  bound, the staging kept, and `--resume` submitted once the head has room finishes
  with the same bytes.

A blocker is a job with `--entrypoint-num-cpus 1` submitted while the head is the
only live node, so it holds one of the head's two CPUs: with `workers: 2` and
`cpus_per_worker: 1` one actor can only land on the second node (1 CPU). Only
processes this test started are signalled: the raylet found by its parent being in
the second node's process group and its socket under that node's temp dir.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml
from checkpoints import write_checkpoint
from outputs import model_files
from test_ray_cluster import Cluster, free_ports, job_dir, ray_cli

from tadmerge.cli import main
from tadmerge.errors import EXIT_OK, EXIT_RUNTIME

pytestmark = [pytest.mark.ray, pytest.mark.slow]
pytest.importorskip("ray")

# the cluster notices a dead node within a few seconds instead of Ray's default ~30 s
FAST_HEALTH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
BOUND = 120.0  # seconds from the kill to the job's end, whatever its outcome


def procs() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, pgid, cmdline) of every process we can read."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            ppid, pgid = (int(x) for x in stat.rsplit(")", 1)[1].split()[1:3])
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        out[int(d)] = (ppid, pgid, cmd.strip())
    return out


class Node:
    """A second node joined with `ray start --address`, in its own process group."""

    def __init__(self, cluster: Cluster, name: str, num_cpus: int):
        self.temp = cluster.root / name
        home = cluster.root / f"{name}-home"
        home.mkdir()
        env = dict(cluster.env, HOME=str(home), RAY_AUTH_TOKEN=cluster.token)
        ports = free_ports(6)
        cmd = [
            *ray_cli(), "start", f"--address={cluster.gcs}", "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}", f"--resources={{\"{name}\": 1}}",
            f"--temp-dir={self.temp}", f"--object-manager-port={ports[0]}",
            f"--node-manager-port={ports[1]}", f"--metrics-export-port={ports[2]}",
            f"--dashboard-agent-listen-port={ports[3]}",
            f"--dashboard-agent-grpc-port={ports[4]}", f"--runtime-env-agent-port={ports[5]}",
            "--disable-usage-stats",
        ]  # fmt: skip
        p = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, text=True, start_new_session=True,
        )  # fmt: skip
        self.pgid = p.pid
        try:
            out, _ = p.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"ray start --address (node {name}) did not return within 90 s")
        if p.returncode != 0:
            pytest.fail(f"ray start --address failed:\n{out[-3000:]}")

    def raylet(self) -> int:
        found = [
            pid
            for pid, (_, pgid, cmd) in procs().items()
            if pgid == self.pgid and "/raylet/raylet " in cmd and str(self.temp) in cmd
        ]
        assert len(found) == 1, found
        return found[0]

    def actors(self, raylet: int) -> list[str]:
        """The merge actors this node's raylet runs (their process titles)."""
        return [c for ppid, _, c in procs().values() if ppid == raylet and "_UnitWorker" in c]

    def stop(self) -> None:
        Cluster.stop(self)  # its process group, as the head's


@pytest.fixture(scope="module")
def cluster():
    root = Path(tempfile.mkdtemp(prefix="tmrayn", dir="/tmp"))
    c = Cluster(root, num_cpus=2, extra_env=FAST_HEALTH)
    nodes: list[Node] = []
    try:
        c.start()
        c.nodes = nodes
        c.client = c.client_env()
        yield c
    finally:
        for n in nodes:
            n.stop()
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


def write_inputs(root: Path) -> tuple[str, list[str]]:
    """Base and two fine-tunes, 4 x 16384 f32 each: 256 units of 256 elements."""
    g = torch.Generator().manual_seed(23)
    base = {f"layers.{i}.weight": torch.randn(64, 256, generator=g) for i in range(4)}
    paths = []
    for k in range(2):
        m = {n: v + 0.05 * torch.randn(v.shape, generator=g) for n, v in base.items()}
        paths.append(write_checkpoint(str(root / f"m{k}"), m))
    return write_checkpoint(str(root / "base"), base), paths


def config(base: str, models: list[str], out: Path, executor: str, start_timeout: float):
    return {
        "base": base,
        "models": [{"path": p, "name": f"t{i}"} for i, p in enumerate(models)],
        "sparsify": {"method": "tadrop"},
        "merge": {"method": "ties", "scale": 0.8},
        "output": {"path": str(out)},
        "runtime": {
            "executor": executor,
            "workers": 2,
            "cpus_per_worker": 1,
            "block_elements": 64,
            "max_unit_elements": 256,
            "memory_budget": "256MB",
            "worker_start_timeout": start_timeout,
            "progress": "log",
        },
    }


def blocker(cluster: Cluster, job: str, cpus: int = 1) -> None:
    """A job holding `cpus` CPUs of the head (the only live node when it starts)."""
    got = cluster.run(
        "job", "submit", "--submission-id", job, "--no-wait", "--entrypoint-num-cpus", str(cpus),
        "--", "python", "-c", "import time; time.sleep(600)", env=cluster.client,
    )  # fmt: skip
    assert got.returncode == 0, got.stdout[-2000:] + got.stderr[-2000:]
    end = time.monotonic() + 60
    while "RUNNING" not in cluster.run("job", "status", job, env=cluster.client).stdout:
        assert time.monotonic() < end, f"blocker job {job} not running within 60 s"
        time.sleep(0.5)


def stop_job(cluster: Cluster, job: str) -> None:
    got = cluster.run("job", "stop", job, env=cluster.client)  # (waits until it stopped)
    assert got.returncode == 0, got.stdout[-2000:] + got.stderr[-2000:]


@contextlib.contextmanager
def blocking(cluster: Cluster, job: str, cpus: int = 1):
    blocker(cluster, job, cpus)
    try:
        yield
    finally:  # the next test finds the head free, whatever happened
        if "RUNNING" in cluster.run("job", "status", job, env=cluster.client).stdout:
            stop_job(cluster, job)


def merge_and_kill(cluster: Cluster, node: Node, jd: Path, cfg: str, job: str, after_kill=None):
    """Submit the merge, SIGKILL `node`'s raylet once its actor is up, wait for the job.

    Returns (exit status of `ray job submit`, its output, seconds from kill to end)."""
    raylet = node.raylet()
    log = cluster.root / f"{job}.log"
    with open(log, "w") as fh:
        p = subprocess.Popen(
            [*ray_cli(), "job", "submit", "--submission-id", job, "--working-dir", str(jd),
             "--", "python", "merge.py", cfg],
            env=cluster.client, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    try:
        end = time.monotonic() + 120
        while not [t for t in node.actors(raylet) if "__init__" not in t]:
            assert p.poll() is None, f"merge ended before an actor ran on {node.temp.name}"
            assert time.monotonic() < end, "no merge actor on the second node within 120 s"
            time.sleep(0.1)
        time.sleep(0.5)  # a few units in
        assert p.poll() is None, "the merge ended before the kill"
        os.kill(raylet, signal.SIGKILL)
        killed = time.monotonic()
        if after_kill:
            after_kill()
        try:
            rc = p.wait(timeout=BOUND)
        except subprocess.TimeoutExpired:
            pytest.fail(f"merge still running {BOUND:g} s after the node was lost")
        return rc, log.read_text(), time.monotonic() - killed
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)


@pytest.fixture(scope="module")
def inputs(cluster):
    return write_inputs(cluster.root / "in")


def local_run(root: Path, base: str, models: list[str], start_timeout: float) -> dict:
    """What a local run of the same config publishes."""
    out, cfg = root / f"ref-{start_timeout:g}", root / f"local-{start_timeout:g}.yaml"
    if out.exists():  # (made by an earlier test)
        return published(out)
    cfg.write_text(yaml.safe_dump(config(base, models, out, "local", start_timeout)))
    assert main(["-q", "merge", str(cfg)]) == EXIT_OK
    return published(out)


def published(out: Path) -> dict[str, bytes]:
    """Every published file but the model card (README.md, which names the output
    path and the executor: model_files() leaves it out): weights, index, config.json."""
    assert (out / "README.md").is_file()
    return model_files(out)


def test_node_lost_with_room_for_a_replacement(cluster, inputs):
    root = cluster.root
    base, models = inputs
    ref = local_run(root, base, models, 60)
    jd = job_dir(root / "a")
    (jd / "a.yaml").write_text(yaml.safe_dump(config(base, models, root / "out-a", "ray", 60)))
    with blocking(cluster, "block-a"):
        node = Node(cluster, "n2a", 1)
        cluster.nodes.append(node)
        # the head gets room as soon as the node is lost
        rc, out, took = merge_and_kill(
            cluster, node, jd, "a.yaml", "lose-a", lambda: stop_job(cluster, "block-a")
        )
    assert rc == 0, out[-4000:]
    assert "worker died on unit" in out and "replacing it" in out, out[-4000:]
    assert published(root / "out-a") == ref  # the bytes of a local run
    assert main(["-q", "verify", str(root / "out-a")]) == EXIT_OK


def test_node_lost_without_room_finishes_or_exits_4(cluster, inputs):
    root = cluster.root
    base, models = inputs
    ref = local_run(root, base, models, 10)
    out_b = root / "out-b"
    jd = job_dir(root / "b")
    (jd / "b.yaml").write_text(yaml.safe_dump(config(base, models, out_b, "ray", 10)))
    with blocking(cluster, "block-b"):  # the head has room for its one actor only
        node = Node(cluster, "n2b", 1)
        cluster.nodes.append(node)
        rc, out, took = merge_and_kill(cluster, node, jd, "b.yaml", "lose-b")
    assert took < BOUND
    assert "worker died on unit" in out, out[-4000:]
    if rc != 0:  # no worker left: exit 4, the staging kept for --resume
        status = cluster.run("job", "status", "lose-b", env=cluster.client)
        assert f"exit code {EXIT_RUNTIME}" in status.stdout + status.stderr, out[-4000:]
        assert (root / ".out-b.tadmerge-staging").is_dir()
        assert not out_b.exists()
        assert (
            main(["-q", "merge", str(jd / "b.yaml"), "--resume", "--executor", "local"]) == EXIT_OK
        )
    assert published(out_b) == ref
    assert main(["-q", "verify", str(out_b)]) == EXIT_OK


def test_all_workers_lost_exits_4_and_resumes(cluster, inputs):
    """Both actors on the second node (the head full): its loss leaves none, so the
    merge exits 4 after worker_start_timeout, the staging kept; once the head has
    room, `--resume` finishes it with the bytes of a local run. (A --resume while
    there is still no room exits 4 too: test_ray.py, no_room_for_any_worker.)"""
    root = cluster.root
    base, models = inputs
    ref = local_run(root, base, models, 10)
    out_c = root / "out-c"
    jd = job_dir(root / "c")
    (jd / "c.yaml").write_text(yaml.safe_dump(config(base, models, out_c, "ray", 10)))
    with blocking(cluster, "block-c", cpus=2):  # the head: no room for any actor
        node = Node(cluster, "n2c", 2)
        cluster.nodes.append(node)

        rc, out, took = merge_and_kill(cluster, node, jd, "c.yaml", "lose-c")
        assert rc == 1, out[-4000:]  # a failed job
        assert "worker died on unit" in out, out[-4000:]
        errors = [x for x in out.splitlines() if x.startswith("tadmerge: error:")]
        assert len(errors) == 1 and "Ray workers were lost" in errors[0], out[-4000:]
        status = cluster.run("job", "status", "lose-c", env=cluster.client)
        assert f"exit code {EXIT_RUNTIME}" in status.stdout + status.stderr
        assert (root / ".out-c.tadmerge-staging").is_dir() and not out_c.exists()

    # the head has room again: the next submission with --resume appended finishes
    # (what it reuses depends on the stage the kill hit: statistics or units)
    got = cluster.run(
        "job", "submit", "--submission-id", "resume-c", "--working-dir", str(jd), "--",
        "python", "merge.py", "c.yaml", "--resume", env=cluster.client, timeout=BOUND,
    )  # fmt: skip
    assert got.returncode == 0, got.stdout[-4000:] + got.stderr[-2000:]
    assert published(out_c) == ref
    assert main(["-q", "verify", str(out_c)]) == EXIT_OK
