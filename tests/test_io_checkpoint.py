"""open_checkpoint: directories, single files, indexes, hostile paths, pickles, hub ids."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from tadmerge.errors import InputError
from tadmerge.io.block_io import read_rows
from tadmerge.io.checkpoint import Checkpoint, open_checkpoint


def expect_error(source: str, **kw) -> tuple[InputError, str]:
    with pytest.raises(InputError) as info:
        open_checkpoint(source, **kw)
    return info.value, str(info.value)


def sharded(root, shards: dict[str, dict[str, torch.Tensor]], weight_map=None) -> str:
    """Write shards and an index (by default the true weight map) into ``root``."""
    root.mkdir(exist_ok=True)
    true_map = {}
    for fname, tensors in shards.items():
        save_file(tensors, str(root / fname))
        true_map.update({k: fname for k in tensors})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map or true_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    return str(root)


def T(*shape: int) -> torch.Tensor:
    return torch.randn(*shape)


def test_single_file_directory_with_extras(tmp_path) -> None:
    d = tmp_path / "ck"
    d.mkdir()
    save_file({"w": T(2, 3), "b": T(3)}, str(d / "model.safetensors"))
    for name in ["config.json", "tokenizer.json", "merges.txt", "tokenizer.model"]:
        (d / name).write_text("{}")
    (d / "adapter_config.json").write_text("{}")  # must not be copied into an output
    (d / "training_args.bin").write_bytes(b"junk")
    ck = open_checkpoint(str(d))
    assert isinstance(ck, Checkpoint)
    assert ck.root == str(d) and ck.files == (str(d / "model.safetensors"),)
    assert set(ck.tensors) == {"w", "b"} and ck.revision is None
    assert sorted(os.path.basename(p) for p in ck.extra_files) == sorted(
        ["config.json", "tokenizer.json", "merges.txt", "tokenizer.model"]
    )
    assert ck.total_bytes == (6 + 3) * 4


def test_single_file_path_and_preference(tmp_path) -> None:
    d = tmp_path / "ck"
    d.mkdir()
    save_file({"w": T(2)}, str(d / "model.safetensors"))
    save_file({"x": T(2)}, str(d / "other.safetensors"))
    (d / "config.json").write_text("{}")
    assert set(open_checkpoint(str(d)).tensors) == {"w"}  # model.safetensors preferred
    ck = open_checkpoint(str(d / "other.safetensors"))
    assert set(ck.tensors) == {"x"} and ck.root == str(d)
    assert ck.extra_files == (str(d / "config.json"),)


def test_several_unindexed_files(tmp_path) -> None:
    d = tmp_path / "ck"
    d.mkdir()
    save_file({"a": T(2)}, str(d / "a.safetensors"))
    save_file({"b": T(2)}, str(d / "b.safetensors"))
    _, msg = expect_error(str(d))
    assert "several safetensors files" in msg and "a.safetensors" in msg and "b.safetensors" in msg


def test_sharded_index_good(tmp_path) -> None:
    a, b = T(4, 2), T(3)
    root = sharded(
        tmp_path / "ck",
        {
            "model-00001-of-00002.safetensors": {"a": a},
            "model-00002-of-00002.safetensors": {"b": b},
        },
    )
    ck = open_checkpoint(root)
    assert len(ck.files) == 2 and list(ck.tensors) == ["a", "b"]
    assert torch.equal(read_rows(ck.tensors["a"], 0, 4).reshape(4, 2), a)


def test_index_naming_missing_file(tmp_path) -> None:
    root = sharded(
        tmp_path / "ck",
        {"s1.safetensors": {"a": T(2)}},
        {"a": "s1.safetensors", "b": "gone.safetensors"},
    )
    _, msg = expect_error(root)
    assert os.path.join(root, "gone.safetensors") in msg and "does not exist" in msg


@pytest.mark.parametrize("bad", ["../x.safetensors", "sub/../../x.safetensors"])
def test_index_dotdot_escape(tmp_path, bad) -> None:
    save_file({"b": T(2)}, str(tmp_path / "x.safetensors"))  # exists, but outside the root
    root = sharded(
        tmp_path / "ck", {"s1.safetensors": {"a": T(2)}}, {"a": "s1.safetensors", "b": bad}
    )
    err, msg = expect_error(root)
    assert "'..'" in msg and "model.safetensors.index.json" in msg
    assert any(p.tensor == "b" for p in err.problems)


def test_index_absolute_path(tmp_path) -> None:
    outside = tmp_path / "x.safetensors"
    save_file({"b": T(2)}, str(outside))
    root = sharded(
        tmp_path / "ck", {"s1.safetensors": {"a": T(2)}}, {"a": "s1.safetensors", "b": str(outside)}
    )
    _, msg = expect_error(root)
    assert "absolute path" in msg and str(outside) in msg


def test_symlink_escaping_root(tmp_path) -> None:
    outside = tmp_path / "secret.safetensors"
    save_file({"b": T(2)}, str(outside))
    root = sharded(
        tmp_path / "ck",
        {"s1.safetensors": {"a": T(2)}},
        {"a": "s1.safetensors", "b": "s2.safetensors"},
    )
    os.symlink(outside, os.path.join(root, "s2.safetensors"))
    os.symlink("/etc/hostname", os.path.join(root, "config.json"))
    _, msg = expect_error(root)
    assert "s2.safetensors" in msg and "symlink escape refused" in msg
    assert os.path.join(root, "config.json") in msg
    # a symlink that stays inside the root is fine
    os.remove(os.path.join(root, "s2.safetensors"))
    os.remove(os.path.join(root, "config.json"))
    os.makedirs(os.path.join(root, "real"))
    save_file({"b": T(2)}, os.path.join(root, "real", "s2.safetensors"))
    os.symlink(os.path.join(root, "real", "s2.safetensors"), os.path.join(root, "s2.safetensors"))
    assert set(open_checkpoint(root).tensors) == {"a", "b"}


def test_symlink_escaping_unindexed_single_file(tmp_path) -> None:
    outside = tmp_path / "elsewhere.safetensors"
    save_file({"b": T(2)}, str(outside))
    d = tmp_path / "ck"
    d.mkdir()
    os.symlink(outside, d / "model.safetensors")
    _, msg = expect_error(str(d))
    assert "symlink escape refused" in msg


def test_tensor_in_two_shards_and_unnamed_and_missing(tmp_path) -> None:
    root = sharded(
        tmp_path / "ck",
        {
            "s1.safetensors": {"a": T(2), "dup": T(2), "stray": T(1)},
            "s2.safetensors": {"b": T(2), "dup": T(2)},
        },
        {
            "a": "s1.safetensors",
            "dup": "s1.safetensors",
            "b": "s2.safetensors",
            "ghost": "s2.safetensors",
        },
    )
    err, msg = expect_error(root)
    by = {p.tensor: (p.file, p.message) for p in err.problems}
    assert "present in two shards" in by["dup"][1]
    assert by["stray"][0].endswith("s1.safetensors") and "not named by" in by["stray"][1]
    assert by["ghost"][0].endswith("s2.safetensors") and "missing from this shard" in by["ghost"][1]


def test_all_files_problems_in_one_error(tmp_path) -> None:
    root = sharded(tmp_path / "ck", {"s1.safetensors": {"a": T(2)}, "s2.safetensors": {"b": T(2)}})
    for name in ["s1.safetensors", "s2.safetensors"]:
        p = os.path.join(root, name)
        data = open(p, "rb").read()
        open(p, "wb").write(data[:-3])  # truncate both shards
    err, msg = expect_error(root)
    files = {os.path.basename(p.file) for p in err.problems}
    assert files == {"s1.safetensors", "s2.safetensors"}
    assert msg.count("truncated: needs") == 2


def test_bad_index_json(tmp_path) -> None:
    d = tmp_path / "ck"
    d.mkdir()
    (d / "model.safetensors.index.json").write_text("{nope")
    _, msg = expect_error(str(d))
    assert "index is not valid JSON" in msg
    (d / "model.safetensors.index.json").write_text('{"weight_map": [1]}')
    _, msg = expect_error(str(d))
    assert "weight_map" in msg


def test_missing_path_and_empty_dir(tmp_path) -> None:
    _, msg = expect_error(str(tmp_path / "nope" / "x"))
    assert "no such file or directory" in msg
    _, msg = expect_error("./definitely-missing-dir")
    assert "no such file or directory" in msg
    _, msg = expect_error("missing/model.safetensors")  # not treated as a repo id
    assert "no such file or directory" in msg
    (tmp_path / "empty").mkdir()
    _, msg = expect_error(str(tmp_path / "empty"))
    assert "no weights found" in msg


# --------------------------------------------------------------------------- pickles


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    c = tmp_path / "cache"
    monkeypatch.setenv("TADMERGE_CACHE_DIR", str(c))
    return c


def test_pickle_refused_by_default_then_loaded(tmp_path, cache) -> None:
    d = tmp_path / "ck"
    d.mkdir()
    sd = {"w": T(3, 2), "h": torch.ones(4, dtype=torch.bfloat16), "s": torch.tensor(7)}
    torch.save(sd, d / "pytorch_model.bin")
    torch.save({"not": "weights"}, d / "training_args.bin")
    (d / "config.json").write_text("{}")
    _, msg = expect_error(str(d))
    assert str(d / "pytorch_model.bin") in msg
    assert "never unpickled by default" in msg and "allow_pickle: true" in msg
    assert not cache.exists()

    ck = open_checkpoint(str(d), allow_pickle=True)
    (converted,) = ck.files
    assert converted.startswith(str(cache / "converted")) and converted.endswith(
        "/model.safetensors"
    )
    assert ck.root == str(d) and ck.extra_files == (str(d / "config.json"),)
    loaded = load_file(converted)
    assert set(loaded) == set(sd)
    for k, v in sd.items():
        assert torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype
    mtime = os.stat(converted).st_mtime_ns
    assert open_checkpoint(str(d), allow_pickle=True).files == (converted,)  # cache hit
    assert os.stat(converted).st_mtime_ns == mtime
    assert not [n for n in os.listdir(cache / "converted") if n.startswith(".")]


def test_single_pickle_file_path(tmp_path, cache) -> None:
    p = tmp_path / "weights.pt"
    torch.save({"a": T(2)}, p)
    _, msg = expect_error(str(p))
    assert "allow_pickle: true" in msg
    assert set(open_checkpoint(str(p), allow_pickle=True).tensors) == {"a"}


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_malicious_pickle_not_executed(tmp_path, cache, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "ck"
    d.mkdir()
    torch.save({"w": T(2), "evil": _Evil()}, d / "pytorch_model.bin")
    _, msg = expect_error(str(d), allow_pickle=True)
    assert "weights_only=True" in msg and str(d / "pytorch_model.bin") in msg
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


# --------------------------------------------------------------------------- hub


def test_offline_repo_id(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err, msg = expect_error("tadmerge-test-org/no-such-model-0123")
    assert "tadmerge-test-org/no-such-model-0123" in msg
    assert "not in the local cache" in msg and "unreachable" in msg
    _, msg = expect_error("tadmerge-test-org/no-such-model-0123@v1.0")
    assert "@v1.0" in msg


def test_hub_snapshot_layout_with_blob_symlinks(tmp_path, monkeypatch) -> None:
    """Hub snapshots are symlinks into ../../blobs: inside the repo cache, so allowed.
    (Offline: the cached snapshot is opened whole; online hub inputs are planned from
    their headers first: tests/test_hub_inputs.py.)"""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--org--name"
    blobs, snap = repo / "blobs", repo / "snapshots" / sha
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    save_file({"w": T(2, 2)}, str(blobs / "b1"))
    (blobs / "b2").write_text("{}")
    os.symlink("../../blobs/b1", snap / "model.safetensors")
    os.symlink("../../blobs/b2", snap / "config.json")
    calls = {}

    def fake_snapshot_download(repo_id, **kw):
        calls.update(kw, repo_id=repo_id)
        return str(snap)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    ck = open_checkpoint("org/name@main")
    assert calls["repo_id"] == "org/name" and calls["revision"] == "main"
    assert calls["local_files_only"] is True
    assert "*.safetensors" in calls["allow_patterns"]
    assert ck.revision == sha and ck.source == "org/name@main" and set(ck.tensors) == {"w"}
    assert ck.extra_files == (str(snap / "config.json"),)
