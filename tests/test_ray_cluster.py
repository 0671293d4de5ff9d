"""The nightly job as a user runs it, on a real Ray cluster (README "Nightly merges
on a Ray cluster"): `ray start --head` with token authentication, `ray job submit
--working-dir . -- python merge.py CONFIG`, `ray job status`, `ray job logs`.

- a submitted merge succeeds and publishes the bytes of a local run;
- a failing merge is a failed job (`ray job submit` exits 1, `ray job status`
  says failed) whose logs hold tadmerge's one-line error;
- the nightly rerun with `--if-changed` is a succeeded job that says "up to date".

The cluster is this test's own: its own temp dir, ports on 127.0.0.1, HOME (the
token Ray keeps in ~/.ray stays there), started in a new session and stopped by
its process group only (never `ray stop`, which would stop every Ray on the
machine). Every wait has a timeout.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from checkpoints import write_zoo
from outputs import model_files

from tadmerge.cli import main
from tadmerge.errors import EXIT_OK

pytestmark = [pytest.mark.ray, pytest.mark.slow]
pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[1]


def ray_cli() -> list[str]:
    exe = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    return [exe] if exe else [sys.executable, "-m", "ray.scripts.scripts"]


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Cluster:
    """A one-node Ray cluster started with `ray start --head` (see the module doc)."""

    def __init__(self, root: Path, num_cpus: int = 2, extra_env: dict | None = None):
        self.root = root
        self.num_cpus = num_cpus
        self.pgid: int | None = None
        home = root / "head-home"
        home.mkdir()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update(HOME=str(home), RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0")
        self.env.update(extra_env or {})
        self.env["PYTHONPATH"] = ""  # the job imports the tadmerge of its working dir

    def run(self, *args: str, env: dict | None = None, timeout: float = 60):
        return subprocess.run(
            [*ray_cli(), *args],
            env=env or self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def start(self) -> None:
        # the token: what `ray get-auth-token --generate` prints on the head node
        got = self.run("get-auth-token", "--generate")
        assert got.returncode == 0, got.stderr
        self.token = got.stdout.strip().splitlines()[-1]
        gcs, dash, *rest = free_ports(10)
        self.gcs = f"127.0.0.1:{gcs}"
        self.dashboard = f"http://127.0.0.1:{dash}"
        cmd = [
            *ray_cli(), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
            f"--dashboard-agent-listen-port={rest[0]}", f"--dashboard-agent-grpc-port={rest[1]}",
            f"--runtime-env-agent-port={rest[2]}", f"--metrics-export-port={rest[3]}",
            f"--object-manager-port={rest[4]}", f"--node-manager-port={rest[5]}",
            f"--ray-client-server-port={rest[6]}", f"--temp-dir={self.root / 'ray'}",
            f"--num-cpus={self.num_cpus}", "--disable-usage-stats",
        ]  # fmt: skip
        # a new session: every process of this cluster is in the process group of
        # `ray start` (pgid = its pid), which the cleanup ends
        p = subprocess.Popen(
            cmd,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        self.pgid = p.pid
        try:
            out, _ = p.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail("ray start --head did not return within 90 s")
        if p.returncode != 0:
            pytest.fail(f"ray start --head failed:\n{out[-3000:]}")

    def client_env(self) -> dict:
        """Another machine's shell: no token file, the token and mode exported."""
        home = self.root / "client-home"
        home.mkdir(exist_ok=True)
        env = dict(self.env, HOME=str(home))
        env.update(RAY_AUTH_TOKEN=self.token, RAY_API_SERVER_ADDRESS=self.dashboard)
        return env

    def stop(self) -> None:
        if self.pgid is None:
            return
        for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.pgid, sig)
            except ProcessLookupError:
                return
            end = time.monotonic() + wait
            while time.monotonic() < end:
                try:
                    os.killpg(self.pgid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster():
    # a short path: Ray's unix sockets live under the temp dir (108-byte limit)
    root = Path(tempfile.mkdtemp(prefix="tmray", dir="/tmp"))
    c = Cluster(root)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


def job_dir(root: Path) -> Path:
    """`--working-dir`: a copy of the repository's tadmerge package and merge.py."""
    d = root / "job"
    shutil.copytree(
        REPO / "tadmerge", d / "tadmerge", ignore=shutil.ignore_patterns("__pycache__", "*.so")
    )
    shutil.copy(REPO / "merge.py", d / "merge.py")
    return d


def test_ray_job_submit_merges_fails_visibly_and_skips_when_unchanged(cluster):
    root = cluster.root
    base, models, *_ = write_zoo(str(root / "in"))
    jd = job_dir(root)

    def config(out: Path, executor: str) -> dict:
        return {
            "base": base,
            "models": [{"path": p, "name": f"t{i}"} for i, p in enumerate(models)],
            "sparsify": {"method": "tadrop"},
            "merge": {"method": "ties", "scale": 0.8},
            "exclude": ["^head\\."],
            "output": {"path": str(out)},
            "runtime": {
                "executor": executor,
                "workers": 2,
                "block_elements": 64,
                "max_unit_elements": 256,
                "memory_budget": "256MB",
                "progress": "log",
            },
        }

    (jd / "nightly.yaml").write_text(yaml.safe_dump(config(root / "out", "ray")))
    local = root / "local.yaml"
    local.write_text(yaml.safe_dump(config(root / "ref", "local")))
    assert main(["-q", "merge", str(local)]) == EXIT_OK

    env = cluster.client_env()

    def submit(job: str, *args: str):
        return cluster.run(
            "job", "submit", "--submission-id", job, "--working-dir", str(jd), "--",
            "python", "merge.py", "nightly.yaml", *args, env=env, timeout=150,
        )  # fmt: skip

    got = submit("nightly-1")
    assert got.returncode == 0, got.stdout[-3000:] + got.stderr[-3000:]
    assert model_files(root / "out") == model_files(root / "ref")  # the bytes of a local run
    assert main(["-q", "verify", str(root / "out")]) == EXIT_OK
    status = cluster.run("job", "status", "nightly-1", env=env)
    assert "succeeded" in status.stdout + status.stderr
    # (submit tails the job's logs until it ends, as `ray job logs --follow` does)
    assert "merged 3 model(s) with ties + tadrop" in got.stdout
    assert "peak RSS: driver" in got.stdout and "workers max" in got.stdout

    # the same again without --if-changed: the output exists, the merge fails (exit 2),
    # and so does the job, its one-line error in the logs
    got = submit("nightly-2")
    assert got.returncode == 1, got.stdout[-3000:]
    status = cluster.run("job", "status", "nightly-2", env=env)
    assert "failed" in status.stdout + status.stderr
    assert "exit code 2" in status.stdout + status.stderr
    logs = cluster.run("job", "logs", "nightly-2", env=env).stdout
    errors = [line for line in logs.splitlines() if line.startswith("tadmerge: error:")]
    assert len(errors) == 1 and "already exists" in errors[0], logs

    # the nightly rerun: nothing changed, so nothing is merged
    got = submit("nightly-3", "--if-changed")
    assert got.returncode == 0, got.stdout[-3000:]
    assert f"{root / 'out'}: up to date" in got.stdout
    assert model_files(root / "out") == model_files(root / "ref")

    # a client without the token is refused by the cluster
    bare = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    denied = cluster.run("job", "status", "nightly-1", env=bare)
    assert denied.returncode != 0
