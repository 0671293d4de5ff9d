"""A driver killed mid-merge (kill -9, no cleanup) publishes nothing and resumes.

`python merge.py CONFIG` runs in a subprocess under tests/killpoints.py, which
SIGKILLs the driver right after its third finished unit is logged. The
staging directory is left behind, a plain rerun is refused (exit 2, "--resume"),
a resume with a changed config is refused (exit 2, "changed"), and `--resume`
finishes the merge reusing the logged units, with the same bytes as a merge that
was never interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import killpoints
import pytest
import yaml
from checkpoints import SPLIT_RUNTIME, write_zoo
from outputs import model_files, run_cli

from tadmerge.cli import main
from tadmerge.errors import EXIT_CONFIG, EXIT_OK

REPO = Path(__file__).resolve().parent.parent
RUNTIME = SPLIT_RUNTIME


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("killzoo")
    base, models, *_ = write_zoo(str(root / "in"))
    return root, base, models


def write_cfg(path: Path, zoo, out: Path, **merge) -> str:
    _, base, models = zoo
    cfg = {
        "base": base,
        "models": [{"path": p, "name": f"t{i}"} for i, p in enumerate(models)],
        # DARE + TIES: random streams, and a statistics stage (TIES signs of split tensors)
        "sparsify": {"method": "random", "p": 0.5},
        "merge": {"method": "ties", "scale": 0.8, **merge},
        "exclude": ["^head\\."],
        "output": {"path": str(out)},
        "runtime": dict(RUNTIME),
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


def merge_py(*args: str, exit_after: int | None = None) -> subprocess.CompletedProcess:
    """`python merge.py ARGS`; with `exit_after`, SIGKILLed once that many units are logged."""
    cmd = [sys.executable, str(REPO / "merge.py"), *args]
    if exit_after is not None:
        cmd = [sys.executable, str(REPO / "tests" / "killpoints.py"), f"--at=units:{exit_after}",
               "--", *cmd[1:]]  # fmt: skip
    return subprocess.run(
        cmd,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,  # a hang fails the test instead of blocking the suite
    )


def units_logged(staging: Path) -> int:
    log = staging / ".tadmerge" / "units.jsonl"
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_killed_driver_resumes_to_the_same_bytes(zoo, tmp_path, capsys):
    ref_out = tmp_path / "ref"
    rc, lines = run_cli(capsys, "merge", write_cfg(tmp_path / "ref.yaml", zoo, ref_out))
    assert rc == EXIT_OK, lines
    ref_report = json.loads((ref_out / "merge_report.json").read_text())
    total = ref_report["units"]["total"]
    assert total >= 10, "the config must give many units"

    out = tmp_path / "out"
    staging = tmp_path / ".out.tadmerge-staging"
    cfg = write_cfg(tmp_path / "merge.yaml", zoo, out)

    # 1. killed after 3 units: nothing published, staging and its resume log kept
    p = merge_py(cfg, exit_after=3)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert "merged" not in p.stdout
    assert not out.exists()
    # (and the output lock of the killed run, which a run ending by itself removes)
    assert sorted(x.name for x in tmp_path.iterdir() if x.name.startswith((".out", "out"))) == [
        ".out.tadmerge-lock",
        staging.name,
    ]
    assert not (staging / "manifest.json").exists()
    assert (staging / ".tadmerge" / "fingerprint").is_file()
    assert (staging / ".tadmerge" / "stats.json").is_file()
    first = units_logged(staging)
    assert 3 <= first < total  # (the log writes records in batches)

    # 2. a plain rerun is refused and touches nothing
    before = sorted((q.name, q.stat().st_size) for q in (staging / ".tadmerge").iterdir())
    rc, lines = run_cli(capsys, "merge", cfg)
    assert rc == EXIT_CONFIG
    assert len(lines) == 1 and lines[0].startswith("tadmerge: error: "), lines
    assert str(staging) in lines[0] and "--resume" in lines[0]
    assert not out.exists()
    assert sorted((q.name, q.stat().st_size) for q in (staging / ".tadmerge").iterdir()) == before

    # 3. resuming with another config is refused: the finished units belong to the old one
    changed = write_cfg(tmp_path / "changed.yaml", zoo, out, scale=0.5)
    rc, lines = run_cli(capsys, "merge", changed, "--resume")
    assert rc == EXIT_CONFIG
    assert len(lines) == 1 and lines[0].startswith("tadmerge: error: --resume: "), lines
    assert "changed since the interrupted merge" in lines[0]
    assert not out.exists() and units_logged(staging) == first

    # (and so is resuming after an input was republished: tests/test_input_changes.py;
    # not here, where the inputs are shared: no change of a file can be undone, since
    # even one that restores its bytes and mtime moves its ctime)

    # 4. killed again while resuming: the log keeps growing, still nothing published
    p = merge_py(cfg, "--resume", exit_after=first + 3)
    assert p.returncode == -signal.SIGKILL, p.stderr
    logged = units_logged(staging)
    assert not out.exists() and first + 3 <= logged <= total

    # 5. --resume finishes, reusing the logged units, with the uninterrupted bytes
    p = merge_py(cfg, "--resume")
    assert p.returncode == 0, p.stderr
    assert f"{logged} of {total} units reused" in p.stdout
    assert not staging.exists()
    report = json.loads((out / "merge_report.json").read_text())
    assert report["units"] == {"total": total, "reused": logged}
    assert report["plan_fingerprint"] == ref_report["plan_fingerprint"]
    assert model_files(out) == model_files(ref_out)
    capsys.readouterr()
    assert main(["verify", str(out)]) == EXIT_OK
    assert capsys.readouterr().out.startswith(f"OK {out}")


def test_resume_without_staging_is_refused(zoo, tmp_path, capsys):
    cfg = write_cfg(tmp_path / "merge.yaml", zoo, tmp_path / "out")
    rc, lines = run_cli(capsys, "merge", cfg, "--resume")
    assert rc == EXIT_CONFIG
    assert len(lines) == 1 and "no staging directory" in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge.yaml"]


def test_ctrl_c_keeps_staging_for_resume(zoo, tmp_path, capsys, monkeypatch):
    """A real SIGINT after the third unit: exit 130, one line, staging kept; --resume
    finishes it with the bytes of an uninterrupted merge."""
    out = tmp_path / "out"
    cfg = write_cfg(tmp_path / "merge.yaml", zoo, out)
    killpoints.install(
        "progress:3", lambda: os.kill(os.getpid(), signal.SIGINT), monkeypatch.setattr
    )
    # a job started in the background (nohup, CI runners) inherits SIGINT ignored;
    # a user's Ctrl-C reaches Python's default handler, so test with that one
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        rc, lines = run_cli(capsys, "merge", cfg)
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.undo()
    assert rc == 130
    assert lines == ["tadmerge: interrupted; the staging directory is kept: rerun with --resume"]
    staging = tmp_path / ".out.tadmerge-staging"
    assert not out.exists() and staging.is_dir()
    assert not (staging / "manifest.json").exists()
    assert units_logged(staging) == 3

    rc, lines = run_cli(capsys, "merge", cfg, "--resume")
    assert rc == EXIT_OK, lines
    assert out.is_dir() and not staging.exists()
    report = json.loads((out / "merge_report.json").read_text())
    assert report["units"]["reused"] == 3
    ref = tmp_path / "ref"
    assert main(["-q", "merge", write_cfg(tmp_path / "ref.yaml", zoo, ref)]) == EXIT_OK
    assert model_files(out) == model_files(ref)
    assert main(["-q", "verify", str(out)]) == EXIT_OK
