"""EMR artifacts: every task model equals SPEC's θ_k*, written or in memory.

θ_k* = θ0 + fl32(λ_k)·(M_k ⊙ τ_uni), with τ_uni, M_k and λ_k from the reference
(tests/reference.py), for EMR and EMR + TADrop, with an excluded tensor (kept
per task), on bf16 and float32 tensors.
"""

from __future__ import annotations

import math
import os

import pytest
import reference as R
import torch
from checkpoints import write_zoo
from safetensors.torch import load_file

from tadmerge.cli import main
from tadmerge.cluster.driver import run_merge
from tadmerge.config import parse_config
from tadmerge.emr import TaskSwitcher, materialize, task_state_dict
from tadmerge.emr.info import emr_info
from tadmerge.errors import InputError

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
