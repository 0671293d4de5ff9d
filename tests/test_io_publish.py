"""Staging / manifest / atomic publish, refusals, and verification."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from tadmerge.errors import OutputError, VerifyError
from tadmerge.io.publish import (
    MANIFEST_FORMAT,
    Staging,
    check_output_outside_inputs,
    require_verified,
    verify_output,
    write_manifest,
)


def fill(directory: str, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = os.path.join(directory, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(data)


FILES = {"model.safetensors": b"\x08" + b"w" * 100, "config.json": b"{}", "sub/tok.txt": b"t"}


def published(tmp_path, files=FILES) -> str:
    s = Staging(str(tmp_path / "out"))
    fill(s.path, files)
    return s.publish()


def test_atomic_publish(tmp_path) -> None:
    out = tmp_path / "out"
    s = Staging(str(out))
    assert s.path == str(tmp_path / ".out.tadmerge-staging") and os.path.isdir(s.path)
    fill(s.path, FILES)
    assert not out.exists()  # nothing named like the output before the rename
    assert s.publish() == str(out)
    assert not os.path.exists(s.path)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == MANIFEST_FORMAT
    assert [e["path"] for e in manifest["files"]] == sorted(FILES)
    for e in manifest["files"]:
        data = FILES[e["path"]]
        assert e["size"] == len(data) and e["sha256"] == hashlib.sha256(data).hexdigest()
    assert verify_output(str(out)) == []
    require_verified(str(out))
    assert sorted(os.listdir(tmp_path)) == ["out"]
    with pytest.raises(OutputError):
        s.publish()


def test_refusals(tmp_path) -> None:
    out = published(tmp_path)
    with pytest.raises(OutputError, match=r"already exists; pass --overwrite"):
        Staging(out)
    with pytest.raises(OutputError, match=r"--resume requested but there is no staging"):
        Staging(str(tmp_path / "other"), resume=True)
    Staging(str(tmp_path / "other"))  # interrupted: staging left behind
    with pytest.raises(OutputError) as info:
        Staging(str(tmp_path / "other"))
    msg = str(info.value)
    assert str(tmp_path / ".other.tadmerge-staging") in msg and "--resume" in msg
    assert "\n" not in msg


def test_resume_keeps_staging_contents(tmp_path) -> None:
    s = Staging(str(tmp_path / "out"))
    fill(s.path, {"part.bin": b"done"})
    with pytest.raises(OutputError, match=rf"in use by another tadmerge run \(pid {os.getpid()} "):
        Staging(str(tmp_path / "out"), resume=True)  # s holds the lock until closed
    s.close()
    s2 = Staging(str(tmp_path / "out"), resume=True)
    assert s2.path == s.path and os.path.exists(os.path.join(s2.path, "part.bin"))
    assert os.path.exists(s2.publish())


def test_overwrite_replaces_previous_output(tmp_path) -> None:
    out = published(tmp_path)
    s = Staging(out, overwrite=True)
    fill(s.path, {"model.safetensors": b"new"})
    s.publish()
    assert open(os.path.join(out, "model.safetensors"), "rb").read() == b"new"
    assert not os.path.exists(os.path.join(out, "config.json"))
    assert verify_output(out) == []
    assert sorted(os.listdir(tmp_path)) == ["out"]  # old output deleted, no asides left


def test_overwrite_refuses_foreign_directory(tmp_path) -> None:
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("x")
    with pytest.raises(OutputError, match="not a tadmerge output"):
        Staging(str(foreign), overwrite=True)
    (tmp_path / "empty").mkdir()
    s = Staging(str(tmp_path / "empty"), overwrite=True)
    fill(s.path, {"a": b"1"})
    s.publish()


def test_output_appearing_during_merge(tmp_path) -> None:
    s = Staging(str(tmp_path / "out"))
    fill(s.path, {"a": b"1"})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("someone else's")
    with pytest.raises(OutputError, match="appeared while merging"):
        s.publish()
    assert os.path.isdir(s.path)  # kept for --resume


def test_symlink_in_staging_refused(tmp_path) -> None:
    s = Staging(str(tmp_path / "out"))
    os.symlink("/etc/hostname", os.path.join(s.path, "config.json"))
    with pytest.raises(OutputError, match="not a regular file"):
        s.publish()


def test_verify_detects_tampering(tmp_path) -> None:
    out = published(tmp_path)
    path = os.path.join(out, "model.safetensors")
    data = bytearray(open(path, "rb").read())
    data[50] ^= 0x01
    open(path, "wb").write(bytes(data))
    os.remove(os.path.join(out, "sub", "tok.txt"))
    open(os.path.join(out, "extra.bin"), "wb").write(b"?")
    open(os.path.join(out, "config.json"), "wb").write(b"{} ")
    problems = verify_output(out)
    text = "\n".join(problems)
    assert len(problems) == 4
    assert f"{path}: sha256 differs" in text
    assert os.path.join(out, "sub", "tok.txt") + ": missing" in text
    assert os.path.join(out, "extra.bin") + ": not in the manifest" in text
    assert "config.json: size 3, manifest says 2" in text
    with pytest.raises(VerifyError):
        require_verified(out)
    os.remove(os.path.join(out, "manifest.json"))
    assert verify_output(out) == [os.path.join(out, "manifest.json") + ": missing"]


def test_write_manifest_standalone(tmp_path) -> None:
    fill(str(tmp_path), {"b": b"2", "a/c": b"3"})
    m = write_manifest(str(tmp_path))
    assert [e["path"] for e in m["files"]] == ["a/c", "b"]
    assert json.loads((tmp_path / "manifest.json").read_text()) == m
    assert write_manifest(str(tmp_path)) == m  # the manifest does not list itself


def test_output_outside_inputs(tmp_path) -> None:
    inp = tmp_path / "models" / "a"
    inp.mkdir(parents=True)
    check_output_outside_inputs(str(tmp_path / "models" / "merged"), [str(inp)])
    with pytest.raises(OutputError, match="is the input"):
        check_output_outside_inputs(str(inp), [str(inp)])
    with pytest.raises(OutputError, match="inside the input"):
        check_output_outside_inputs(str(inp / "out"), [str(inp)])
    with pytest.raises(OutputError, match="is inside the output"):
        check_output_outside_inputs(str(tmp_path / "models"), [str(inp)])
    link = tmp_path / "link"
    os.symlink(inp, link)
    with pytest.raises(OutputError):
        check_output_outside_inputs(str(link / "merged"), [str(inp)])


def test_rename_noreplace_never_replaces(tmp_path) -> None:
    from tadmerge.io.publish import _rename_noreplace

    (tmp_path / "src").mkdir()
    (tmp_path / "dst").mkdir()  # plain rename(2) would silently replace an empty dir
    with pytest.raises(OSError):
        _rename_noreplace(str(tmp_path / "src"), str(tmp_path / "dst"))
    _rename_noreplace(str(tmp_path / "src"), str(tmp_path / "new"))
    assert (tmp_path / "new").is_dir()


def test_streamed_digests_follow_the_finished_prefix(tmp_path) -> None:
    """Ranges final in any order are hashed once their prefix is complete; a file
    with a gap, or one that is shorter than said, gets no streamed digest (the
    manifest hashes it), and a streamed digest is used only at the same size."""
    from tadmerge.io import digest

    data = os.urandom(3 * digest._READ_BLOCK + 123)
    fill(str(tmp_path), {"a": data, "gap": data, "short": data[:50]})
    d = digest.StreamingDigests(str(tmp_path), {"a": len(data), "gap": 200, "short": 100})
    cuts = [0, 7, 4096, digest._READ_BLOCK + 5, len(data) - 1, len(data)]
    ranges = list(zip(cuts, cuts[1:], strict=False))
    for r in ranges[::-1] + ranges[:2]:  # out of order, some twice
        d.final("a", *r)
    d.final("gap", 0, 100)
    d.final("gap", 101, 200)
    d.final("short", 0, 100)
    d.final("unknown", 0, 10)
    got = d.finish()
    assert got == {"a": (len(data), hashlib.sha256(data).hexdigest())}
    manifest = write_manifest(str(tmp_path), known=got)
    sha = {e["path"]: e["sha256"] for e in manifest["files"]}
    assert sha["a"] == sha["gap"] == hashlib.sha256(data).hexdigest()
    # a known digest for a file whose size changed is not taken
    manifest = write_manifest(str(tmp_path), known={"short": (100, "0" * 64)})
    sha = {e["path"]: e["sha256"] for e in manifest["files"]}
    assert sha["short"] == hashlib.sha256(data[:50]).hexdigest()


def test_hashed_ranges_are_handed_to_the_disk(tmp_path, monkeypatch) -> None:
    """Each stretch hashed is passed to sync_file_range (write-back started
    early, advice only): together the ranges cover the file once, in order."""
    from tadmerge.io import digest

    calls: list[tuple[int, int, int]] = []
    monkeypatch.setattr(
        digest, "_sync_file_range", lambda fd, a, n, flags: calls.append((a, n, flags))
    )
    data = os.urandom(2 * digest._READ_BLOCK + 17)
    fill(str(tmp_path), {"a": data})
    d = digest.StreamingDigests(str(tmp_path), {"a": len(data)})
    for a, b in ((digest._READ_BLOCK, len(data)), (0, digest._READ_BLOCK)):
        d.final("a", a, b)
    assert d.finish()["a"] == (len(data), hashlib.sha256(data).hexdigest())
    assert calls and all(f == digest._SYNC_FILE_RANGE_WRITE for *_, f in calls)
    ends = [0]
    for a, n, _ in calls:
        assert a == ends[-1] and n > 0
        ends.append(a + n)
    assert ends[-1] == len(data)
