"""Per-model sparsifier values (`models[i].sparsify`, mergekit's per-model density):
each task's keep range or drop probability uses its own values. Checked against
tests/reference.py with a different value per task, whole and split into small
units (statistics rounds), for the magnitude and random families."""

from __future__ import annotations

import math
import os

import pytest
import reference as R
import torch
from checkpoints import write_zoo
from outputs import model_files
from safetensors.torch import load_file

from tadmerge.config import parse_config
from tadmerge.errors import ConfigError
from tadmerge.run.driver import run_merge

BLOCK = 64
WEIGHTS = [1.0, 0.5, 2.0]
# (sparsify section, per task overrides, combiner, scope)
CASES = {
    "magnitude-ties": ({"method": "magnitude", "density": 0.3}, ["density"], "ties", "tensor"),
    "magnitude-ta-global": (
        {"method": "magnitude", "density": 0.3, "rescale": "inverse_keep"},
        ["density"],
        "task_arithmetic",
        "global",
    ),
    "breadcrumbs-ta": (
        {"method": "magnitude_outliers", "density": 0.5, "gamma": 0.05},
        ["density", "gamma"],
        "task_arithmetic",
        "tensor",
    ),
    "random-ties": (
        {"method": "random", "p": 0.6, "rescale": "inverse_keep"},
        ["p"],
        "ties",
        "tensor",
    ),
    "della-linear": (
        {"method": "della", "density": 0.5, "epsilon": 0.1, "rescale": "inverse_keep"},
        ["density"],
        "linear",
        "tensor",
    ),
    "tadrop-global": (
        {"method": "tadrop", "low_q": 0.5, "high_q": 0.95, "rescale": "l2"},
        ["low_q"],
        "ties",
        "global",
    ),
}
# per task values of each overridable key (task 0 keeps the section's value)
VALUES = {"density": [None, 0.7, 0.15], "gamma": [None, 0.0, 0.1], "p": [None, 0.2, 0.9],
          "low_q": [None, 0.3, 0.7]}  # fmt: skip


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo-pm")
    return root, write_zoo(str(root))


def task_sp(sp: dict, keys: list[str], k: int) -> dict:
    over = {key: VALUES[key][k] for key in keys if VALUES[key][k] is not None}
    if sp["method"] == "della" and "density" in over:
        over["density"] = min(max(over["density"], 0.2), 0.8)  # density ± epsilon in (0, 1]
    return over


def config(root, paths, case: str, out: str, split: bool):
    sp, keys, method, scope = CASES[case]
    base, models = paths
    raw = {
        "base": base,
        "models": [
            {"path": p, "name": f"t{i}", "weight": WEIGHTS[i]}
            | ({"sparsify": o} if (o := task_sp(sp, keys, i)) else {})
            for i, p in enumerate(models)
        ],
        "sparsify": {**sp, **({"scope": scope} if sp["method"] != "della" else {})},
        "merge": {"method": method, **({"scale": 0.7} if method != "linear" else {})},
        "exclude": ["^head\\."],
        "output": {"path": str(root / out)},
        "runtime": {"block_elements": BLOCK, "progress": "none"},
        "seed": 7,
    }
    if split:
        raw["runtime"].update(workers=2, max_unit_elements=2 * BLOCK, memory_budget="256MB")
    return parse_config(raw)


def reference(base: dict, models: list[dict], case: str) -> dict:
    sp, keys, method, scope = CASES[case]
    full = {"rescale": "none", **sp}
    names = [n for n in sorted(base) if base[n].is_floating_point() and n != "head.weight"]
    ts = []
    for k, m in enumerate(models):
        spk = {**full, **task_sp(sp, keys, k)}
        tau = {n: m[n].float() - base[n].float() for n in names}
        if scope == "global":
            ts.append(R.global_sparsify(tau, spk))
            continue
        rows = {n: max(1, BLOCK // _row_numel(base[n].shape)) for n in names}
        ts.append(
            {n: R.sparsify(tau[n], spk, task=k, name=n, seed=7, block_rows=rows[n]) for n in names}
        )
    out = {}
    for n in names:
        merged = R.combine(
            method,
            base[n].float(),
            [m[n].float() for m in models],
            [t[n] for t in ts],
            WEIGHTS,
            0.7,
        )
        out[n] = merged.to(base[n].dtype)
    for n in base:
        out.setdefault(n, base[n])
    return out


def _row_numel(shape) -> int:
    return math.prod(shape[1:]) if len(shape) > 1 else 1


@pytest.mark.parametrize("case", list(CASES))
def test_each_task_uses_its_own_values_whole_and_split(zoo_dir, case):
    root, (base_path, model_paths, base, models) = zoo_dir
    whole = run_merge(config(root, (base_path, model_paths), case, f"{case}-whole", False))
    split = run_merge(config(root, (base_path, model_paths), case, f"{case}-split", True))
    assert any(len(t.units) > 1 for t in split.plan.tensors)
    assert model_files(whole.output) == model_files(split.output), "split changed the bytes"
    got = load_file(os.path.join(whole.output, "model.safetensors"))
    expected = reference(base, models, case)
    assert set(got) == set(expected)
    for n, v in expected.items():
        assert torch.equal(got[n].view(-1), v.reshape(-1)), n


def test_the_values_differ_per_task_in_the_output(zoo_dir):
    """Not a no-op: the per-task densities change the kept counts task by task."""
    root, (base_path, model_paths, _, _) = zoo_dir
    res = run_merge(config(root, (base_path, model_paths), "magnitude-ties", "kept", False))
    t = next(t for t in res.report["tensors"].values() if t.get("kind") == "merge")
    kept = [t["tasks"][f"t{k}"]["kept"] / t["n"] for k in range(3)]
    assert kept[1] > kept[0] > kept[2]


@pytest.mark.parametrize(
    "over,key",
    [
        ({"scope": "global"}, "models[0].sparsify.scope"),
        ({"method": "random"}, "models[0].sparsify.method"),
        ({"p": 0.5}, "models[0].sparsify.p"),
        ({"density": 1.5}, "models[0].sparsify.density"),
        ({"density": 0.99}, "models[0].sparsify.density + models[0].sparsify.gamma"),
    ],
)
def test_bad_per_model_values_name_the_key(over, key):
    raw = {
        "base": "/x/base",
        "models": [{"path": "/x/a", "sparsify": over}, {"path": "/x/b"}],
        "sparsify": {"method": "breadcrumbs", "density": 0.5, "gamma": 0.05},
    }
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    assert key in str(e.value)
