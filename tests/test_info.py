"""`tadmerge info OUT` on every kind of output a user has: EMR (tested with the demo in
test_configs_and_demo.py), an ordinary merge with and without a sparsifier, and a
directory that is no output at all."""

from __future__ import annotations

import re

import yaml
from checkpoints import write_zoo

from tadmerge.cli import main
from tadmerge.errors import EXIT_INPUT


def _merge(tmp_path, sparsify: dict) -> str:
    bp, mps, _, _ = write_zoo(str(tmp_path / "in"), k=2)
    cfg = {
        "base": bp,
        "models": [{"path": p, "name": n} for p, n in zip(mps, ["alpha", "beta"], strict=True)],
        "sparsify": sparsify,
        "merge": {"method": "task_arithmetic", "scale": 0.5},
        "exclude": ["head"],
        "output": {"path": str(tmp_path / "out")},
        "runtime": {"progress": "none", "memory_budget": "256MB", "device": "cpu"},
    }
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["merge", str(path)]) == 0
    return str(tmp_path / "out")


def test_info_on_an_ordinary_merge(tmp_path, capsys):
    out = _merge(tmp_path, {"method": "tadrop"})
    capsys.readouterr()
    assert main(["info", out]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"merge output {out}\n")
    assert "method: task_arithmetic (scale 0.5) + tadrop (scope tensor, low_q 0.5" in text
    assert re.search(r"models \(2\):\n +alpha +weight 1.0 .*\n +beta +weight 1.0", text)
    assert re.search(r"tensors: 8 \(6 merged, 1 copied, 1 excluded\)", text), text
    assert "in 1 shard(s)" in text and "tadmerge verify" in text
    assert re.search(r"\n +alpha +\d+\.\d%   per tensor", text)  # per task, by name
    assert re.search(r"tensor +alpha +beta\n", text)  # the columns are named


def test_info_on_a_merge_without_sparsifier(tmp_path, capsys):
    out = _merge(tmp_path, {"method": "none"})
    capsys.readouterr()
    assert main(["info", out]) == 0
    text = capsys.readouterr().out
    assert "method: task_arithmetic (scale 0.5), no sparsifier" in text
    assert "drop rates: none (no sparsifier" in text


def test_info_on_a_directory_that_is_no_output(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    capsys.readouterr()
    assert main(["info", str(tmp_path / "x")]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert "not a tadmerge output: no merge_report.json nor manifest.json" in err
    assert err.count("\n") == 1
