"""Hub inputs through huggingface_hub's real client against a loopback hub
(tests/hub_server.py): planned from headers only, downloaded at one pinned commit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from checkpoints import SPLIT_RUNTIME, write_checkpoint, write_zoo
from hub_server import FakeHub
from outputs import model_files, run_cli

from tadmerge.cli import main
from tadmerge.errors import EXIT_INPUT, EXIT_OK


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fake hub holding org/base, org/m0, org/m1 (the zoo; the base in 2 shards),
    huggingface_hub pointed at it (HF_ENDPOINT's constants) with an empty cache."""
    import huggingface_hub.constants as C

    h = FakeHub()
    bp, mps, _, _ = write_zoo(str(tmp_path / "src"), k=2)
    h.local = {"org/base": bp, "org/m0": mps[0], "org/m1": mps[1]}
    for repo, folder in h.local.items():
        h.push(repo, folder)
    url = h.start()
    monkeypatch.setattr(C, "ENDPOINT", url)
    monkeypatch.setattr(
        C, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    yield h
    h.stop()


def cli_out(capsys, *argv: str) -> tuple[int, str]:
    """`tadmerge ARGV` in this process: its exit code and its stdout."""
    capsys.readouterr()
    rc = main(list(argv))
    return rc, capsys.readouterr().out


def write_cfg(tmp: Path, base: str, models: list[str], out: str, name="merge.yaml") -> str:
    cfg = {
        "base": base,
        "models": [{"path": p, "name": f"m{i}"} for i, p in enumerate(models)],
        "sparsify": {"method": "tadrop"},
        "merge": {"method": "ties"},
        "output": {"path": str(tmp / out)},
        "runtime": dict(SPLIT_RUNTIME),
    }
    path = tmp / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


def hub_cfg(tmp: Path, out: str = "out") -> str:
    return write_cfg(tmp, "org/base", ["org/m0", "org/m1"], out, "hub.yaml")


def test_plan_reads_headers_only_and_fingerprints_like_the_merge(hub, tmp_path, capsys):
    from tadmerge.config import load_config
    from tadmerge.planners.plan import make_plan

    cfg = load_config(hub_cfg(tmp_path))
    headers_only = make_plan(cfg, fetch=False)
    assert hub.weight_downloads() == []
    ranged = [r for r in hub.requests if r[1].endswith(".safetensors")]
    assert len(ranged) == 4 and all(r[2] == "bytes=0-100000" for r in ranged)  # 2+1+1 shards
    assert not any(ck.fetched for ck in headers_only.inputs)
    for ck in headers_only.inputs:  # no weights in the cache, only the small files
        assert not any(os.path.exists(f) for f in ck.files)
        assert [os.path.basename(f) for f in ck.extra_files] == ["config.json"]
    # `tadmerge plan` prints the fingerprint the merge records
    rc, out = cli_out(capsys, "plan", hub_cfg(tmp_path))
    assert rc == EXIT_OK and headers_only.fingerprint[:12] in out
    assert hub.weight_downloads() == []
    full = make_plan(cfg)
    assert all(ck.fetched for ck in full.inputs)
    assert full.fingerprint == headers_only.fingerprint
    assert len(hub.weight_downloads()) == 4


def test_hub_merge_is_the_local_merge_pinned_to_one_commit(hub, tmp_path, capsys):
    """A push to org/m0 during the merge (right after the first weights are fetched)
    changes nothing: every read names the commit resolved when planning."""
    local = write_cfg(
        tmp_path, hub.local["org/base"], [hub.local["org/m0"], hub.local["org/m1"]], "local"
    )
    assert run_cli(capsys, "merge", local)[0] == EXIT_OK
    first = hub.refs["org/m0"]["main"]
    newer = write_checkpoint(str(tmp_path / "m0-v2"), {"emb.weight": torch.zeros(48, 40)})
    pushed = []

    def push_once(method, path, rng):
        if method == "GET" and path.endswith(".safetensors") and rng is None and not pushed:
            pushed.append(hub.push("org/m0", newer))

    hub.on_request = push_once
    rc, lines = run_cli(capsys, "merge", hub_cfg(tmp_path))
    assert rc == EXIT_OK, lines
    assert pushed and hub.refs["org/m0"]["main"] != first
    assert model_files(tmp_path / "out") == model_files(tmp_path / "local")
    m0 = [p for m, p, _ in hub.requests if "/org/m0/resolve/" in p and p.endswith("safetensors")]
    assert m0 and all(f"/resolve/{first}/" in p for p in m0)
    import json

    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    revs = {c["source"]: c["revision"] for c in report["inputs"]["checkpoints"]}
    assert revs["org/m0"] == first


def test_disagreement_found_before_any_weights_are_downloaded(hub, tmp_path, capsys):
    bad = write_checkpoint(str(tmp_path / "bad"), {"emb.weight": torch.zeros(48, 41)})
    hub.push("org/m1", bad)
    rc, lines = run_cli(capsys, "merge", hub_cfg(tmp_path))
    assert rc == EXIT_INPUT
    assert any("emb.weight" in ln for ln in lines), lines
    assert hub.weight_downloads() == []
    assert not (tmp_path / "out").exists()


def test_if_changed_on_hub_inputs_downloads_no_weights(hub, tmp_path, capsys):
    cfg = hub_cfg(tmp_path)
    assert run_cli(capsys, "merge", cfg)[0] == EXIT_OK
    hub.requests.clear()
    rc, out = cli_out(capsys, "merge", cfg, "--if-changed")
    assert rc == EXIT_OK and "up to date" in out
    assert hub.weight_downloads() == []
    # a new commit on a followed branch is a change: merged, its weights downloaded
    hub.push("org/m1", hub.local["org/m0"])
    rc, out = cli_out(capsys, "merge", cfg, "--if-changed")
    assert rc == EXIT_OK and "up to date" not in out
    assert [p for p in hub.weight_downloads() if "/org/m1/" in p]


def test_unknown_repo_and_revision_are_input_errors(hub, tmp_path, capsys):
    rc, lines = run_cli(
        capsys, "plan", write_cfg(tmp_path, "org/base", ["org/nope", "org/m1@v9"], "o")
    )
    assert rc == EXIT_INPUT
    text = "\n".join(lines)
    assert "org/nope not found or access denied" in text
    assert "revision 'v9' not found in Hugging Face repo org/m1" in text
