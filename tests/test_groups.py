"""Groups of small whole tensors (planners/plan.py GROUP_*): one unit, one record.

A plan of very many tensors puts consecutive small whole tensors into one unit
whose worker merges each member as that tensor's own unit would be merged. Here
the threshold is lowered so that a small zoo (split tensors, non-float copies, an
excluded head) is grouped: the output bytes and the report's tensors must be
those of the same merge without groups, a killed grouped merge must resume to the
same bytes (a group whose bytes were damaged is redone), and the columnar output
layout and the streamed report must give the bytes of the whole-object ones.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import killpoints
import pytest
import torch
import yaml
from checkpoints import SPLIT_RUNTIME, write_checkpoint
from checkpoints import zoo as make_zoo
from outputs import model_files

from tadmerge.cli import main
from tadmerge.config import load_config
from tadmerge.errors import EXIT_OK
from tadmerge.planners import plan as plan_mod

METHODS = {
    "ta": {"merge": {"method": "task_arithmetic", "scale": 0.7}},
    "tadrop": {
        "sparsify": {"method": "tadrop", "scope": "tensor"},
        "merge": {"method": "task_arithmetic", "scale": 0.5},
    },
    # random streams keyed by tensor and block, and TIES' majority on split tensors
    "dare_ties": {"sparsify": {"method": "random", "p": 0.5}, "merge": {"method": "ties"}},
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """The test zoo (tests/checkpoints.py: split tensors under SPLIT_RUNTIME, bf16 and
    f32, 0-d) with a non-float buffer and an excluded tensor among small merged ones,
    so that groups hold every kind; the base in two shards."""
    root = tmp_path_factory.mktemp("groupzoo")
    base, models = make_zoo()
    g = torch.Generator().manual_seed(1)
    base["layers.0.ids"] = torch.arange(6)
    base["layers.0.skip"] = torch.randn(7, generator=g)
    for m in models:
        m["layers.0.ids"] = torch.arange(6)
        m["layers.0.skip"] = torch.randn(7, generator=g)
    bp = write_checkpoint(str(root / "base"), base, shards=2)
    return bp, [write_checkpoint(str(root / f"m{i}"), m) for i, m in enumerate(models)]


def write_cfg(path: Path, zoo, out: Path, method: str) -> str:
    base, models = zoo
    cfg = {
        "base": base,
        "models": [{"path": p, "name": f"t{i}"} for i, p in enumerate(models)],
        **METHODS[method],
        "exclude": ["^head\\.", "\\.skip$"],
        "output": {"path": str(out)},
        "runtime": {**SPLIT_RUNTIME, "progress": "none"},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


def grouped(mp, members: int = 3) -> None:
    """Group every plan (not only those of GROUP_MIN_TENSORS tensors), `members` at most."""
    mp.setattr(plan_mod, "GROUP_MIN_TENSORS", 1)
    mp.setattr(plan_mod, "GROUP_TENSORS", members)


def report(out: Path) -> dict:
    return json.loads((out / "merge_report.json").read_text())


@pytest.mark.parametrize("method", sorted(METHODS))
def test_groups_give_the_bytes_and_report_of_one_unit_per_tensor(zoo, tmp_path, method):
    ref = tmp_path / "ref"
    assert main(["-q", "merge", write_cfg(tmp_path / "ref.yaml", zoo, ref, method)]) == EXIT_OK
    out = tmp_path / "out"
    cfg = write_cfg(tmp_path / "m.yaml", zoo, out, method)
    with pytest.MonkeyPatch.context() as mp:
        grouped(mp)
        plan = plan_mod.make_plan(load_config(cfg))
        assert sum(u.grouped for u in plan.units) >= 2
        assert any(t.split for t in plan.tensors)  # (row blocks stay as they were)
        kinds = {plan.tensors[m.tensor].kind for u in plan.units for m in plan.members(u)}
        assert {"merge", "copy", "exclude"} <= kinds
        assert main(["-q", "merge", cfg]) == EXIT_OK
    assert model_files(out) == model_files(ref)
    got, want = report(out), report(ref)
    assert got["tensors"] == want["tensors"]
    assert got["units"]["total"] < want["units"]["total"]
    assert main(["-q", "verify", str(out)]) == EXIT_OK


def test_a_killed_grouped_merge_resumes_to_the_same_bytes(zoo, tmp_path):
    """Stopped once the first group finished (the driver logs what finished, one
    worker: in unit order), that group's bytes damaged in the staging: --resume
    reuses the units before it, redoes it, and publishes the bytes and report of
    an uninterrupted merge."""
    ref = tmp_path / "ref"
    assert main(["-q", "merge", write_cfg(tmp_path / "ref.yaml", zoo, ref, "dare_ties")]) == 0
    out = tmp_path / "out"
    cfg = write_cfg(tmp_path / "m.yaml", zoo, out, "dare_ties")
    staging = tmp_path / ".out.tadmerge-staging"

    def stop() -> None:
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        grouped(mp)
        mp.setattr(plan_mod.RuntimeSpec, "local_workers", lambda self: 1)
        plan = plan_mod.make_plan(load_config(cfg))
        first = next(u.id for u in plan.units if u.grouped)
        with pytest.MonkeyPatch.context() as kill:
            killpoints.install(f"progress:{first + 1}", stop, kill.setattr)
            assert main(["-q", "merge", cfg]) == 130
        lines = (staging / ".tadmerge" / "units.jsonl").read_text().splitlines()
        logged = [json.loads(line) for line in lines]
        groups = [d["unit"] for d in logged if "group" in d]
        assert len(logged) == first + 1 and groups == [first]
        # zeros over the last member of a logged group (its crc32 no longer matches)
        unit = plan.units[groups[0]]
        from tadmerge.cluster.worker import unit_output_range

        rel, start, end = unit_output_range(plan, plan.members(unit)[-1])
        assert end > start
        with open(staging / rel, "r+b") as f:
            f.seek(start)
            before = f.read(end - start)
            f.seek(start)
            f.write(bytes(end - start))
        assert zlib.crc32(before) != zlib.crc32(bytes(end - start))
        assert main(["-q", "merge", cfg, "--resume"]) == EXIT_OK
    assert model_files(out) == model_files(ref)
    got = report(out)
    assert got["units"]["reused"] == first
    assert got["tensors"] == report(ref)["tensors"]
    assert main(["-q", "verify", str(out)]) == EXIT_OK


def test_the_columnar_layout_is_the_layout_of_output_tensors():
    """io/layout.layout_table: the shards, offsets and header bytes of
    block_io.layout_shards, over dtypes of several sizes, 0-d and empty tensors,
    names that need escapes, and several shards."""
    from tadmerge.io.block_io import OutputTensor, layout_shards
    from tadmerge.io.layout import layout_table

    dtypes = ["BF16", "F32", "I64", "U8"]
    shapes = [(3, 4), (), (0, 5), (7,), (2, 2, 2)]
    names = sorted(f'layer.{i}.w\u00e9"{i % 3}' for i in range(60))
    d_ids = [(i * 7) % len(dtypes) for i in range(len(names))]
    s_ids = [(i * 3) % len(shapes) for i in range(len(names))]
    meta = {"tadmerge_version": "x", "merge_method": "m"}
    for shard_size in (10**9, 64, 1):
        want = layout_shards(
            [
                OutputTensor(n, dtypes[d], shapes[s])
                for n, d, s in zip(names, d_ids, s_ids, strict=True)
            ],
            shard_size,
            meta,
        )
        import numpy as np

        got = layout_table(
            names, dtypes, np.array(d_ids, np.uint8), shapes, np.array(s_ids, np.uint8),
            shard_size, meta,
        )  # fmt: skip
        assert [s.filename for s in got] == [s.filename for s in want]
        for g, w in zip(got, want, strict=True):
            assert g.header == w.header and b"".join(g.header_chunks()) == w.header
            assert g.file_size == w.file_size and g.data_size == w.data_size
            assert dict(g.data_offsets) == w.data_offsets
            assert list(g.tensors) == list(w.tensors)
            assert all(g.tensor_offset(t.name) == w.tensor_offset(t.name) for t in w.tensors)


def test_indented_dump_is_jsons():
    """run/files.dumps_indented (the streamed report) writes what json.dumps(indent=1)
    writes, at any depth, for every kind of value the report holds."""
    from tadmerge.run.files import dumps_indented

    docs = [
        {"kind": "merge", "shape": [3, 4], "n": 12, "units": 1, "reason": "é\n\"x\"",
         "tasks": {"t0": {"kept": 3, "q_low": None, "drop_rate": 0.1 + 0.2, "tiny": 5e-324,
                          "big": 1e300, "nan": math.nan, "inf": -math.inf, "ok": True}}},
        {}, [], {"a": [], "b": {}, "c": [[1, {"x": []}]]}, 7, "s",
    ]  # fmt: skip
    for doc in docs:
        assert dumps_indented(doc) == json.dumps(doc, indent=1)
        assert dumps_indented(doc, 2) == json.dumps(doc, indent=1).replace("\n", "\n  ")


def test_a_group_member_with_nan_is_named_as_its_own_unit_would_be(zoo, tmp_path, capsys):
    """NaN in one member of a group: the merge stops with exit 3 and the message of
    the same merge without groups (file and tensor), and publishes nothing."""
    from safetensors.torch import load_file, save_file

    base, models = zoo
    bad = tmp_path / "bad"
    bad.mkdir()
    tensors = load_file(str(Path(models[1]) / "model.safetensors"))
    tensors["layers.0.bias"][3] = float("nan")
    save_file(tensors, str(bad / "model.safetensors"))
    broken = (base, [models[0], str(bad), models[2]])
    errors = []
    for label in ("plain", "grouped"):
        out = tmp_path / label
        cfg = write_cfg(tmp_path / f"{label}.yaml", broken, out, "ta")
        with pytest.MonkeyPatch.context() as mp:
            if label == "grouped":
                grouped(mp)
                plan = plan_mod.make_plan(load_config(cfg))
                i = next(t.index for t in plan.tensors if t.name == "layers.0.bias")
                assert plan.units[plan.tensors[i].units[0]].grouped
            assert main(["-q", "merge", cfg]) == 3
        errors.append(capsys.readouterr().err)
        assert not out.exists()
    assert "layers.0.bias" in errors[0] and str(bad) in errors[0]
    assert errors[1] == errors[0].replace(str(tmp_path / "plain"), str(tmp_path / "grouped"))
