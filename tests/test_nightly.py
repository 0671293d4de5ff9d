"""The nightly job: skip when nothing changed, keep history, one run per output,
progress lines that stay true after a resume.

- `--if-changed` (runtime.if_changed): inputs and config those the published
  output records -> exit 0, one line "up to date", no tensor data read; an input
  rewritten with its size and mtime kept, or another config -> a merge that
  replaces the output (the bytes of a fresh merge of the new inputs);
- `output.keep: N`: each run under `<path>.<UTC time>`, `<path>` a symlink to the
  newest, the last N kept (older ones deleted only when verifiably tadmerge
  outputs), each one's merge_report.json naming its inputs and revisions;
- the output lock: a second run for an output that another run holds (even one
  still planning, with no staging directory yet) exits 2 naming the holder;
- Progress: units counted once, never more than the total, ETA never negative.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_input_changes import World, copy_keeping_size_and_mtime, finetune, model_files

import tadmerge.run.driver as driver
from tadmerge.cli import main
from tadmerge.cluster.progress import Progress
from tadmerge.errors import EXIT_CONFIG, EXIT_OK
from tadmerge.io import block_io
from tadmerge.io.publish import versions

REPO = Path(__file__).resolve().parents[1]


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(argv))
    got = capsys.readouterr()
    return rc, got.out, got.err


def no_tensor_reads(monkeypatch) -> None:
    """Any read of tensor data, or any start of a merge, fails the test."""

    def boom(*a, **k):
        raise AssertionError("tensor data read")

    for name in ("read_bytes", "map_bytes", "read_rows", "prefetch_rows"):
        monkeypatch.setattr(block_io, name, boom)
    monkeypatch.setattr(driver, "make_executor", boom)


# ------------------------------------------------------------------------------ progress


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_progress_counts_each_unit_once_after_a_resume():
    clock = Clock()
    # 10 units, 4 reused by --resume; the 6 left weigh 600 bytes
    p = Progress("merge", 10, 600, mode="none", reused=4, clock=clock)
    assert p.units == 4
    clock.t += 2
    for u in (4, 5, 6):
        p.update(u, 100)
    assert p.line() == "merge: 7/10 units (4 reused), 300 B/600 B, 150 B/s, ETA 2s"
    p.update(5, 100)  # reported twice (a replacement worker redid it): counted once
    assert p.units == 7 and p.bytes == 300
    for u in (7, 8, 9):
        p.update(u, 100)
    for u in (8, 9):  # TIES reruns of blocks already done
        p.update(u, 100)
    assert p.units == 10 and p.bytes == 600
    line = p.line()
    assert line.startswith("merge: 10/10 units (4 reused), 600 B/600 B") and "ETA 0s" in line


def test_progress_eta_is_never_negative_nor_the_units_above_the_total():
    clock = Clock()
    p = Progress("merge", 3, 100, mode="none", reused=5, clock=clock)  # more reused than all
    assert p.units == 3
    p = Progress("merge", 3, 100, mode="none", clock=clock)
    p.update(0, 150)  # more bytes than planned (a unit's estimate was low)
    clock.t += 1
    assert p.bytes == 100 and "ETA 0s" in p.line()
    p.update(1, 0)
    assert "ETA 0s" in p.line() and "2/3 units" in p.line()
    q = Progress("merge", 3, 100, mode="none", clock=clock)
    assert q.line().endswith("ETA ?")  # nothing done yet: no rate to tell


# ------------------------------------------------------------------------------ if-changed


def test_if_changed_skips_unchanged_inputs_without_reading_tensor_data(
    tmp_path, capsys, monkeypatch
):
    w = World(tmp_path)
    cfg = w.write_cfg()
    rc, out, err = cli(capsys, "-q", "merge", cfg, "--if-changed")  # no output yet: merges
    assert rc == EXIT_OK, err
    assert "merged" in out
    first = model_files(w.out)
    report = json.loads((w.out / "merge_report.json").read_text())
    files = {k for ck in report["inputs"]["checkpoints"] for k in ck["files"]}
    assert w.model_file(1) in files and report["inputs"]["plan_fingerprint"]

    with monkeypatch.context() as m:
        no_tensor_reads(m)
        t = time.monotonic()
        rc, out, err = cli(capsys, "merge", cfg, "--if-changed")
        took = time.monotonic() - t
    assert rc == EXIT_OK, err
    assert out.splitlines() == [f"{w.out}: up to date (inputs and config unchanged since it "
                                "was published)"]  # fmt: skip
    assert took < 5.0  # headers only (a loaded CI machine: the bound is loose)
    assert model_files(w.out) == first and main(["-q", "verify", str(w.out)]) == EXIT_OK

    # runtime.if_changed: true in the config does the same
    w.cfg["runtime"] = {**w.cfg["runtime"], "if_changed": True}
    cfg2 = w.write_cfg(name="ifc.yaml")
    with monkeypatch.context() as m:
        no_tensor_reads(m)
        rc, out, _ = cli(capsys, "-q", "merge", cfg2)
    assert rc == EXIT_OK and "up to date" in out


def test_if_changed_merges_when_an_input_is_rewritten_with_its_size_and_mtime_kept(
    tmp_path, capsys, caplog
):
    w = World(tmp_path)
    cfg = w.write_cfg()
    assert main(["-q", "merge", cfg]) == EXIT_OK
    old = model_files(w.out)
    from test_input_changes import base_tensors

    copy_keeping_size_and_mtime(w.model_file(1), finetune(base_tensors(), 1, size=0.2))
    caplog.set_level(logging.INFO, logger="tadmerge")
    rc, out, err = cli(capsys, "merge", cfg, "--if-changed")
    assert rc == EXIT_OK, err
    assert "merged" in out and "up to date" not in out
    assert "1 input file(s) changed" in caplog.text and w.model_file(1) in caplog.text
    new = model_files(w.out)
    assert new != old and new == w.reference("ref")  # the bytes of a fresh merge
    assert main(["-q", "verify", str(w.out)]) == EXIT_OK
    assert sorted(os.listdir(tmp_path)) == sorted(["in", "out", "merge.yaml", "ref", "ref.yaml"])
    # and now it is up to date again
    rc, out, _ = cli(capsys, "merge", cfg, "--if-changed")
    assert rc == EXIT_OK and "up to date" in out


def test_if_changed_merges_when_the_config_changed(tmp_path, capsys, caplog):
    w = World(tmp_path)
    assert main(["-q", "merge", w.write_cfg()]) == EXIT_OK
    w.cfg["merge"] = {"method": "task_arithmetic", "scale": 0.3}
    caplog.set_level(logging.INFO, logger="tadmerge")
    rc, out, err = cli(capsys, "merge", w.write_cfg(), "--if-changed")
    assert rc == EXIT_OK, err
    assert "merged" in out and "the config or the tadmerge version changed" in caplog.text
    assert model_files(w.out) == w.reference("ref")


# ------------------------------------------------------------------------------ keep


def test_keep_publishes_dated_versions_behind_a_symlink_and_keeps_the_last_n(
    tmp_path, capsys, monkeypatch
):
    w = World(tmp_path)
    w.cfg["output"] = {"path": str(w.out), "keep": 2}
    cfg = w.write_cfg()
    made = []
    for i in range(3):
        if i:
            from test_input_changes import base_tensors

            copy_keeping_size_and_mtime(w.model_file(1), finetune(base_tensors(), 1, 0.1 * i))
        rc, out, err = cli(capsys, "-q", "merge", cfg, "--if-changed")
        assert rc == EXIT_OK, err
        assert os.path.islink(w.out)
        target = os.path.join(str(tmp_path), os.readlink(w.out))
        assert os.readlink(w.out) == os.path.basename(target)  # relative: any mount
        made.append((target, model_files(Path(target))))
        assert main(["-q", "verify", str(w.out)]) == EXIT_OK
    kept = versions(str(w.out))
    assert kept == [made[1][0], made[2][0]] and not os.path.exists(made[0][0])
    for path, files in made[1:]:
        assert model_files(Path(path)) == files and main(["-q", "verify", path]) == EXIT_OK
        rep = json.loads(Path(path, "merge_report.json").read_text())
        sources = [ck["source"] for ck in rep["inputs"]["checkpoints"]]
        assert sources == [w.base, *w.models]
    assert made[1][1] != made[2][1]
    # unchanged now: up to date through the symlink, nothing read, nothing published
    with monkeypatch.context() as m:
        no_tensor_reads(m)
        rc, out, _ = cli(capsys, "merge", cfg, "--if-changed")
    assert rc == EXIT_OK and "up to date" in out and versions(str(w.out)) == kept
    # an old version holding a user's file is not deleted
    Path(kept[0], "notes.txt").write_text("mine")
    assert main(["-q", "merge", cfg]) == EXIT_OK  # (no --if-changed: a new version)
    now = versions(str(w.out))
    assert kept[0] in now and len(now) == 3 and Path(kept[0], "notes.txt").exists()
    assert os.path.realpath(w.out) == now[-1]


def test_keep_refuses_an_output_path_that_is_a_real_directory(tmp_path, capsys):
    w = World(tmp_path)
    assert main(["-q", "merge", w.write_cfg()]) == EXIT_OK
    w.cfg["output"] = {"path": str(w.out), "keep": 3}
    rc, _, err = cli(capsys, "merge", w.write_cfg())
    assert rc == EXIT_CONFIG and "is not a symlink" in err and "move it aside" in err
    assert main(["-q", "verify", str(w.out)]) == EXIT_OK


# ------------------------------------------------------------------------------ output lock

HOLDER = """
import os, sys
sys.path.insert(0, sys.argv[1])
from tadmerge.io.publish import _acquire_output_lock
out = sys.argv[2]
held = _acquire_output_lock(os.path.dirname(out), os.path.basename(out), out)
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_second_run_on_the_same_output_is_refused_naming_the_first(tmp_path, capsys):
    """The first run holds the output's lock from its start (still planning: no
    staging directory yet); a second fresh run exits 2 naming its pid, host and start,
    and leaves nothing behind; once the first is gone the output is free."""
    w = World(tmp_path)
    cfg = w.write_cfg()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(REPO), str(w.out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        for argv in ((), ("--overwrite",), ("--if-changed",)):
            rc, _, err = cli(capsys, "merge", cfg, *argv)
            assert rc == EXIT_CONFIG, err
            assert f"{w.out} is in use by another tadmerge run (pid {holder.pid} on host " in err
            assert socket.gethostname() in err and "started" in err
            assert not w.staging.exists() and not w.out.exists()
    finally:
        holder.kill()
        holder.wait()
    rc, _, err = cli(capsys, "-q", "merge", cfg)
    assert rc == EXIT_OK, err
    assert main(["-q", "verify", str(w.out)]) == EXIT_OK
    assert sorted(os.listdir(tmp_path)) == ["in", "merge.yaml", "out"]  # no lock file left


def test_nightly_config_parses():
    from tadmerge.config import load_config

    cfg = load_config(REPO / "configs" / "llm-nightly-ray.yaml")
    assert cfg.runtime.executor == "ray" and cfg.output.keep >= 1
    raw = yaml.safe_load((REPO / "configs" / "llm-nightly-ray.yaml").read_text())
    assert raw["runtime"]["if_changed"] is True


@pytest.mark.parametrize("keep", [0, 2])
def test_the_nightly_switches_do_not_change_what_a_merge_is(keep):
    from tadmerge.config import parse_config

    def cfg(**kw):
        return parse_config({"base": "/a", "models": [{"path": "/b"}], **kw})

    plain = cfg(output={"path": "/x"})
    assert "keep" not in plain.to_dict()["output"]
    assert "if_changed" not in plain.to_dict()["runtime"]
    other = cfg(output={"path": "/x", "keep": keep}, runtime={"if_changed": True})
    assert other.output.keep == keep and other.runtime.if_changed


def test_keep_a_publish_killed_before_the_symlink_switch_is_finished_by_the_next_run(
    tmp_path, monkeypatch
):
    """Renamed into its dated name but the symlink not yet switched (a kill, or the
    switch failing): the version is complete, and the next run for the output points
    the symlink at it before anything else."""
    import tadmerge.io.publish as publish

    out = str(tmp_path / "out")
    s = publish.Staging(out, keep=2)
    Path(s.path, "model.safetensors").write_bytes(b"one")
    first = s.publish()
    assert os.path.realpath(out) == first

    s = publish.Staging(out, keep=2)
    Path(s.path, "model.safetensors").write_bytes(b"two")

    def fail(link, target):
        raise OSError(5, "Input/output error")

    with monkeypatch.context() as m:
        m.setattr(publish, "switch_link", fail)
        with pytest.raises(publish.OutputError, match="could not point"):
            s.publish()
    second = versions(out)[-1]
    assert second != first and os.path.realpath(out) == first
    nxt = publish.Staging(out, keep=2)  # the next run finishes the publish first
    nxt.close()
    shutil.rmtree(nxt.path)  # (that run's own staging directory: its lock only)
    assert os.path.realpath(out) == second
    assert Path(out, "model.safetensors").read_bytes() == b"two"
    assert main(["-q", "verify", out]) == EXIT_OK
    assert sorted(os.listdir(tmp_path)) == sorted(["out", *map(os.path.basename, [first, second])])


def test_the_statistics_stage_is_one_short_log_line_with_details_in_the_report(tmp_path, caplog):
    w = World(tmp_path)
    w.cfg["sparsify"] = {"method": "tadrop", "scope": "global"}
    caplog.set_level(logging.INFO, logger="tadmerge")
    assert main(["merge", w.write_cfg()]) == EXIT_OK
    lines = [r.getMessage() for r in caplog.records if "statistics stage" in r.getMessage()]
    assert len(lines) == 1 and len(lines[0]) < 160, lines
    reads = json.loads((w.out / "merge_report.json").read_text())["reads"]
    assert reads["stats_rounds"] >= 1
    assert len(reads["round_seconds"]) == len(reads["round_kinds"]) == reads["stats_rounds"]
    assert f"{reads['stats_rounds']} round(s)" in lines[0]
