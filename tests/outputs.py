"""What tests compare merge outputs and CLI runs by (one copy for every test file)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from tadmerge.cli import main
from tadmerge.io import block_io

# Files of an output that record paths, times or the config as written (the model
# card names the output path and the executor): left out of byte comparisons.
UNCOMPARED = frozenset({"merge_report.json", "manifest.json", "merge_config.yaml", "README.md"})
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ tadmerge (DEBUG|INFO|WARNING) ")


def model_files(d: str | Path) -> dict[str, bytes]:
    """Every file of an output (masks and task shards too) but the UNCOMPARED ones,
    by path relative to it."""
    out = {}
    for dirpath, _, files in os.walk(d):
        for f in files:
            if f not in UNCOMPARED:
                p = os.path.join(dirpath, f)
                out[os.path.relpath(p, d)] = Path(p).read_bytes()
    return out


def error_lines(err: str) -> list[str]:
    """stderr without the log's INFO/DEBUG/WARNING lines: what a user reads as errors."""
    return [ln for ln in err.splitlines() if ln.strip() and not LOG_LINE.match(ln)]


def run_cli(capsys, *argv: str) -> tuple[int, list[str]]:
    """`tadmerge ARGV` in this process, as a fresh process would start it (no cached
    descriptor): its exit code and its error lines."""
    capsys.readouterr()
    block_io.close_all()
    rc = main(list(argv))
    return rc, error_lines(capsys.readouterr().err)
