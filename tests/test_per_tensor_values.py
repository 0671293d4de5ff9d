"""Values per tensor (mergekit's gradients over the layers and {filter, value}
lists) for every number parameter, the models' weights and the per-model
sparsifier values: resolved per tensor (MergeSpec.for_tensor) and checked
against tests/reference.py computing each tensor with its own values, whole and
split into small units (statistics rounds), native and from a mergekit config."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import reference as R
import torch
import yaml
from checkpoints import write_checkpoint
from outputs import model_files
from safetensors.torch import load_file

from tadmerge.cli import main
from tadmerge.config import load_config, parse_config
from tadmerge.errors import ConfigError
from tadmerge.frontends.mergekit import translate
from tadmerge.planners.plan import make_plan
from tadmerge.run.driver import run_merge

BLOCK = 64
LAYERS = 4
SEED = 5
DENSITY = [0.2, 0.8]  # a gradient over the 4 layers: 0.2, 0.4, 0.6, 0.8
W0 = [{"filter": "self_attn", "value": 0.3}, {"value": 1.0}]
W1 = [0.5, 1.5]
D1 = [{"filter": "mlp", "value": 0.6}, {"value": [0.9, 0.3]}]
SCALE = [{"filter": "norm", "value": 0.5}, {"value": [1.0, 0.6]}]

# (sparsify section, model 1's own sparsify, merge section)
CASES = {
    "ties-magnitude": (
        {"method": "magnitude", "density": DENSITY, "rescale": "l1"},
        {"density": D1},
        {"method": "ties", "scale": SCALE},
    ),
    "ta-none": ({"method": "none"}, None, {"method": "task_arithmetic", "scale": SCALE}),
    "ties-random": (
        {"method": "random", "p": [0.8, 0.2], "rescale": "inverse_keep"},
        {"p": [{"filter": "q_proj", "value": 0.5}, {"value": 0.1}]},
        {"method": "ties", "scale": 1.0},
    ),
}


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rn(*shape):
        return torch.randn(tuple(shape), generator=g)

    out = {"model.embed_tokens.weight": rn(32, 16).bfloat16(), "model.norm.weight": rn(16)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = rn(16, 16)
        out[p + "mlp.up_proj.weight"] = rn(24, 16).bfloat16()
        out[p + "input_layernorm.weight"] = rn(16)
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("per-tensor")
    base = _tensors(0)
    models = []
    for k in range(3):
        d = _tensors(10 + k)
        models.append({n: (base[n].float() + 0.05 * (k + 1) * d[n].float()).to(base[n].dtype)
                       for n in base})  # fmt: skip
    bp = write_checkpoint(str(root / "base"), base)
    mps = [write_checkpoint(str(root / f"m{k}"), m) for k, m in enumerate(models)]
    return root, bp, mps, base, models


def native(root, bp, mps, case: str, out: str, split: bool) -> dict:
    sp, own1, merge = CASES[case]
    raw = {
        "base": bp,
        "models": [
            {"path": mps[0], "name": "t0", "weight": W0},
            {"path": mps[1], "name": "t1", "weight": W1} | ({"sparsify": own1} if own1 else {}),
            {"path": mps[2], "name": "t2", "weight": 1.0},
        ],
        "sparsify": sp,
        "merge": merge,
        "output": {"path": str(root / out)},
        "runtime": {"block_elements": BLOCK, "progress": "none", "device": "cpu"},
        "seed": SEED,
    }
    if split:
        raw["runtime"].update(workers=2, max_unit_elements=2 * BLOCK, memory_budget="256MB")
    return raw


def reference(base: dict, models: list[dict], case: str) -> dict:
    """Each tensor merged with its own values (R.at_tensor: mergekit's rule)."""
    sp, own1, merge = CASES[case]
    out = {}
    for n in base:
        at = {k: R.at_tensor(v, n, LAYERS) for k, v in sp.items() if k not in ("method", "rescale")}
        spk = [{"rescale": "none", **{k: v for k, v in sp.items() if k not in at}, **at}] * 3
        if own1:
            spk[1] = {**spk[1], **{k: R.at_tensor(v, n, LAYERS) for k, v in own1.items()}}
        rows = max(1, BLOCK // (math.prod(base[n].shape[1:]) if base[n].dim() > 1 else 1))
        ts = [
            R.sparsify(m[n].float() - base[n].float(), spk[k], task=k, name=n, seed=SEED,
                       block_rows=rows)
            for k, m in enumerate(models)
        ]  # fmt: skip
        ws = [R.at_tensor(w, n, LAYERS) for w in (W0, W1, 1.0)]
        scale = R.at_tensor(merge["scale"], n, LAYERS)
        thetas = [m[n].float() for m in models]
        out[n] = R.combine(merge["method"], base[n].float(), thetas, ts, ws, scale)
        out[n] = out[n].to(base[n].dtype)
    return out


def _check(output: str, expected: dict) -> None:
    got = load_file(os.path.join(output, "model.safetensors"))
    assert set(got) == set(expected)
    for n, v in expected.items():
        assert torch.equal(got[n].view(-1), v.reshape(-1)), n


@pytest.mark.parametrize("case", list(CASES))
def test_native_values_per_tensor_whole_and_split(ckpts, case):
    root, bp, mps, base, models = ckpts
    whole = run_merge(parse_config(native(root, bp, mps, case, f"{case}-w", False)))
    split = run_merge(parse_config(native(root, bp, mps, case, f"{case}-s", True)))
    assert whole.plan.layers == LAYERS
    assert any(len(t.units) > 1 for t in split.plan.tensors)
    assert model_files(whole.output) == model_files(split.output), "split changed the bytes"
    _check(whole.output, reference(base, models, case))


def test_the_values_do_differ_per_tensor(ckpts):
    """Not a no-op: each tensor keeps the count its own density gives (the
    report's kept counts), layer by layer and for task 1's own filter list."""
    import json

    root, bp, mps, _, _ = ckpts
    res = run_merge(parse_config(native(root, bp, mps, "ties-magnitude", "diff", False)))
    with open(os.path.join(res.output, "merge_report.json")) as f:
        tensors = json.load(f)["tensors"]
    for i, d in enumerate([0.2, 0.4, 0.6, 0.8]):
        rep = tensors[f"model.layers.{i}.self_attn.q_proj.weight"]["tasks"]
        assert rep["t0"]["kept"] == math.floor(d * 256)
        assert rep["t1"]["kept"] == math.floor((0.9 - 0.2 * i) * 256)
        assert tensors[f"model.layers.{i}.mlp.up_proj.weight"]["tasks"]["t1"]["kept"] == (
            math.floor(0.6 * 384)
        )
    assert tensors["model.norm.weight"]["tasks"]["t0"]["kept"] == math.floor(0.2 * 16)


def _mergekit(root: Path, mps: list[str]) -> dict:
    return {
        "merge_method": "ties",
        "base_model": "./base",
        "models": [
            {"model": "./" + Path(mps[0]).name, "parameters": {"weight": W0}},
            # a filter list with no catch-all: the top-level density applies elsewhere
            {
                "model": "./" + Path(mps[1]).name,
                "parameters": {"weight": 0.5, "density": [{"filter": "mlp", "value": 0.6}]},
            },
            {"model": "./" + Path(mps[2]).name, "parameters": {"weight": 1.0}},
        ],  # fmt: skip
        "parameters": {"density": DENSITY, "lambda": [1.0, 0.6]},
    }


def test_mergekit_config_with_values_per_tensor(ckpts, tmp_path, monkeypatch, capsys):
    root, bp, mps, base, models = ckpts
    monkeypatch.chdir(root)
    mk = tmp_path / "mk.yml"
    mk.write_text(yaml.safe_dump(_mergekit(root, mps)))
    nat, _ = translate(yaml.safe_load(mk.read_text()), root)
    assert nat["sparsify"] == {"method": "magnitude", "density": DENSITY, "rescale": "none"}
    assert nat["models"][0]["weight"] == [{"filter": "self_attn", "value": 0.3},
                                          {"filter": None, "value": 1.0}]  # fmt: skip
    own = nat["models"][1]["sparsify"]["density"]
    assert own == [{"filter": "mlp", "value": 0.6}, {"filter": None, "value": DENSITY}]
    assert nat["merge"] == {"method": "ties", "scale": [1.0, 0.6], "disjoint": "mean"}
    # `tadmerge convert` prints it, and the printed config merges to the same bytes
    assert main(["convert", str(mk), "--out", str(tmp_path / "native-out")]) == 0
    text = capsys.readouterr().out
    assert "filter: self_attn" in text
    printed = tmp_path / "sub" / "native.yml"
    printed.parent.mkdir()
    printed.write_text(text)
    cfg = load_config(printed)
    cfg_split = parse_config(
        {**cfg.to_dict(), "output": {"path": str(tmp_path / "split-out")},
         "runtime": {"workers": 2, "max_unit_elements": 2 * BLOCK, "block_elements": BLOCK,
                     "memory_budget": "256MB", "progress": "none"}}
    )  # fmt: skip
    assert main(["merge", str(mk), "--out", str(tmp_path / "mk-out")]) == 0
    run_merge(cfg_split)
    got = load_file(str(tmp_path / "mk-out" / "model.safetensors"))
    split = load_file(str(tmp_path / "split-out" / "model.safetensors"))
    assert all(torch.equal(got[n], split[n]) for n in got) and got.keys() == split.keys()
    # against the reference: mergekit's TIES with each tensor's values
    for n, b0 in base.items():
        d = R.at_tensor(DENSITY, n, LAYERS)
        d1 = 0.6 if "mlp" in n else d
        w0 = 0.3 if "self_attn" in n else 1.0
        ts = []
        for k, m in enumerate(models):
            sp = {"method": "magnitude", "density": d1 if k == 1 else d, "rescale": "none"}
            ts.append(R.sparsify(m[n].float() - b0.float(), sp, task=k, name=n, seed=0,
                                 block_rows=1))  # fmt: skip
        scale = R.at_tensor([1.0, 0.6], n, LAYERS)
        thetas = [m[n].float() for m in models]
        want = R.combine("ties", b0.float(), thetas, ts, [w0, 0.5, 1.0], scale).to(b0.dtype)
        assert torch.equal(got[n], want), n


def test_per_tensor_values_are_refused_where_they_cannot_apply(ckpts, tmp_path):
    root, bp, mps, _, _ = ckpts
    raw = native(root, bp, mps, "ties-magnitude", "x", False)
    # scope: global makes one selection per task over every tensor: one value
    glob = {**raw, "sparsify": {**raw["sparsify"], "scope": "global"}}
    with pytest.raises(ConfigError, match=r"scope: global .*sparsify\.density, "
                       r"models\[1\]\.sparsify\.density must be one number"):  # fmt: skip
        parse_config(glob)
    # a filter list that leaves a tensor without a value: named when the plan is made
    raw["models"][0]["weight"] = [{"filter": "self_attn", "value": 0.3}]
    cfg = parse_config(raw)
    with pytest.raises(ConfigError, match=r"model\.embed_tokens\.weight: no filter entry"):
        make_plan(cfg)
    # a method's rule on the values a tensor gets (della: density ± epsilon in (0, 1])
    della = native(root, bp, mps, "ties-magnitude", "y", False)
    della["sparsify"] = {"method": "della", "density": [0.5, 0.95], "epsilon": 0.1}
    della["models"][1].pop("sparsify")
    with pytest.raises(ConfigError, match=r"epsilon.*at tensor model\.layers\.3\."):
        make_plan(parse_config(della))
    assert not (root / "x").exists() and not (root / "y").exists()


def test_whole_tensor_statistics_use_each_tensors_values(ckpts):
    """sce's variance cut with select_topk per tensor: the split tensors' rounds
    (cluster/tensor_stats.py) run with each tensor's own value."""
    root, bp, mps, base, models = ckpts
    topk = [{"filter": "mlp", "value": [0.3, 0.9]}, {"value": 0.5}]
    outs = []
    for split in (False, True):
        raw = native(root, bp, mps, "ta-none", f"sce-{split}", split)
        raw["merge"] = {"method": "sce", "select_topk": topk}
        for m in raw["models"]:
            m.pop("sparsify", None)
            m["weight"] = 1.0
        outs.append(run_merge(parse_config(raw)))
    assert any(len(t.units) > 1 for t in outs[1].plan.tensors if "mlp" in t.name)
    assert model_files(outs[0].output) == model_files(outs[1].output)
    expected = {}
    for n, b0 in base.items():
        ts = [m[n].float() - b0.float() for m in models]
        expected[n] = R.sce(b0.float(), ts, R.at_tensor(topk, n, LAYERS)).to(b0.dtype)
    _check(outs[1].output, expected)


def test_mergekit_forms_that_stay_refused(tmp_path):
    """Gradients with several slices (mergekit reads them within each slice),
    booleans per tensor, normalize with weights per tensor: named, not guessed."""

    def src(m, lr, **p):
        return {"model": m, "layer_range": lr, **({"parameters": p} if p else {})}

    sl = [
        {"sources": [src("b", [0, 2]), src("a", [0, 2], weight=[0.2, 0.8])]},
        {"sources": [src("b", [2, 4]), src("a", [2, 4], weight=[0.2, 0.8])]},
    ]
    raw = {"merge_method": "ties", "base_model": "b", "slices": sl}
    with pytest.raises(ConfigError, match=r"sources\[1\]\.parameters\.weight: a layer gradient "
                       "with several slices"):  # fmt: skip
        translate(raw, tmp_path)
    one = {**raw, "slices": sl[:1]}  # one slice: the gradient spans its layers, as in mergekit
    native_cfg, _ = translate(one, tmp_path)
    assert native_cfg["models"][0]["weight"] == [0.2, 0.8]
    ta = {
        "merge_method": "task_arithmetic",
        "base_model": "b",
        "models": [{"model": "a", "parameters": {"weight": [0.2, 0.8]}}],
        "parameters": {"normalize": True, "rescale": [True, False]},
    }
    with pytest.raises(ConfigError, match=r"2 unsupported") as e:
        translate(ta, tmp_path)
    assert "parameters.normalize: true with weights per tensor" in str(e.value)
