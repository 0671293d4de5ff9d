"""output.push_to_hub / --push-to-hub / tadmerge push: the upload plan, checked with
huggingface_hub's HfApi methods monkeypatched to record their arguments (this
machine has no hub access: nothing here reaches the network)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from checkpoints import SPLIT_RUNTIME, write_zoo
from outputs import run_cli

from tadmerge.cli import main
from tadmerge.errors import EXIT_CONFIG, EXIT_INPUT, EXIT_OK, EXIT_RUNTIME, ConfigError


class Recorder:
    """HfApi's network methods, recording (name, args) instead of calling the hub."""

    def __init__(self, monkeypatch, fail: Exception | None = None, large: bool = False):
        import huggingface_hub

        self.calls: list[tuple[str, dict]] = []
        self.fail = fail
        self.commits: list = []
        self.remote: list = []  # get_paths_info's answer: the repo's files
        self.listing: list[str] = []  # list_repo_files's answer
        api = huggingface_hub.HfApi

        def rec(name):
            def f(_self, *args, **kw):
                self.calls.append((name, {"args": args, **kw}))
                if self.fail is not None and name != "create_repo":
                    raise self.fail
                if name == "create_repo":
                    return f"https://huggingface.co/{args[0]}"
                if name == "list_repo_commits":
                    return self.commits
                if name == "get_paths_info":
                    return self.remote
                if name == "list_repo_files":
                    return list(self.listing)
                return None

            return f

        for name in (
            "create_repo", "upload_folder", "create_tag", "list_repo_commits", "get_paths_info",
            "list_repo_files", "create_commit",
        ):  # fmt: skip
            monkeypatch.setattr(api, name, rec(name))
        if large:
            monkeypatch.setattr(
                api, "upload_large_folder", rec("upload_large_folder"), raising=False
            )
        else:
            monkeypatch.delattr(api, "upload_large_folder", raising=False)

    def named(self, name: str) -> list[dict]:
        return [kw for n, kw in self.calls if n == name]


def write_cfg(tmp: Path, **output) -> str:
    bp, mps, _, _ = write_zoo(str(tmp / "in"), k=2)
    cfg = {
        "base": bp,
        "models": [{"path": p, "name": f"m{i}"} for i, p in enumerate(mps)],
        "merge": {"method": "task_arithmetic", "scale": 0.5},
        "output": {"path": str(tmp / "out"), **output},
        "runtime": dict(SPLIT_RUNTIME),
    }
    path = tmp / "merge.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


def manifest_files(out: Path) -> list[str]:
    doc = json.loads((out / "manifest.json").read_text())
    return sorted([e["path"] for e in doc["files"]] + ["manifest.json"])


def test_config_keys_validated_and_outside_the_fingerprint(tmp_path):
    from tadmerge.config import load_config
    from tadmerge.planners.plan import make_plan

    plain = load_config(write_cfg(tmp_path))
    assert plain.output.push_to_hub is None and plain.output.hub_private is True
    assert "push_to_hub" not in plain.to_dict()["output"]  # (merge_config.yaml unchanged)
    pushed = load_config(write_cfg(tmp_path, push_to_hub="org/name", hub_private=False))
    assert pushed.output.push_to_hub == "org/name" and pushed.output.hub_private is False
    assert make_plan(pushed).fingerprint == make_plan(plain).fingerprint
    for bad in ("org/na me", "a/b/c", "org/--name", 7):
        with pytest.raises(ConfigError, match="output.push_to_hub"):
            load_config(write_cfg(tmp_path, push_to_hub=bad))
    with pytest.raises(ConfigError, match="output.hub_private"):
        load_config(write_cfg(tmp_path, push_to_hub="org/name", hub_private="no"))
    assert main(["merge", write_cfg(tmp_path), "--push-to-hub", "bad name"]) == EXIT_CONFIG


def test_merge_pushes_the_manifest_files_privately_with_the_fingerprint(
    tmp_path, monkeypatch, capsys
):
    rec = Recorder(monkeypatch)
    cfg = write_cfg(tmp_path)
    rc, lines = run_cli(capsys, "merge", cfg, "--push-to-hub", "org/merged")
    assert rc == EXIT_OK, lines
    out = tmp_path / "out"
    fp = json.loads((out / "merge_report.json").read_text())["plan_fingerprint"]
    (create,) = rec.named("create_repo")
    assert create["args"] == ("org/merged",) and create["private"] is True
    assert create["exist_ok"] is True
    (up,) = rec.named("upload_folder")
    assert up["repo_id"] == "org/merged" and up["folder_path"] == os.path.realpath(out)
    assert sorted(up["allow_patterns"]) == manifest_files(out)
    assert up["commit_message"] == f"tadmerge: task_arithmetic + none merge, plan {fp[:12]}"
    assert f"plan_fingerprint: {fp}" in up["commit_description"]
    import hashlib

    cfg_sha = hashlib.sha256((out / "merge_config.yaml").read_bytes()).hexdigest()
    assert cfg_sha in up["commit_description"]
    # an up-to-date rerun whose output is already the repo's newest commit uploads nothing
    rec.commits = [type("C", (), {"title": up["commit_message"], "commit_id": "c" * 40})()]
    rec.remote = remote_files(out)
    rc, _ = run_cli(capsys, "merge", cfg, "--push-to-hub", "org/merged", "--if-changed")
    assert rc == EXIT_OK and len(rec.named("upload_folder")) == 1
    # ... and one whose push had failed is pushed now
    rec.commits = []
    rc, _ = run_cli(capsys, "merge", cfg, "--push-to-hub", "org/merged", "--if-changed")
    assert rc == EXIT_OK and len(rec.named("upload_folder")) == 2


def test_public_when_told_and_upload_large_folder_where_it_exists(tmp_path, monkeypatch, capsys):
    """An older huggingface_hub's upload_large_folder takes no commit message: the
    fingerprint goes in a tag."""
    rec = Recorder(monkeypatch, large=True)
    cfg = write_cfg(tmp_path, push_to_hub="org/merged", hub_private=False)
    assert run_cli(capsys, "merge", cfg)[0] == EXIT_OK
    out = tmp_path / "out"
    fp = json.loads((out / "merge_report.json").read_text())["plan_fingerprint"]
    assert rec.named("create_repo")[0]["private"] is False
    (up,) = rec.named("upload_large_folder")
    assert up["private"] is False and up["repo_type"] == "model"
    assert sorted(up["allow_patterns"]) == manifest_files(out)
    assert not rec.named("upload_folder")
    (tag,) = rec.named("create_tag")
    assert tag["tag"] == f"tadmerge-{fp[:12]}" and fp[:12] in tag["tag_message"]


def test_failed_push_is_exit_4_output_kept_and_tadmerge_push_retries(tmp_path, monkeypatch, capsys):
    from huggingface_hub.errors import LocalTokenNotFoundError

    rec = Recorder(monkeypatch, fail=LocalTokenNotFoundError("Token is required"))
    rc, lines = run_cli(capsys, "merge", write_cfg(tmp_path, push_to_hub="org/merged"))
    out = tmp_path / "out"
    assert rc == EXIT_RUNTIME
    text = "\n".join(lines)
    assert "no valid Hugging Face token" in text
    assert f"retry with: tadmerge push {os.path.realpath(out)} org/merged" in text
    assert main(["verify", str(out)]) == EXIT_OK  # published and intact
    assert not rec.named("upload_folder")  # (it failed at the listing before it)
    rec.fail = None
    rc, _ = run_cli(capsys, "push", str(out), "org/merged")
    assert rc == EXIT_OK and len(rec.named("upload_folder")) == 1
    # an output that fails verify is not pushed, with verify's own exit code (3)
    (out / "merge_report.json").write_text("{}")
    rc, lines = run_cli(capsys, "push", str(out), "org/merged")
    assert rc == EXIT_INPUT == main(["verify", str(out)])
    assert "not a verified tadmerge output" in "\n".join(lines)
    assert len(rec.named("upload_folder")) == 1
    # ... as is a folder with no manifest at all
    (out / "manifest.json").unlink()
    assert run_cli(capsys, "push", str(out), "org/merged")[0] == EXIT_INPUT
    assert main(["verify", str(out)]) == EXIT_INPUT
    assert len(rec.named("upload_folder")) == 1


def test_dry_runs_touch_nothing(tmp_path, monkeypatch, capsys):
    rec = Recorder(monkeypatch, fail=AssertionError("network"))
    cfg = write_cfg(tmp_path, push_to_hub="org/merged")
    capsys.readouterr()
    assert main(["merge", cfg, "--dry-run"]) == EXIT_OK
    said = capsys.readouterr().out
    assert "nothing merged, written or uploaded" in said and "org/merged" in said
    assert "model.safetensors" in said and "(private if created)" in said
    assert not (tmp_path / "out").exists() and reads_only(rec)
    assert "could not be listed" in said  # (the listing failed: said, not fatal)
    rec.fail = None
    assert main(["merge", write_cfg(tmp_path)]) == EXIT_OK
    rec.calls.clear()
    capsys.readouterr()
    assert main(["push", str(tmp_path / "out"), "org/merged", "--public", "--dry-run"]) == EXIT_OK
    said = capsys.readouterr().out
    assert reads_only(rec) and "(public if created" in said
    for rel in manifest_files(tmp_path / "out"):
        size = (tmp_path / "out" / rel).stat().st_size
        assert f"{size:>14d}  {rel}" in said


def reads_only(rec: Recorder) -> bool:
    """Nothing but the read-only listing of the repo's files was called."""
    return {name for name, _ in rec.calls} <= {"list_repo_files"}


def remote_files(out: Path, stale: str | None = None) -> list:
    """The hub's RepoFile of every file of `out` as an upload would leave them: LFS
    (sha256) for the weights, a git blob id for the rest; `stale`: that file's
    content is another (an older merge's)."""
    import hashlib

    from huggingface_hub.hf_api import RepoFile

    files = []
    for rel in manifest_files(out):
        data = (out / rel).read_bytes()
        if rel == stale:
            data = bytes(len(data))
        git = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        lfs = None
        if rel.endswith(".safetensors"):
            lfs = {"size": len(data), "oid": hashlib.sha256(data).hexdigest(), "pointerSize": 1}
        files.append(RepoFile(path=rel, size=len(data), oid=git, lfs=lfs))
    return files


@pytest.mark.parametrize("stale", ["model.safetensors", "config.json", "manifest.json", None])
def test_an_interrupted_push_is_not_taken_for_a_finished_one(tmp_path, monkeypatch, capsys, stale):
    """huggingface_hub commits a large upload in batches, the first under the commit
    message that names the fingerprint: a push killed after it left a repo whose
    newest commit names this plan but whose other files are missing or an older
    merge's. `--if-changed` took that for done (exit 0, the repo left half
    updated); it must push unless the repo holds every file with this content."""
    rec = Recorder(monkeypatch)
    cfg = write_cfg(tmp_path, push_to_hub="org/merged")
    assert run_cli(capsys, "merge", cfg)[0] == EXIT_OK
    (up,) = rec.named("upload_folder")
    out = tmp_path / "out"
    rec.commits = [type("C", (), {"title": up["commit_message"], "commit_id": "c" * 40})()]
    rec.remote = remote_files(out, stale)
    if stale is None:  # every file there: nothing to push
        rec.remote = rec.remote[:-1]  # ... but one missing
        assert run_cli(capsys, "merge", cfg, "--if-changed")[0] == EXIT_OK
        assert len(rec.named("upload_folder")) == 2
        rec.remote = remote_files(out)
        assert run_cli(capsys, "merge", cfg, "--if-changed")[0] == EXIT_OK
        assert len(rec.named("upload_folder")) == 2
        assert rec.named("get_paths_info")[-1]["revision"] == "c" * 40
        return
    assert run_cli(capsys, "merge", cfg, "--if-changed")[0] == EXIT_OK
    assert len(rec.named("upload_folder")) == 2


USER_FILES = [".gitattributes", "README.md", "eval_results.json", "results/eval.json"]


@pytest.mark.parametrize(
    "stale",
    [
        ["model.safetensors"],  # an older single-file output under a sharded one
        ["pytorch_model.bin"],
        ["pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json"],
        ["model.safetensors.index.json"],  # an older sharded output's index
        ["adapter_config.json", "adapter_model.safetensors"],
        ["model.gguf", "original/consolidated.00.pth", "ckpt/weights.pt"],
        ["model[1].safetensors"],  # (a glob character: deleted as that name only)
    ],
)
def test_weights_the_output_lacks_refuse_the_push_unless_replaced(
    tmp_path, monkeypatch, capsys, stale
):
    """A repo holding weights this output does not have would serve them beside the new
    ones (transformers prefers model.safetensors over shards): the push refuses (exit
    2) before any upload, naming them; --replace-weights / output.hub_replace_weights
    deletes exactly them in the upload's first commit; other files are never touched."""
    import fnmatch

    rec = Recorder(monkeypatch)
    # sharded (its own index) but for the stale index: a single-file output
    shards = {} if stale == ["model.safetensors.index.json"] else {"shard_size": "2KB"}
    cfg = write_cfg(tmp_path, push_to_hub="org/merged", **shards)
    out = tmp_path / "out"
    rec.listing = USER_FILES + stale + ["config.json"]
    rc, lines = run_cli(capsys, "merge", cfg)
    text = "\n".join(lines)
    assert rc == EXIT_CONFIG, text
    assert (out / "model.safetensors.index.json").exists() == bool(shards)
    assert all(name in text for name in stale), text
    assert "--replace-weights" in text and "README.md" not in text
    assert not rec.named("upload_folder") and not rec.named("create_commit")
    assert main(["verify", str(out)]) == EXIT_OK  # published locally all the same
    # the same refusal from tadmerge push, and --dry-run says what would be deleted
    rc, _ = run_cli(capsys, "push", str(out), "org/merged")
    assert rc == EXIT_CONFIG and not rec.named("upload_folder")
    capsys.readouterr()
    assert main(["push", str(out), "org/merged", "--replace-weights", "--dry-run"]) == EXIT_OK
    said = capsys.readouterr().out
    gone = stale
    assert all(f"would delete {p}" in said for p in gone) and "would delete README" not in said
    assert {name for name, _ in rec.calls} <= {"create_repo", "list_repo_files"}
    # replaced on request: deleted in the upload's own commit, exactly these paths
    rc, lines = run_cli(capsys, "push", str(out), "org/merged", "--replace-weights")
    assert rc == EXIT_OK, lines
    (up,) = rec.named("upload_folder")
    patterns = up["delete_patterns"]
    assert len(patterns) == len(gone)
    for path in rec.listing:
        hits = [pat for pat in patterns if fnmatch.fnmatch(path, pat)]
        assert (path in gone) == bool(hits), (path, patterns)
    # ... and the config key does the same from a merge
    rc, _ = run_cli(
        capsys, "merge", write_cfg(tmp_path, push_to_hub="org/merged", **shards,
                                   hub_replace_weights=True), "--overwrite",
    )  # fmt: skip
    assert rc == EXIT_OK and rec.named("upload_folder")[-1]["delete_patterns"] == patterns


def test_a_repo_holding_only_this_outputs_files_and_user_files_is_pushed(
    tmp_path, monkeypatch, capsys
):
    rec = Recorder(monkeypatch)
    cfg = write_cfg(tmp_path, push_to_hub="org/merged")
    assert main(["merge", write_cfg(tmp_path)]) == EXIT_OK
    rec.listing = USER_FILES + manifest_files(tmp_path / "out")
    rc, lines = run_cli(capsys, "push", str(tmp_path / "out"), "org/merged")
    assert rc == EXIT_OK, lines
    (up,) = rec.named("upload_folder")
    assert not up.get("delete_patterns")
    assert rec.named("list_repo_files")[0]["repo_type"] == "model"
    assert cfg  # (the config file exists; the merge above wrote the same output)


def test_replace_weights_with_upload_large_folder_deletes_first(tmp_path, monkeypatch, capsys):
    """An older huggingface_hub's upload_large_folder cannot delete: the stale weights
    go in a commit of their own before the upload, so no revision mixes the two."""
    rec = Recorder(monkeypatch, large=True)
    assert main(["merge", write_cfg(tmp_path)]) == EXIT_OK
    rec.listing = USER_FILES + ["pytorch_model.bin"]
    rc, _ = run_cli(capsys, "push", str(tmp_path / "out"), "org/merged", "--replace-weights")
    assert rc == EXIT_OK
    names = [name for name, _ in rec.calls]
    assert names.index("create_commit") < names.index("upload_large_folder")
    (commit,) = rec.named("create_commit")
    assert [op.path_in_repo for op in commit["operations"]] == ["pytorch_model.bin"]


def test_the_config_key_is_validated_and_outside_the_fingerprint(tmp_path):
    from tadmerge.config import load_config
    from tadmerge.planners.plan import make_plan

    plain = load_config(write_cfg(tmp_path))
    assert plain.output.hub_replace_weights is False
    assert "hub_replace_weights" not in plain.to_dict()["output"]
    told = load_config(write_cfg(tmp_path, push_to_hub="org/n", hub_replace_weights=True))
    assert told.output.hub_replace_weights is True
    assert make_plan(told).fingerprint == make_plan(plain).fingerprint
    with pytest.raises(ConfigError, match="output.hub_replace_weights"):
        load_config(write_cfg(tmp_path, hub_replace_weights="yes"))


def test_dry_run_lists_the_repo_through_the_real_client(tmp_path, monkeypatch, capsys):
    """`tadmerge push --dry-run` reads the repo's file list with huggingface_hub's own
    client (a loopback stand-in hub): the weights the push would refuse over, or
    delete with --replace-weights; a repo that does not exist yet has none."""
    import huggingface_hub.constants as C
    from hub_server import FakeHub

    assert main(["merge", write_cfg(tmp_path, shard_size="2KB")]) == EXIT_OK
    old = tmp_path / "old"
    old.mkdir()
    for name in ("model.safetensors", "README.md", "eval_results.json"):
        (old / name).write_bytes(b"old " + name.encode())
    hub = FakeHub()
    hub.push("org/old", str(old))
    url = hub.start()
    try:
        monkeypatch.setattr(C, "ENDPOINT", url)
        monkeypatch.setattr(C, "HF_HUB_OFFLINE", False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        out = str(tmp_path / "out")
        capsys.readouterr()
        assert main(["push", out, "org/old", "--dry-run"]) == EXIT_OK
        said = capsys.readouterr().out
        assert "would be refused (exit 2)" in said and "1 weight file(s)" in said
        assert "model.safetensors;" in said and "eval_results" not in said
        assert main(["push", out, "org/old", "--dry-run", "--replace-weights"]) == EXIT_OK
        said = capsys.readouterr().out
        assert "would delete model.safetensors" in said and "would delete README" not in said
        assert main(["push", out, "org/new", "--dry-run"]) == EXIT_OK
        assert "holds no weights this output lacks" in capsys.readouterr().out
        assert all(method == "GET" for method, _, _ in hub.requests)  # (read only)
    finally:
        hub.stop()
