"""A disk that fills up mid-merge: a clean exit 4, nothing published, staging kept,
and `--resume` after space is freed gives a verified output with the bytes of a
merge that never failed.

Two ways to fill the disk:
- a real one: a 2 MiB tmpfs mounted for the test (needs root; skipped where mount
  fails), filled by a filler file at a chosen moment of the merge;
- everywhere: os.pwrite in tadmerge.io.block_io raising ENOSPC after N calls.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from checkpoints import write_checkpoint
from outputs import model_files, run_cli

import tadmerge.io.block_io as block_io
import tadmerge.io.publish as publish
import tadmerge.run.driver as driver
import tadmerge.run.outputs as run_outputs
from tadmerge.cli import main
from tadmerge.errors import EXIT_OK, EXIT_RUNTIME

NO_SPACE = "No space left on device"
OUTPUT_KB = 264  # the merged model.safetensors is ~258 KiB (fixture `inputs`)


def one_error_line(lines: list[str]) -> str:
    assert len(lines) == 1, lines
    assert lines[0].startswith("tadmerge: error: "), lines
    assert "internal error" not in lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Base + 2 fine-tunes (~260 KiB each) and a clean merge to compare with."""
    root = tmp_path_factory.mktemp("diskfull")
    g = torch.Generator().manual_seed(3)
    base = {
        "a.weight": torch.randn(256, 256, generator=g),
        "b.bias": torch.randn(16, generator=g),
        "ids": torch.arange(4),
    }
    paths = [write_checkpoint(str(root / "in" / "base"), base)]
    for i in range(2):
        ft = {
            k: v + 0.01 * (i + 1) * torch.randn(v.shape, generator=g)
            if v.is_floating_point()
            else v
            for k, v in base.items()
        }
        paths.append(write_checkpoint(str(root / "in" / f"m{i}"), ft))
    clean = root / "clean"
    cfg = write_cfg(root / "clean.yaml", paths, clean)
    assert main(["-q", "merge", cfg]) == EXIT_OK
    return paths, clean


def write_cfg(path: Path, paths: list[str], out: Path) -> str:
    cfg = {
        "base": paths[0],
        "models": [{"path": p, "name": f"m{i}"} for i, p in enumerate(paths[1:])],
        "sparsify": {"method": "random", "p": 0.3},
        "merge": {"method": "ties", "scale": 0.9},
        "output": {"path": str(out)},
        "runtime": {
            "block_elements": 64,
            "max_unit_elements": 4096,  # 16 units for a.weight
            "memory_budget": "256MB",
            "progress": "none",
            "device": "cpu",
        },
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


def assert_failed_cleanly(out: Path) -> Path:
    staging = out.parent / f".{out.name}.tadmerge-staging"
    assert not out.exists(), "output published after a failure"
    assert staging.is_dir(), "staging not kept for --resume"
    assert not (staging / "manifest.json").exists()
    return staging


def logged_units(staging: Path) -> int:
    units = staging / ".tadmerge" / "units.jsonl"
    return units.read_text().count("\n") if units.exists() else 0


def assert_resume_completes(capsys, cfg: str, out: Path, clean: Path) -> dict:
    rc, lines = run_cli(capsys, "merge", cfg, "--resume")
    assert rc == EXIT_OK, lines
    assert not (out.parent / f".{out.name}.tadmerge-staging").exists()
    rc, _ = run_cli(capsys, "verify", str(out))
    assert rc == EXIT_OK
    assert model_files(out) == model_files(clean)
    return json.loads((out / "merge_report.json").read_text())


# ------------------------------------------------------------------------------------
# a real full disk: a small tmpfs
# ------------------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot mount a tmpfs: {e}")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        block_io.close_all()
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def free_kb(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize // 1024


def fill(mnt: Path, leave_kb: int = 0) -> Path:
    """Write a filler file until only leave_kb KiB (or nothing) is left."""
    filler = mnt / f"filler{len(list(mnt.glob('filler*')))}"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        want = max(0, free_kb(mnt) - leave_kb) * 1024
        chunk = b"\0" * 4096
        done = 0
        while done < want or leave_kb == 0:
            try:
                done += os.write(fd, chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC
                break
    finally:
        os.close(fd)
    return filler


def free_space(mnt: Path) -> None:
    for f in mnt.glob("filler*"):
        f.unlink()


def test_disk_full_mid_merge_then_resume(small_fs, inputs, tmp_path, capsys):
    paths, clean = inputs
    out = small_fs / "merged"
    cfg = write_cfg(tmp_path / "merge.yaml", paths, out)
    fill(small_fs, leave_kb=OUTPUT_KB // 2)  # room for about half of the shard

    rc, lines = run_cli(capsys, "merge", cfg)
    assert rc == EXIT_RUNTIME
    line = one_error_line(lines)
    staging = assert_failed_cleanly(out)
    assert f"{staging}/model.safetensors" in line and NO_SPACE in line, line
    logged = logged_units(staging)
    assert logged >= 1, "some units finished before the disk filled up"

    free_space(small_fs)
    report = assert_resume_completes(capsys, cfg, out, clean)
    assert report["units"]["reused"] == logged


def test_disk_full_when_the_data_starts_then_resume(
    small_fs, inputs, tmp_path, capsys, monkeypatch
):
    """Full right after the statistics are saved: the first unit's write fails."""
    paths, clean = inputs
    out = small_fs / "merged"
    cfg = write_cfg(tmp_path / "merge.yaml", paths, out)
    real = driver.RunState.save_stats

    def save_then_fill(self, resolved):
        real(self, resolved)
        fill(small_fs)

    monkeypatch.setattr(driver.RunState, "save_stats", save_then_fill)
    rc, lines = run_cli(capsys, "merge", cfg)
    monkeypatch.undo()
    assert rc == EXIT_RUNTIME
    line = one_error_line(lines)
    staging = assert_failed_cleanly(out)
    assert f"{staging}/model.safetensors failed: {NO_SPACE}" in line, line
    assert logged_units(staging) == 0
    free_space(small_fs)
    report = assert_resume_completes(capsys, cfg, out, clean)
    assert report["units"]["reused"] == 0


def test_disk_already_full_at_start(small_fs, inputs, tmp_path, capsys):
    paths, clean = inputs
    out = small_fs / "merged"
    cfg = write_cfg(tmp_path / "merge.yaml", paths, out)
    fill(small_fs)
    rc, lines = run_cli(capsys, "merge", cfg)
    assert rc == EXIT_RUNTIME
    line = one_error_line(lines)
    staging = out.parent / f".{out.name}.tadmerge-staging"
    assert NO_SPACE in line and str(staging) in line, line
    assert not out.exists()
    free_space(small_fs)
    if staging.exists():
        assert_resume_completes(capsys, cfg, out, clean)
    else:
        assert main(["-q", "merge", cfg]) == EXIT_OK


@pytest.mark.parametrize("victim", ["stats.json", "merge_report.json"])
def test_disk_full_while_writing_driver_files(
    small_fs, inputs, tmp_path, capsys, monkeypatch, victim
):
    paths, clean = inputs
    out = small_fs / "merged"
    cfg = write_cfg(tmp_path / "merge.yaml", paths, out)
    if victim == "stats.json":
        real_prepare = driver.prepare_outputs

        def prepare_then_fill(plan, staging):
            real_prepare(plan, staging)
            fill(small_fs)

        monkeypatch.setattr(driver, "prepare_outputs", prepare_then_fill)
    else:
        real_write = run_outputs.write_json

        def fill_then_write(path, doc):
            if path.endswith(run_outputs.REPORT_NAME):
                fill(small_fs)
            return real_write(path, doc)

        monkeypatch.setattr(run_outputs, "write_json", fill_then_write)
    rc, lines = run_cli(capsys, "merge", cfg)
    monkeypatch.undo()
    assert rc == EXIT_RUNTIME
    line = one_error_line(lines)
    staging = assert_failed_cleanly(out)
    assert NO_SPACE in line
    assert re.search(rf"{re.escape(str(staging))}/(\.tadmerge/)?{victim}", line), line
    free_space(small_fs)
    assert_resume_completes(capsys, cfg, out, clean)


def test_disk_full_while_copying_the_base_side_files(
    small_fs, inputs, tmp_path, capsys, monkeypatch
):
    """shutil.copyfile's OSError names the source; the message must name the
    destination in the staging directory (the file that could not be written)."""
    paths, clean = inputs
    out = small_fs / "merged"
    cfg = write_cfg(tmp_path / "merge.yaml", paths, out)
    real_copy = run_outputs.shutil.copyfile

    def fill_then_copy(src, dst, *a, **kw):
        fill(small_fs)
        return real_copy(src, dst, *a, **kw)

    monkeypatch.setattr(run_outputs.shutil, "copyfile", fill_then_copy)
    rc, lines = run_cli(capsys, "merge", cfg)
    monkeypatch.undo()
    assert rc == EXIT_RUNTIME
    line = one_error_line(lines)
    staging = assert_failed_cleanly(out)
    assert NO_SPACE in line and f"{staging}/config.json" in line, line
    free_space(small_fs)
    assert_resume_completes(capsys, cfg, out, clean)


def test_disk_full_while_writing_the_manifest(small_fs, inputs, tmp_path, capsys, monkeypatch):
    paths, clean = inputs
    out = small_fs / "merged"
    cfg = write_cfg(tmp_path / "merge.yaml", paths, out)
    real = publish.write_manifest

    def fill_then_manifest(directory, **kw):
        fill(small_fs)
        return real(directory, **kw)

    monkeypatch.setattr(publish, "write_manifest", fill_then_manifest)
    rc, lines = run_cli(capsys, "merge", cfg)
    monkeypatch.undo()
    line = one_error_line(lines)
    assert_failed_cleanly(out)
    assert NO_SPACE in line and "--resume" in line, line
    free_space(small_fs)
    assert_resume_completes(capsys, cfg, out, clean)
    assert rc == EXIT_RUNTIME, f"exit {rc}: {line}"


# ------------------------------------------------------------------------------------
# everywhere: a writer that raises ENOSPC
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "after, err",
    [(1, errno.ENOSPC), (6, errno.ENOSPC), (6, errno.EACCES), (6, errno.EIO)],
    ids=["enospc-first-unit", "enospc-mid-merge", "eacces-mid-merge", "eio-mid-merge"],
)
def test_write_error_then_resume(inputs, tmp_path, capsys, monkeypatch, after, err):
    """pwrite fails after `after` calls (the shard header is call 1): ENOSPC, or a
    permission or I/O error; exit 4 naming the file and the error, then --resume."""
    paths, clean = inputs
    out = tmp_path / "merged"
    cfg = write_cfg(tmp_path / "merge.yaml", paths, out)
    real = os.pwrite
    calls = {"n": 0}

    def pwrite(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > after:
            raise OSError(err, os.strerror(err))
        return real(fd, data, offset)

    monkeypatch.setattr(block_io.os, "pwrite", pwrite)
    rc, lines = run_cli(capsys, "merge", cfg)
    monkeypatch.undo()  # space freed / permission fixed
    assert rc == EXIT_RUNTIME
    line = one_error_line(lines)
    staging = assert_failed_cleanly(out)
    expected = f"of {staging}/model.safetensors failed: {os.strerror(err)} ({errno.errorcode[err]})"
    assert expected in line, line
    logged = logged_units(staging)
    assert logged == after - 1  # every unit that wrote is logged, the failed one is not

    report = assert_resume_completes(capsys, cfg, out, clean)
    assert report["units"]["reused"] == logged
