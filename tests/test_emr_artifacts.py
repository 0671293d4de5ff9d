"""EMR artifacts: every task model equals SPEC's θ_k*, written or in memory.

θ_k* = θ0 + fl32(λ_k)·(M_k ⊙ τ_uni), with τ_uni, M_k and λ_k from the reference
(tests/reference.py), for EMR and EMR + TADrop, with an excluded tensor (kept
per task), on bf16 and float32 tensors.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import reference as R
import torch
from checkpoints import write_zoo
from safetensors.torch import load_file

from tadmerge.cli import main
from tadmerge.config import parse_config
from tadmerge.emr import BaseChangedError, TaskSwitcher, materialize, task_state_dict
from tadmerge.emr.artifacts import _pinned_source
from tadmerge.emr.info import emr_info
from tadmerge.emr.materialize import staging_path
from tadmerge.errors import InputError
from tadmerge.run.driver import run_merge

SPARSIFY = {
    "emr": {"method": "none"},
    "emr+tadrop": {"method": "tadrop"},
}


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    root = tmp_path_factory.mktemp("emr")
    base_p, model_ps, base, models = write_zoo(str(root))
    outs = {}
    for tag, sp in SPARSIFY.items():
        cfg = parse_config(
            {
                "base": base_p,
                "models": [{"path": p, "name": f"t{i}"} for i, p in enumerate(model_ps)],
                "sparsify": sp,
                "merge": {"method": "emr"},
                "exclude": ["^head\\."],
                "output": {"path": str(root / tag)},
                "runtime": {"block_elements": 64, "max_unit_elements": 256, "progress": "none"},
            }
        )
        outs[tag] = run_merge(cfg).output
    return root, base, models, outs


def expected_task_models(base: dict, models: list[dict], sp: dict) -> list[dict]:
    names = [n for n in sorted(base) if base[n].is_floating_point() and n != "head.weight"]
    ts = [
        {n: R.sparsify(m[n].float() - base[n].float(), {**sp, "rescale": "l2", "low_q": 0.5,
                       "high_q": 0.95}, task=k, name=n, seed=0, block_rows=1)  # fmt: skip
         for n in names}
        for k, m in enumerate(models)
    ]  # fmt: skip
    per = {n: R.emr([t[n] for t in ts]) for n in names}
    lam = []
    for k in range(len(models)):
        a = math.fsum(per[n][2][k] / base[n].numel() for n in names)
        b = math.fsum(per[n][3][k] / base[n].numel() for n in names)
        lam.append(a / b if b > 0 else 1.0)
    out = []
    for k, m in enumerate(models):
        sd = {}
        for n, v in base.items():
            if n in per:
                uni, masks = per[n][0], per[n][1]
                x = v.float() + R.f32(lam[k]) * torch.where(masks[k], uni, torch.zeros(()))
                sd[n] = x.to(v.dtype)
            elif n == "head.weight":
                sd[n] = m[n]  # excluded: the task's own tensor
            else:
                sd[n] = v
        out.append(sd)
    return out


@pytest.mark.parametrize("tag", sorted(SPARSIFY))
def test_materialized_and_in_memory_task_models_equal_reference(merged, tag, tmp_path):
    _, base, models, outs = merged
    expected = expected_task_models(base, models, SPARSIFY[tag])
    for k, exp in enumerate(expected):
        task = f"t{k}"
        dest = tmp_path / f"{tag}-{task}"
        assert main(["materialize", outs[tag], "--task", task, "--to", str(dest),
                     "--memory-budget", "64MB"]) == 0  # fmt: skip
        assert main(["verify", str(dest)]) == 0
        written = load_file(str(dest / "model.safetensors"))
        in_memory = task_state_dict(outs[tag], task)
        lazy = task_state_dict(outs[tag], task, lazy=True)
        assert set(written) == set(exp) == set(in_memory) == set(lazy)
        assert os.path.exists(dest / "config.json")
        for n, v in exp.items():
            assert written[n].dtype == v.dtype, n
            assert torch.equal(written[n], v), (task, n)
            assert torch.equal(in_memory[n], v), (task, n)
            assert torch.equal(lazy[n], v), (task, n)


class _Net(torch.nn.Module):
    """A module whose state_dict has exactly the given names (nested submodules)."""

    def __init__(self, sd: dict[str, torch.Tensor]):
        super().__init__()
        for name, v in sd.items():
            *path, leaf = name.split(".")
            mod: torch.nn.Module = self
            for p in path:
                if not hasattr(mod, p):
                    mod.add_module(p, torch.nn.Module())
                mod = getattr(mod, p)
            if v.is_floating_point():
                mod.register_parameter(leaf, torch.nn.Parameter(v.clone(), requires_grad=False))
            else:
                mod.register_buffer(leaf, v.clone())


def test_switch_tasks_in_place_and_restore_base_bitwise(merged):
    _, base, models, outs = merged
    out = outs["emr+tadrop"]
    net = _Net(base)
    sw = TaskSwitcher(net, out)
    for task in ("t1", "t0", "t2"):
        sw.apply(task)
        want = task_state_dict(out, task)
        for n, v in net.state_dict().items():
            assert torch.equal(v, want[n]), (task, n)
    sw.remove()
    for n, v in net.state_dict().items():
        assert torch.equal(v, base[n]), n


def test_info_sizes_and_mask_cost(merged, capsys):
    _, base, _, outs = merged
    info = emr_info(outs["emr+tadrop"])
    assert info["tasks"] == ["t0", "t1", "t2"]
    # bit-packed: 1/8 byte per element per task, plus padding of the last byte of a block
    # (the 0-d tensor costs a whole byte); on disk zarr adds metadata and compresses
    assert 0.125 <= info["mask_payload_bytes_per_element_per_task"] < 0.13
    b = info["bytes"]
    assert b["total"] == b["unified_delta"] + b["masks"] + b["excluded_per_task"]
    assert main(["info", outs["emr+tadrop"]]) == 0
    text = capsys.readouterr().out
    assert "rescaler" in text and "masks" in text and "separate checkpoints" in text


def test_materialize_unknown_task_is_an_input_error(merged, tmp_path, capsys):
    _, _, _, outs = merged
    rc = main(["materialize", outs["emr"], "--task", "nope", "--to", str(tmp_path / "x")])
    assert rc == 3
    assert "nope" in capsys.readouterr().err
    with pytest.raises(InputError):
        materialize(outs["emr"], "nope", str(tmp_path / "y"))


# ------------------------------------------------------------------------------------
# the base is pinned: a changed base is refused, never silently used
# ------------------------------------------------------------------------------------


def _sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_emr_json_pins_every_base_file(merged):
    root, _, _, outs = merged
    doc = json.loads((Path(outs["emr"]) / "emr.json").read_text())
    base_root = doc["base"]["root"]
    pins = {p["path"]: p for p in doc["base"]["files"]}
    files = sorted(f for f in os.listdir(base_root) if f.endswith(".safetensors"))
    assert sorted(pins) == files and len(files) == 2
    for name, pin in pins.items():
        raw = (Path(base_root) / name).read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        assert pin["size"] == len(raw)
        assert pin["header_sha256"] == hashlib.sha256(raw[: 8 + n]).hexdigest()
        assert pin["sha256"] == _sha256(Path(base_root) / name)


@pytest.fixture
def emr_copy(merged, tmp_path):
    """A copy of the EMR output and of its base (emr.json pointed at the copy), so a
    test may damage the base."""
    root, _, _, outs = merged
    out = tmp_path / "emr"
    shutil.copytree(outs["emr"], out)
    doc = json.loads((out / "emr.json").read_text())
    base = tmp_path / "base"
    shutil.copytree(doc["base"]["root"], base)
    doc["base"]["root"] = str(base)
    (out / "emr.json").write_text(json.dumps(doc))
    return out, base, doc


def _first_shard(base: Path) -> Path:
    return sorted(base.glob("*.safetensors"))[0]


def _flip_data_byte(f: Path) -> None:
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0x01  # same size, same header: only the content differs
    f.write_bytes(bytes(raw))


def _change_header(f: Path) -> None:
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = raw[8 : 8 + n]
    changed = header.replace(b'"F32"', b'"I32"', 1)  # a valid header of the same size
    assert len(changed) == len(header) and changed != header
    f.write_bytes(raw[:8] + changed + raw[8 + n :])


def test_changed_base_content_refused_by_materialize(emr_copy, tmp_path, capsys):
    out, base, _ = emr_copy
    shard = _first_shard(base)
    _flip_data_byte(shard)
    dest = tmp_path / "t0"
    rc = main(["materialize", str(out), "--task", "t0", "--to", str(dest)])
    err = capsys.readouterr().err
    assert rc == 3, err
    assert str(shard) in err and "content differs" in err, err
    assert not dest.exists() and not os.path.exists(staging_path(str(dest)))
    with pytest.raises(BaseChangedError, match="content differs"):
        task_state_dict(str(out), "t0")  # eager: reads the whole base, checks it whole
    # the cheap check (lazy, TaskSwitcher) sees size and header only, unless asked
    task_state_dict(str(out), "t0", lazy=True)
    with pytest.raises(BaseChangedError, match="content differs"):
        task_state_dict(str(out), "t0", lazy=True, verify_base=True)


@pytest.mark.parametrize("change", ["header", "size", "missing"])
def test_changed_base_refused_everywhere(emr_copy, merged, tmp_path, capsys, change):
    out, base, _ = emr_copy
    shard = _first_shard(base)
    if change == "header":
        _change_header(shard)
        needle = "header differs"
    elif change == "size":
        with open(shard, "ab") as f:
            f.write(b"\0" * 8)
        needle = "size"
    else:
        shard.unlink()
        needle = "does not exist"  # (found by open_checkpoint already)
    rc = main(["materialize", str(out), "--task", "t0", "--to", str(tmp_path / "t0")])
    err = capsys.readouterr().err
    assert rc == 3 and str(shard) in err and needle in err, err
    with pytest.raises(InputError, match=needle):
        task_state_dict(str(out), "t0", lazy=True)
    with pytest.raises(InputError, match=needle):
        TaskSwitcher(_Net(merged[1]), str(out))


def test_emr_json_without_pins_warns_and_proceeds(emr_copy, caplog):
    out, _, doc = emr_copy
    del doc["base"]["files"]
    (out / "emr.json").write_text(json.dumps(doc))
    with caplog.at_level("WARNING", logger="tadmerge"):
        sd = task_state_dict(str(out), "t0", lazy=True)
        assert len(sd) > 0
    assert "does not pin its base" in caplog.text


def test_hub_base_resolved_at_the_pinned_revision():
    sha = "0123456789abcdef0123456789abcdef01234567"
    assert _pinned_source("/gone/snapshot", "org/model", sha) == f"org/model@{sha}"
    assert _pinned_source("/gone/snapshot", "org/model@main", sha) == f"org/model@{sha}"
    assert _pinned_source("/gone/snapshot", "org/model", None) == "org/model"


# ------------------------------------------------------------------------------------
# an interrupted materialize can be rerun
# ------------------------------------------------------------------------------------

_KILLER = """
import importlib, os, sys
m = importlib.import_module("tadmerge.emr.materialize")  # (the package's attribute is
# the function of the same name)
real, count = m.write_at, [0]
def dying(*a, **k):
    count[0] += 1
    if count[0] > int(os.environ["KILL_AFTER_WRITES"]):
        os._exit(137)  # killed mid-write: no cleanup at all
    return real(*a, **k)
m.write_at = dying
from tadmerge.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _killed_materialize(out: str, dest: Path, tmp_path: Path, after: int) -> None:
    script = tmp_path / "killer.py"
    script.write_text(_KILLER)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo, "KILL_AFTER_WRITES": str(after)}
    argv = ["materialize", out, "--task", "t1", "--to", str(dest), "--memory-budget", "64MB"]
    proc = subprocess.run([sys.executable, str(script), *argv], env=env, capture_output=True)
    assert proc.returncode == 137, proc.stderr.decode()[-2000:]
    assert not dest.exists() and os.path.isdir(staging_path(str(dest)))


@pytest.mark.parametrize("flag", ["--resume", "--overwrite"])
def test_interrupted_materialize_reruns_to_the_same_bytes(
    merged, tmp_path, capsys, monkeypatch, flag
):
    _, _, _, outs = merged
    out = outs["emr+tadrop"]
    ref = tmp_path / "ref"
    assert main(["materialize", out, "--task", "t1", "--to", str(ref)]) == 0
    dest = tmp_path / "t1"
    _killed_materialize(out, dest, tmp_path, after=3)

    rc = main(["materialize", out, "--task", "t1", "--to", str(dest)])
    err = capsys.readouterr().err
    assert rc == 2 and "--resume" in err and "--overwrite" in err, err
    assert not dest.exists()

    m = importlib.import_module("tadmerge.emr.materialize")
    real, written = m.write_at, []
    monkeypatch.setattr(m, "write_at", lambda *a: (written.append(a[0]), real(*a))[1])
    argv = ["materialize", out, "--task", "t1", "--to", str(dest), "--memory-budget", "64MB"]
    assert main([*argv, flag]) == 0, capsys.readouterr().err
    assert main(["verify", str(dest)]) == 0
    assert not os.path.exists(staging_path(str(dest)))
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in ref.iterdir())
    for p in ref.iterdir():
        assert (dest / p.name).read_bytes() == p.read_bytes(), p.name
    n_tensors = len(load_file(str(ref / "model.safetensors")))
    if flag == "--resume":  # the tensors written before the kill were kept
        assert len(written) <= n_tensors - 3
    else:
        assert len(written) >= n_tensors
