"""The command line ends with os._exit (cli.exit_now): nothing it prints is lost.

Skipping the interpreter's teardown saves 0.35-0.7 s per command, so the test
checks what that could cost: stdout written to a pipe (block-buffered) arrives
whole, and the exit status is the command's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml
from checkpoints import write_zoo

from tadmerge.errors import EXIT_CONFIG, EXIT_OK

REPO = Path(__file__).resolve().parent.parent


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tadmerge.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_piped_output_arrives_whole_and_the_status_is_the_commands(tmp_path):
    base, models, *_ = write_zoo(str(tmp_path / "in"))
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "base": base,
                "models": [{"path": p} for p in models],
                "merge": {"method": "task_arithmetic"},
                "output": {"path": str(tmp_path / "out")},
            }
        )
    )
    r = _cli("plan", str(cfg), "--json")
    assert r.returncode == EXIT_OK, r.stderr
    doc = json.loads(r.stdout)  # all of it: a lost buffer would not parse
    assert doc["tensors"] and doc["fingerprint"]

    r = _cli("-q", "merge", str(cfg))
    assert r.returncode == EXIT_OK, r.stderr
    assert r.stdout.startswith("merged 3 model(s)")
    assert _cli("verify", str(tmp_path / "out")).returncode == EXIT_OK

    r = _cli("merge", str(tmp_path / "missing.yaml"))
    assert r.returncode == EXIT_CONFIG
    assert "missing.yaml" in r.stderr
