"""Never publish wrong bytes, never delete a user's files (issue 22).

Each test injects its fault and checks what a user would: the exit code, that
what is published has the bytes of an uninterrupted merge and passes `tadmerge
verify`, and that files a user put in an earlier output survive.

- damaged staging on --resume: finished units whose bytes on disk no longer match
  the crc32 logged with them (a shard truncated by a crash and rebuilt with zeros,
  a zeroed or flipped range, an EMR mask chunk or task shard damaged) are redone;
  records reach units.jsonl only after their data was fdatasync'ed;
- the publish window: a kill before, at or after the rename never lets a resume
  reuse work under another plan, and the next run finishes an interrupted publish;
- --overwrite: refused (exit 2, before any data work, and again at publish) when
  the old output holds files its manifest does not list; swapped atomically
  (RENAME_EXCHANGE), and a kill at any step leaves a complete output or the old one;
- the staging lock: a second run on a staging directory in use is refused naming
  the holder; a killed holder's lock dies with it.

Kills run tests/killpoints.py in a subprocess (SIGKILL at a named point).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import zlib
from pathlib import Path

import killpoints
import numpy as np
import pytest
import yaml
from checkpoints import SPLIT_RUNTIME, write_zoo
from outputs import model_files

import tadmerge.io.publish as publish
import tadmerge.run.unit_log as unit_log
from tadmerge.cli import main
from tadmerge.errors import EXIT_CONFIG, EXIT_INTERRUPTED, EXIT_OK
from tadmerge.io.block_io import crc_of_range, write_at_crc

REPO = Path(__file__).resolve().parent.parent
KILLPOINTS = REPO / "tests" / "killpoints.py"
RUNTIME = SPLIT_RUNTIME


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    base, models, *_ = write_zoo(str(root / "in"))
    return root, base, models


def write_cfg(path: Path, zoo, out: Path, method: str = "ties", **merge) -> str:
    _, base, models = zoo
    cfg: dict = {
        "base": base,
        "models": [{"path": p, "name": f"t{i}"} for i, p in enumerate(models)],
        "merge": {"method": method, **merge},
        "exclude": ["^head\\."],
        # several shards: a damaged one takes only its own units with it
        "output": {"path": str(out), "shard_size": 5000},
        "runtime": dict(RUNTIME),
    }
    if method == "ties":  # DARE + TIES: random streams, statistics, split-tensor reruns
        cfg["sparsify"] = {"method": "random", "p": 0.5}
        cfg["merge"].setdefault("scale", 0.8)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


_REFS: dict = {}


def reference(zoo, method: str = "ties", **merge) -> Path:
    """An uninterrupted merge's output (made once per config)."""
    key = (method, tuple(sorted(merge.items())))
    if key not in _REFS:
        root = zoo[0]
        out = root / f"ref-{len(_REFS)}"
        cfg = write_cfg(root / f"ref-{len(_REFS)}.yaml", zoo, out, method, **merge)
        assert main(["-q", "merge", cfg]) == EXIT_OK
        _REFS[key] = out
    return _REFS[key]


def kill_at(point: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(KILLPOINTS), f"--at={point.replace('=', ':')}", "--", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )


def cli(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def verified(out: Path) -> bool:
    return main(["-q", "verify", str(out)]) == EXIT_OK


def staging_of(out: Path) -> Path:
    return out.parent / f".{out.name}.tadmerge-staging"


def records(staging: Path) -> dict[int, dict]:
    """units.jsonl: the last record of each unit."""
    log = staging / ".tadmerge" / "units.jsonl"
    recs = [json.loads(ln) for ln in log.read_text().splitlines()]
    return {r["unit"]: r for r in recs}


def interrupt_after(monkeypatch, n: int) -> None:
    """Ctrl-C once `n` units finished (the driver logs them before it stops)."""
    killpoints.install(f"progress:{n}", killpoints.interrupt, monkeypatch.setattr)


def stop_at_publish(monkeypatch) -> None:
    """Ctrl-C when the merge is about to publish: every unit logged, staging kept."""

    def publish_interrupted(self, *a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(publish.Staging, "publish", publish_interrupted)


def asides(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tadmerge-old-" in p.name)


# ------------------------------------------------------------------------------------
# 2. damaged staging on --resume
# ------------------------------------------------------------------------------------


def test_checksum_is_of_the_bytes_written(tmp_path):
    """write_at_crc checksums the buffer it writes (in 1 MiB slices); crc_of_range
    reads it back, and is None past the end of a file or for a missing one."""
    data = np.random.default_rng(0).integers(0, 256, 5 * 2**20 // 2 + 3, dtype=np.uint8)
    path = str(tmp_path / "f")
    Path(path).write_bytes(b"\0" * 7)
    n, crc = write_at_crc(path, 7, data)
    assert n == data.size and crc == zlib.crc32(data.tobytes())
    assert Path(path).read_bytes()[7:] == data.tobytes()
    assert crc_of_range(path, 7, 7 + n) == crc
    assert crc_of_range(path, 0, 7) == zlib.crc32(b"\0" * 7)
    assert crc_of_range(path, 7, 8 + n) is None
    assert crc_of_range(str(tmp_path / "missing"), 0, 1) is None


def test_records_without_checksums_are_redone(tmp_path):
    """A record with no output checksums (a resume log from before them) or a
    malformed one is not reused; one whose ranges match is."""
    from tadmerge.cluster.worker import UnitRecord

    (tmp_path / "model.safetensors").write_bytes(b"abcdef")
    good = UnitRecord(0, [], out=[("model.safetensors", 1, 4, zlib.crc32(b"bcd"))])
    done = {
        0: good,
        1: UnitRecord(1, [], out=None),
        2: UnitRecord(2, [], out=[("model.safetensors", 1, 4, zlib.crc32(b"bcx"))]),
        3: UnitRecord(3, [], out=[("model.safetensors", 4, 9, 0)]),  # past the end
    }
    assert unit_log.check_finished(str(tmp_path), done, []) == {0: good}
    assert unit_log.check_finished(str(tmp_path), done, ["model.safetensors"]) == {}
    assert unit_log.out_from_json([["../x", 0, 1, 2]]) is None
    assert unit_log.out_from_json([["a", 0, 1]]) is None
    assert unit_log.out_from_json([["a", 0, 1, 2]]) == [("a", 0, 1, 2)]


def test_records_are_logged_after_their_data_is_durable(zoo, tmp_path, capsys, monkeypatch):
    """Every line of units.jsonl is appended in a batch that fdatasync'ed the output
    files its units wrote first; each record holds crc32s that match the bytes."""
    events: list[tuple[str, object]] = []
    real_sync = os.fdatasync

    def fdatasync(fd):
        events.append(("sync", os.readlink(f"/proc/self/fd/{fd}")))
        real_sync(fd)

    def logged_open(path, mode="r", *a, **kw):
        if path.endswith("units.jsonl") and "a" in mode:
            size = os.path.getsize(path) if os.path.exists(path) else 0
            events.append(("append", size))
        return open(path, mode, *a, **kw)

    monkeypatch.setattr(unit_log.os, "fdatasync", fdatasync)
    monkeypatch.setattr(unit_log, "open", logged_open, raising=False)
    monkeypatch.setattr(unit_log, "FLUSH_INTERVAL_S", 0.0)  # many small batches
    stop_at_publish(monkeypatch)
    out = tmp_path / "out"
    rc, err = cli(capsys, "merge", write_cfg(tmp_path / "m.yaml", zoo, out))
    monkeypatch.undo()
    assert rc == EXIT_INTERRUPTED, err
    staging = staging_of(out)
    raw = (staging / ".tadmerge" / "units.jsonl").read_bytes()
    appends = [(i, start) for i, (kind, start) in enumerate(events) if kind == "append"]
    assert len(appends) > 1
    offset = 0
    lines = raw.splitlines(keepends=True)
    last = {json.loads(line)["unit"]: i for i, line in enumerate(lines)}
    for i, line in enumerate(lines):
        rec = json.loads(line)
        # the batch that appended this line, and the syncs since the batch before it
        idx = max(k for k, (_, start) in enumerate(appends) if start <= offset)
        lo = appends[idx - 1][0] if idx else -1
        synced = {p for kind, p in events[lo + 1 : appends[idx][0]] if kind == "sync"}
        for where, start, end, crc in rec["out"]:
            full = os.path.realpath(staging / where)
            assert full in synced, (rec["unit"], where)
            # (a TIES rerun rewrites its unit and logs it again: the bytes are the
            # last record's)
            if last[rec["unit"]] == i:
                assert crc_of_range(full, start, end) == crc
        offset += len(line)
    total = json.loads((reference(zoo) / "merge_report.json").read_text())["units"]["total"]
    assert offset == len(raw) and len(records(staging)) == total


def test_resume_redoes_the_units_of_a_truncated_shard(zoo, tmp_path, capsys):
    """Killed (kill -9) after some units; then one shard file is found empty, as
    after a crash that lost its size: --resume rebuilds it and redoes exactly the
    logged units that wrote into it, and reuses the others."""
    ref = reference(zoo)
    out = tmp_path / "out"
    cfg = write_cfg(tmp_path / "m.yaml", zoo, out)
    p = kill_at("units=14", "merge", cfg)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert not out.exists()
    staging = staging_of(out)
    logged = records(staging)
    assert len(logged) >= 14
    hits: dict[str, set[int]] = {}
    for u, r in logged.items():
        for w, *_ in r["out"]:
            hits.setdefault(w, set()).add(u)
    assert len(hits) > 1, "the logged units must span two shards"
    victim, hit = min(hits.items(), key=lambda kv: len(kv[1]))
    os.truncate(staging / victim, 0)
    # the units outside the victim whose bytes are still their record's (a TIES
    # rerun cut short by the kill rewrote its unit before logging it again)
    intact = {
        u
        for u, r in logged.items()
        if u not in hit
        and all(crc_of_range(str(staging / w), a, b) == c for w, a, b, c in r["out"])
    }
    assert len(intact) > 1

    rc, err = cli(capsys, "merge", cfg, "--resume")
    assert rc == EXIT_OK, err
    report = json.loads((out / "merge_report.json").read_text())
    assert report["units"]["reused"] == len(intact)
    assert model_files(out) == model_files(ref)
    assert verified(out)


def test_resume_redoes_units_whose_bytes_were_damaged(zoo, tmp_path, capsys, monkeypatch, caplog):
    """A finished unit's range zeroed, another's with one bit flipped (the shard
    keeps its size and header): both are found by their crc32 and redone."""
    ref = reference(zoo)
    out = tmp_path / "out"
    cfg = write_cfg(tmp_path / "m.yaml", zoo, out)
    interrupt_after(monkeypatch, 6)
    rc, err = cli(capsys, "merge", cfg)
    monkeypatch.undo()
    assert rc == EXIT_INTERRUPTED, err
    staging = staging_of(out)
    logged = records(staging)
    assert len(logged) == 6
    ranges = [
        (u, w, a, b)
        for u, r in logged.items()
        for w, a, b, crc in r["out"]
        if b > a and crc != zlib.crc32(bytes(b - a))
    ]
    _, w1, a1, b1 = ranges[0]
    _, w2, _, b2 = next(x for x in ranges if x[0] != ranges[0][0])
    with open(staging / w1, "r+b") as f:
        f.seek(a1)
        f.write(bytes(b1 - a1))
    with open(staging / w2, "r+b") as f:
        f.seek(b2 - 1)
        byte = f.read(1)[0]
        f.seek(b2 - 1)
        f.write(bytes([byte ^ 0x10]))

    rc, err = cli(capsys, "merge", cfg, "--resume")
    assert rc == EXIT_OK, err
    assert "2 of 6 finished unit(s) no longer match" in caplog.text
    report = json.loads((out / "merge_report.json").read_text())
    assert report["units"]["reused"] == 4
    assert model_files(out) == model_files(ref)
    assert verified(out)


def test_emr_masks_and_task_shards_are_checked_on_resume(zoo, tmp_path, capsys, monkeypatch):
    """EMR: a unit's mask chunk cut short and an excluded tensor's task shard
    emptied: their units are redone; masks, task shards and delta equal an
    uninterrupted merge's."""
    import zarr

    ref = reference(zoo, "emr")
    total = json.loads((ref / "merge_report.json").read_text())["units"]["total"]
    out = tmp_path / "out"
    cfg = write_cfg(tmp_path / "m.yaml", zoo, out, "emr")
    interrupt_after(monkeypatch, total - 1)
    rc, err = cli(capsys, "merge", cfg)
    monkeypatch.undo()
    assert rc == EXIT_INTERRUPTED, err
    staging = staging_of(out)
    logged = records(staging)
    assert len(logged) == total - 1

    masked = [(u, w, a, b) for u, r in logged.items() for w, a, b, _ in r["out"] if "zarr" in w]
    u_mask, key, b0, _ = masked[0]
    arr = zarr.open_array(str(staging / key))
    chunk = staging / key / arr.metadata.encode_chunk_key((1, b0, 0))
    assert chunk.is_file()
    chunk.write_bytes(chunk.read_bytes()[:3])
    task_shard = next(w for r in logged.values() for w, *_ in r["out"] if w.startswith("tasks/t0/"))
    in_task = {u for u, r in logged.items() if any(w == task_shard for w, *_ in r["out"])}
    os.truncate(staging / task_shard, 0)

    rc, err = cli(capsys, "merge", cfg, "--resume")
    assert rc == EXIT_OK, err
    report = json.loads((out / "merge_report.json").read_text())
    assert report["units"]["reused"] == total - 1 - len(in_task | {u_mask})
    assert model_files(out) == model_files(ref)
    assert verified(out)


def test_ties_reruns_log_their_final_checksum(tmp_path, capsys, monkeypatch):
    """Blocks of a split TIES tensor rerun with the majority sign are logged again
    with their new bytes' crc32 (the last record of a unit wins), so a resume once
    everything ran reuses every unit, and publishes the uninterrupted bytes.

    The tensor of test_merge_exact's TIES case: half the votes cancel exactly and
    the majority is -1, against the provisional +1 of the split run."""
    import torch
    from checkpoints import write_checkpoint

    g = torch.Generator().manual_seed(3)
    base = torch.randn(64, 32, generator=g)
    x = torch.rand(64, 32, generator=g) + 0.1
    cancel = torch.rand(64, 32, generator=g) < 0.5
    paths = [
        write_checkpoint(str(tmp_path / name), {"w": t})
        for name, t in (
            ("base", base),
            ("m1", torch.where(cancel, base + x, base - x)),
            ("m2", torch.where(cancel, base - x, base - 2 * x)),
        )
    ]

    def cfg(out: Path) -> str:
        raw = {
            "base": paths[0],
            "models": [{"path": paths[1]}, {"path": paths[2]}],
            "merge": {"method": "ties"},
            "output": {"path": str(out)},
            "runtime": {**RUNTIME, "block_elements": 64, "max_unit_elements": 128},
        }
        path = out.parent / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return str(path)

    ref = tmp_path / "ref"
    assert main(["-q", "merge", cfg(ref)]) == EXIT_OK
    total = json.loads((ref / "merge_report.json").read_text())["units"]["total"]
    out = tmp_path / "out"
    stop_at_publish(monkeypatch)
    rc, err = cli(capsys, "merge", cfg(out))
    monkeypatch.undo()
    assert rc == EXIT_INTERRUPTED, err
    lines = [json.loads(ln) for ln in (staging_of(out) / ".tadmerge/units.jsonl").open()]
    first: dict[int, list] = {}
    rerun = set()
    for rec in lines:
        if rec["unit"] in first and rec["out"] != first[rec["unit"]]:
            rerun.add(rec["unit"])
        first.setdefault(rec["unit"], rec["out"])
    assert rerun, "some blocks must be rerun with other bytes"
    rc, err = cli(capsys, "merge", cfg(out), "--resume")
    assert rc == EXIT_OK, err
    assert json.loads((out / "merge_report.json").read_text())["units"]["reused"] == total
    assert model_files(out) == model_files(ref)
    assert verified(out)


# ------------------------------------------------------------------------------------
# 3. the publish window
# ------------------------------------------------------------------------------------


def test_kill_before_the_rename(zoo, tmp_path, capsys):
    """Killed with the manifest written and staging not renamed: nothing published,
    the fingerprint still guards the staging directory (a changed config is
    refused), and --resume publishes the uninterrupted bytes."""
    ref = reference(zoo)
    out = tmp_path / "out"
    cfg = write_cfg(tmp_path / "m.yaml", zoo, out)
    p = kill_at("before-rename", "merge", cfg)
    assert p.returncode == -signal.SIGKILL, p.stderr
    staging = staging_of(out)
    assert not out.exists()
    assert (staging / "manifest.json").is_file()
    assert (staging / ".tadmerge" / "fingerprint").is_file()

    changed = write_cfg(tmp_path / "changed.yaml", zoo, out, scale=0.5)
    rc, err = cli(capsys, "merge", changed, "--resume")
    assert rc == EXIT_CONFIG and "changed since the interrupted merge" in err, err
    assert not out.exists()

    rc, err = cli(capsys, "merge", cfg, "--resume")
    assert rc == EXIT_OK, err
    assert not staging.exists() and not (out / ".tadmerge").exists()
    assert model_files(out) == model_files(ref)
    assert verified(out)


def test_kill_after_the_rename(zoo, tmp_path, capsys):
    """Killed right after the rename: the output is complete (its `.tadmerge/` not
    yet removed: verify passes over it, it holds no weights). The next run,
    whatever its config, finishes that publish and reuses nothing: --resume says
    there is nothing to resume."""
    ref = reference(zoo)
    out = tmp_path / "out"
    cfg = write_cfg(tmp_path / "m.yaml", zoo, out)
    p = kill_at("after-rename", "merge", cfg)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert not staging_of(out).exists()
    assert (out / ".tadmerge" / "fingerprint").is_file()
    files = model_files(out)
    assert {k: v for k, v in files.items() if not k.startswith(".tadmerge")} == model_files(ref)
    assert verified(out)

    changed = write_cfg(tmp_path / "changed.yaml", zoo, out, scale=0.5)
    rc, err = cli(capsys, "merge", changed, "--resume")
    assert rc == EXIT_CONFIG and "already published" in err and "nothing to resume" in err, err
    assert not (out / ".tadmerge").exists() and not staging_of(out).exists()
    assert model_files(out) == model_files(ref)
    assert verified(out)


def test_resume_of_files_without_a_fingerprint_is_refused(zoo, tmp_path, capsys):
    """A staging directory that holds files but no fingerprint (left mid-publish by
    an older tadmerge, which removed its state first) is never resumed."""
    ref = reference(zoo)
    out = tmp_path / "out"
    shutil.copytree(ref, staging_of(out))
    changed = write_cfg(tmp_path / "changed.yaml", zoo, out, scale=0.5)
    rc, err = cli(capsys, "merge", changed, "--resume")
    assert rc == EXIT_CONFIG and "no plan fingerprint" in err, err
    assert not out.exists()


# ------------------------------------------------------------------------------------
# 4. --overwrite
# ------------------------------------------------------------------------------------


def test_overwrite_refuses_an_output_holding_user_files(zoo, tmp_path, capsys):
    """Files added to an earlier output, or listed files whose size changed: exit 2
    before any data work (no staging directory), naming at most 10 of them."""
    out = tmp_path / "out"
    old = write_cfg(tmp_path / "old.yaml", zoo, out, scale=0.5)
    assert main(["-q", "merge", old]) == EXIT_OK
    before = model_files(out)
    cfg = write_cfg(tmp_path / "m.yaml", zoo, out)
    (out / "eval").mkdir()
    for i in range(12):
        (out / "eval" / f"results{i:02d}.json").write_text("{}")
    rc, err = cli(capsys, "merge", cfg, "--overwrite")
    assert rc == EXIT_CONFIG, err
    assert "12 file(s) that are not in its manifest.json" in err
    assert "eval/results00.json" in err and "eval/results09.json" in err
    assert "eval/results10.json" not in err and "(and 2 more)" in err
    assert not staging_of(out).exists()
    assert len(model_files(out)) == len(before) + 12

    shutil.rmtree(out / "eval")
    with open(out / "config.json", "a") as f:
        f.write(" ")
    rc, err = cli(capsys, "merge", cfg, "--overwrite")
    assert rc == EXIT_CONFIG and "changed since it was published: config.json" in err, err
    assert not staging_of(out).exists()


def test_user_file_added_during_the_merge_stops_the_publish(zoo, tmp_path, capsys, monkeypatch):
    """The check again at publish: a file added to the old output while merging
    keeps it in place (exit 2, staging kept); moved away, --resume publishes."""
    ref = reference(zoo)
    out = tmp_path / "out"
    assert main(["-q", "merge", write_cfg(tmp_path / "old.yaml", zoo, out, scale=0.5)]) == 0
    old = model_files(out)
    cfg = write_cfg(tmp_path / "m.yaml", zoo, out)
    real = publish.write_manifest

    def user_adds_then_manifest(directory, **kw):
        (out / "adapter.safetensors").write_bytes(b"user's")
        return real(directory, **kw)

    monkeypatch.setattr(publish, "write_manifest", user_adds_then_manifest)
    rc, err = cli(capsys, "merge", cfg, "--overwrite")
    monkeypatch.undo()
    assert rc == EXIT_CONFIG, err
    assert "adapter.safetensors" in err and "--resume" in err
    assert (out / "adapter.safetensors").read_bytes() == b"user's"
    assert model_files(out) == {**old, "adapter.safetensors": b"user's"}
    assert staging_of(out).is_dir()

    (out / "adapter.safetensors").rename(tmp_path / "adapter.safetensors")
    rc, err = cli(capsys, "merge", cfg, "--resume", "--overwrite")
    assert rc == EXIT_OK, err
    assert model_files(out) == model_files(ref) and verified(out)
    assert asides(tmp_path) == [] and not staging_of(out).exists()


@pytest.mark.parametrize("point", ["after-rename", "before-state-removal"])
def test_overwrite_killed_after_the_swap(zoo, tmp_path, capsys, point):
    """RENAME_EXCHANGE puts the new output in place in one step: a kill after it
    leaves the new output complete; the next run finishes (deletes the old one,
    which held only its manifest's files, and the state folder)."""
    ref = reference(zoo)
    out = tmp_path / "out"
    assert main(["-q", "merge", write_cfg(tmp_path / "old.yaml", zoo, out, scale=0.5)]) == 0
    cfg = write_cfg(tmp_path / "m.yaml", zoo, out)
    p = kill_at(point, "merge", cfg, "--overwrite")
    assert p.returncode == -signal.SIGKILL, p.stderr
    new = {k: v for k, v in model_files(out).items() if not k.startswith(".tadmerge")}
    assert new == model_files(ref)
    assert (out / ".tadmerge").is_dir()
    if point == "after-rename":  # the old output sits at the staging name
        assert (staging_of(out) / "manifest.json").is_file() and asides(tmp_path) == []
    else:
        assert not staging_of(out).exists() and len(asides(tmp_path)) == 1

    rc, err = cli(capsys, "merge", cfg, "--resume")
    assert rc == EXIT_CONFIG and "nothing to resume" in err, err
    assert not staging_of(out).exists() and asides(tmp_path) == []
    assert model_files(out) == model_files(ref) and verified(out)


def test_overwrite_without_rename_exchange(zoo, tmp_path, capsys):
    """Where RENAME_EXCHANGE is missing: old output renamed aside, then staging in.
    Killed between the two, there is no output for a moment (documented); the
    resume publishes and deletes the aside, a verifiable earlier output."""
    ref = reference(zoo)
    out = tmp_path / "out"
    assert main(["-q", "merge", write_cfg(tmp_path / "old.yaml", zoo, out, scale=0.5)]) == 0
    cfg = write_cfg(tmp_path / "m.yaml", zoo, out)
    p = kill_at("dance-between", "merge", cfg, "--overwrite")
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert not out.exists() and len(asides(tmp_path)) == 1
    rc, err = cli(capsys, "merge", cfg, "--resume", "--overwrite")
    assert rc == EXIT_OK, err
    assert asides(tmp_path) == [] and not staging_of(out).exists()
    assert model_files(out) == model_files(ref) and verified(out)


def fill(directory: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (directory / rel).parent.mkdir(parents=True, exist_ok=True)
        (directory / rel).write_bytes(data)


def test_overwrite_swaps_and_keeps_what_is_not_verifiably_an_output(tmp_path, monkeypatch):
    """Staging API: the swap is one RENAME_EXCHANGE; leftover asides are deleted
    only when they hold nothing but their manifest's files."""
    out = tmp_path / "out"
    s = publish.Staging(str(out))
    fill(Path(s.path), {"a.bin": b"1"})
    s.publish()
    for name, extra in (("ok", {}), ("user", {"notes.txt": b"mine"})):
        aside = tmp_path / f".out.tadmerge-old-{name}"
        shutil.copytree(out, aside)
        fill(aside, extra)
    (tmp_path / ".out.tadmerge-old-foreign").mkdir()
    fill(tmp_path / ".out.tadmerge-old-foreign", {"x": b"?"})

    swaps = []
    real = publish._rename_exchange

    def exchange(a, b):
        swaps.append((a, b))
        return real(a, b)

    monkeypatch.setattr(publish, "_rename_exchange", exchange)
    s = publish.Staging(str(out), overwrite=True)
    fill(Path(s.path), {"a.bin": b"2"})
    s.publish()
    assert swaps == [(s.path, str(out))]
    assert (out / "a.bin").read_bytes() == b"2" and publish.verify_output(str(out)) == []
    assert asides(tmp_path) == [".out.tadmerge-old-foreign", ".out.tadmerge-old-user"]
    assert (tmp_path / ".out.tadmerge-old-user" / "notes.txt").read_bytes() == b"mine"


# ------------------------------------------------------------------------------------
# 9. the lock
# ------------------------------------------------------------------------------------

HOLDER = """
import sys
sys.path.insert(0, sys.argv[1])
from tadmerge.io.publish import Staging
s = Staging(sys.argv[2], resume=True)
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_staging_directory_in_use_is_refused(zoo, tmp_path, capsys):
    """While another process holds the staging directory, --resume and a plain run
    are refused naming its pid, host and start; killed, its lock is gone."""
    ref = reference(zoo)
    out = tmp_path / "out"
    cfg = write_cfg(tmp_path / "m.yaml", zoo, out)
    p = kill_at("units=3", "merge", cfg)
    assert p.returncode == -signal.SIGKILL, p.stderr
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(REPO), str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        for argv in (("--resume",), ()):
            rc, err = cli(capsys, "merge", cfg, *argv)
            assert rc == EXIT_CONFIG, err
            assert f"in use by another tadmerge run (pid {holder.pid} on host " in err
            assert socket.gethostname() in err and "started" in err
    finally:
        holder.kill()  # SIGKILL: no cleanup
        holder.wait()
    rc, err = cli(capsys, "merge", cfg, "--resume")
    assert rc == EXIT_OK, err
    assert model_files(out) == model_files(ref) and verified(out)
