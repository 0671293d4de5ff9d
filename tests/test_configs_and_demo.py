"""The shipped configs parse, and the embedded demo runs end to end."""

from __future__ import annotations

import glob
import os

import pytest

from tadmerge.config import load_config
from tadmerge.demo import run_demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_shipped_config_is_valid(path):
    cfg = load_config(path)
    assert cfg.models


def test_demo_merges_and_reconstructs(tmp_path, capsys):
    rep = run_demo(str(tmp_path / "demo"))
    out = capsys.readouterr().out
    assert "EMR + TADrop" in out and "rescalers" in out
    assert rep["emr"]["rescalers"] and rep["units"]["total"] > 0
    assert os.path.exists(tmp_path / "demo" / "merged" / "manifest.json")
    assert not os.path.exists(tmp_path / "demo" / "checkpoints")  # cleaned unless --keep
