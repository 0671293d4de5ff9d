"""mergekit's nearswap, ram, ramplus_tl, sce and arcee_fusion: whole and split
give the same bytes and match the references (tests/reference.py); sce's variance
cut is exact (ties at the cut included), ramplus_tl's counts span the whole
tensor and arcee_fusion's threshold comes from exact quantiles of a signed score."""

from __future__ import annotations

import os

import pytest
import reference as R
import torch
from checkpoints import SPLIT_RUNTIME, write_checkpoint, write_zoo
from outputs import model_files
from safetensors.torch import load_file

from tadmerge.config import parse_config
from tadmerge.engine import tensor_stats
from tadmerge.engine.spec import BlockContext, MergeSpec, SparsifySpec
from tadmerge.errors import ConfigError
from tadmerge.methods import arcee_fusion
from tadmerge.run.driver import run_merge


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("wtzoo")
    return root, write_zoo(str(root))


def config(root, base, models, merge, out, split, sp=None):
    runtime = {**SPLIT_RUNTIME, "workers": 2} if split else {"progress": "none", "device": "cpu"}
    return parse_config(
        {
            "base": base,
            "models": [{"path": p, "name": f"t{i}"} for i, p in enumerate(models)],
            "sparsify": sp or {"method": "none"},
            "merge": merge,
            "exclude": ["^head\\."],
            "output": {"path": str(root / out)},
            "runtime": runtime,
        }
    )


def reference(method: str, params: dict, base: torch.Tensor, thetas: list[torch.Tensor]):
    ts = [m - base for m in thetas]
    if method == "nearswap":
        return R.nearswap(base, thetas[0], params["t"])
    if method == "ram":
        return R.ram(base, ts, params.get("epsilon", 1e-5))
    if method == "ramplus_tl":
        eps = params.get("epsilon", 1e-5)
        lam = R.ramplus_lambdas(ts, eps, params["r"], params["alpha"])
        return R.ram(base, ts, eps, lam)
    if method == "sce":
        return R.sce(base, ts, params.get("select_topk", 1.0))
    if method == "arcee_fusion":
        return R.arcee_fusion(base, thetas[0])
    raise ValueError(method)


CASES = {
    "nearswap": ({"method": "nearswap", "t": 0.02}, 1),
    "ram": ({"method": "ram", "epsilon": 0.01}, 3),
    "ramplus_tl": ({"method": "ramplus_tl", "r": 0.5, "alpha": 0.9, "epsilon": 0.01}, 3),
    "sce": ({"method": "sce", "select_topk": 0.3}, 3),
    "sce-all": ({"method": "sce"}, 3),
    "arcee_fusion": ({"method": "arcee_fusion"}, 1),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_whole_and_split_same_bytes_and_match_reference(zoo, case):
    root, (bp, mps, base, models) = zoo
    merge, k = CASES[case]
    whole = run_merge(config(root, bp, mps[:k], merge, f"{case}-w", False))
    split = run_merge(config(root, bp, mps[:k], merge, f"{case}-s", True))
    assert any(len(t.units) > 1 for t in split.plan.tensors), "split run did not split"
    assert model_files(whole.output) == model_files(split.output), "split changed the bytes"
    if merge["method"] in ("sce", "ramplus_tl"):
        kinds = split.report["reads"]["round_kinds"]
        assert "tensor-sums" in kinds
        assert ("tensor-coarse" in kinds) == ("select_topk" in merge)
    if merge["method"] == "arcee_fusion":  # quantiles only: no cut, no ties, no sums
        assert {"tensor-coarse", "tensor-fine"} <= set(split.report["reads"]["round_kinds"])
        assert "tensor-sums" not in split.report["reads"]["round_kinds"]
    got = load_file(os.path.join(whole.output, "model.safetensors"))
    params = {k: v for k, v in merge.items() if k != "method"}
    for name, b in base.items():
        if not b.is_floating_point() or name == "head.weight":
            continue
        ref = reference(merge["method"], params, b.float(), [m[name].float() for m in models[:k]])
        ref = ref.to(b.dtype).float()
        tol = 1e-2 if b.dtype == torch.bfloat16 else 1e-5
        assert torch.allclose(got[name].float(), ref, rtol=tol, atol=tol * 1e-2), name


def _tied_checkpoints(root) -> tuple[str, list[str], dict, list[dict]]:
    """Task vectors of a few small values: runs of equal variance everywhere."""
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.zeros(32, 16)}
    models = [{"w": torch.randint(-2, 3, (32, 16), generator=g).float() * 0.5} for _ in range(3)]
    bp = write_checkpoint(str(root / "tbase"), base)
    mps = [write_checkpoint(str(root / f"tm{i}"), m) for i, m in enumerate(models)]
    return bp, mps, base, models


@pytest.mark.parametrize("topk", [0.3, 0.55])
def test_sce_variance_cut_is_exact_with_ties_spread_over_units(tmp_path, topk):
    bp, mps, base, models = _tied_checkpoints(tmp_path)
    merge = {"method": "sce", "select_topk": topk}
    whole = run_merge(config(tmp_path, bp, mps, merge, "w", False))
    split = run_merge(config(tmp_path, bp, mps, merge, "s", True))
    assert len(split.plan.tensors[0].units) > 1
    assert "tensor-ties" in split.report["reads"]["round_kinds"]  # a cut inside a run
    assert model_files(whole.output) == model_files(split.output)
    ts = [m["w"] for m in models]
    expected = R.sce(base["w"], ts, topk)
    got = load_file(os.path.join(whole.output, "model.safetensors"))["w"]
    assert torch.equal(got, expected)


def whole_block(shape: tuple[int, ...]) -> BlockContext:
    """The context of a block that is the whole tensor (it resolves its statistics)."""
    return BlockContext("w", shape, 0, shape[0], shape[0], whole=True, backend="torch")


def test_sce_kept_set_equals_the_reference_mask():
    g = torch.Generator().manual_seed(5)
    ts = [torch.randint(-3, 4, (4000,), generator=g).float() * 0.25 for _ in range(3)]
    spec = MergeSpec(SparsifySpec(), "sce", weights=(1.0,) * 3, params=(("select_topk", 0.37),))
    mine = [t.clone() for t in ts]
    tensor_stats.resolve(torch.zeros(4000), mine, spec, whole_block((4000,)))  # cuts in place
    mask = R.sce_mask(ts, 0.37)
    var = R.sce_variance(ts)
    assert int(mask.sum()) == int(0.37 * int(torch.count_nonzero(var)))
    for t, m in zip(ts, mine, strict=True):
        assert torch.equal(m, torch.where(mask, t, torch.zeros(())))


def test_sce_with_tadrop_whole_and_split(zoo):
    root, (bp, mps, _, _) = zoo
    merge, sp = {"method": "sce", "select_topk": 0.5}, {"method": "tadrop"}
    whole = run_merge(config(root, bp, mps, merge, "sce-tadrop-w", False, sp))
    split = run_merge(config(root, bp, mps, merge, "sce-tadrop-s", True, sp))
    assert model_files(whole.output) == model_files(split.output)


def test_nearswap_takes_one_model(zoo):
    root, (bp, mps, _, _) = zoo
    with pytest.raises(ConfigError, match="nearswap merges exactly 1 model"):
        config(root, bp, mps[:2], {"method": "nearswap"}, "x", False)


def _arcee_checkpoints(root) -> tuple[str, list[str], dict, dict]:
    """Rows mostly moved by a constant (softmax-invariant: KL is rounding noise, a
    third of it negative, so Q1 < 0) and a 1-D tensor larger than a unit."""
    g = torch.Generator().manual_seed(0)
    b = torch.randn(64, 32, generator=g)
    shift = torch.rand(64, 1, generator=g) < 0.85
    m = torch.where(
        shift, b + torch.randn(64, 1, generator=g), b + 0.05 * torch.randn(64, 32, generator=g)
    )
    v = torch.randn(600, generator=g)
    base = {"w": b, "v": v}
    model = {"w": m, "v": v + 0.1 * torch.randn(600, generator=g)}
    bp = write_checkpoint(str(root / "abase"), base)
    return bp, [write_checkpoint(str(root / "am"), model)], base, model


def test_arcee_fusion_exact_with_negative_importance_whole_and_split(tmp_path):
    bp, mps, base, model = _arcee_checkpoints(tmp_path)
    imp = R.arcee_importance(base["w"], model["w"]).reshape(-1)
    s = torch.sort(imp).values
    assert s[(s.numel() - 1) // 4] < 0  # a clamped (unsigned) score would move Q1
    merge = {"method": "arcee_fusion"}
    whole = run_merge(config(tmp_path, bp, mps, merge, "w", False))
    split = run_merge(config(tmp_path, bp, mps, merge, "s", True))
    units = {t.name: len(t.units) for t in split.plan.tensors}
    assert units["w"] > 1 and units["v"] == 1  # a 1-D tensor is one row: never split
    assert model_files(whole.output) == model_files(split.output)
    got = load_file(os.path.join(whole.output, "model.safetensors"))
    for name in ("w", "v"):
        mask = R.arcee_mask(base[name], model[name])
        assert 0 < int(mask.sum()) < mask.numel()
        assert torch.equal(got[name], R.arcee_fusion(base[name], model[name])), name
        assert torch.equal(got[name] != base[name], mask), name  # the selected set


def test_arcee_fusion_threshold_from_the_signed_quantiles():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(50, 20, generator=g)
    model = base + torch.where(torch.rand(50, 1, generator=g) < 0.9, 0.5, 0.0) * 1.0
    model = model + 0.01 * torch.randn(50, 20, generator=g) * (torch.rand(50, 1, generator=g) < 0.1)
    spec = MergeSpec(SparsifySpec(), "arcee_fusion", weights=(1.0,))
    score = arcee_fusion.importance(base, [model - base], spec, (50, 20))
    assert torch.equal(score.view(50, 20), R.arcee_importance(base, model))
    ts = [(model - base).reshape(-1)]
    ctx = whole_block((50, 20))
    values = tensor_stats.resolve(base.reshape(-1), ts, spec, ctx, score=score)["values"]
    got = values["threshold"]
    s = torch.sort(score).values
    n = s.numel()
    expected = s[(n - 1) // 2] + R.f32(1.5) * (s[3 * (n - 1) // 4] - s[(n - 1) // 4])
    assert got == float(expected)


def test_arcee_fusion_takes_one_model(zoo):
    root, (bp, mps, _, _) = zoo
    with pytest.raises(ConfigError, match="arcee_fusion merges exactly 1 model"):
        config(root, bp, mps[:2], {"method": "arcee_fusion"}, "x", False)
