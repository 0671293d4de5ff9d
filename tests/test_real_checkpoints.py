"""Checkpoints as users have them: fine-tunes saved in another float dtype than
the base's (tests with real transformers models: tests/test_transformers_models.py)."""

from __future__ import annotations

import os

import pytest
import torch
from checkpoints import write_checkpoint, zoo
from safetensors.torch import load_file
from test_merge_exact import SPARSIFIERS, config, reference_merge

from tadmerge.io import publish
from tadmerge.run.driver import run_merge

# model k saved in this dtype (every float tensor): F32, F16 and the base's own
CASTS = [torch.float32, torch.float16, None]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    base, models = zoo(seed=1)
    models = [
        {n: v.to(dt) if dt is not None and v.is_floating_point() else v for n, v in m.items()}
        for m, dt in zip(models, CASTS, strict=True)
    ]
    bp = write_checkpoint(os.path.join(root, "base"), base, shards=2)
    mps = [write_checkpoint(os.path.join(root, f"m{i}"), m) for i, m in enumerate(models)]
    return root, (bp, mps), base, models


@pytest.mark.parametrize(
    "sname,method",
    [
        ("none", "task_arithmetic"),  # engine/stream.py (numpy: the inputs are not all bf16)
        ("none", "average"),
        ("tadrop", "task_arithmetic"),  # not engine/raw.py's bf16 kernels: the torch engine
        ("tadrop", "ties"),
        ("magnitude", "linear"),
    ],
)
def test_mixed_float_dtypes_merge_as_widened(mixed, sname, method):
    """τ = widen(model) − widen(base): the reference widens every input to float32;
    whole and split runs give its bytes, in the base's dtype."""
    root, paths, base, models = mixed
    sp = SPARSIFIERS[sname]
    whole = run_merge(config(root, paths, sp, method, "tensor", f"{sname}-{method}", False))
    split = run_merge(config(root, paths, sp, method, "tensor", f"{sname}-{method}-s", True))
    expected, _ = reference_merge(base, models, sp, method, "tensor")
    for res in (whole, split):
        got = load_file(os.path.join(res.output, "model.safetensors"))
        assert set(got) == set(expected)
        for n, v in expected.items():
            assert got[n].dtype == base[n].dtype, n
            assert torch.equal(got[n].view(-1), v.reshape(-1)), n
        assert publish.verify_output(res.output) == []
    # the report says what was widened: per model, from -> to, with tensor counts
    floats = [n for n, v in base.items() if v.is_floating_point()]
    by_dtype: dict[str, int] = {}
    for n in floats:
        d = {torch.bfloat16: "BF16", torch.float32: "F32"}[base[n].dtype]
        by_dtype[d] = by_dtype.get(d, 0) + 1
    casts = whole.report["casts"]
    assert casts["t0"] == [{"from": "F32", "to": "BF16", "tensors": by_dtype["BF16"]}]
    assert casts["t1"] == [
        {"from": "F16", "to": "BF16", "tensors": by_dtype["BF16"]},
        {"from": "F16", "to": "F32", "tensors": by_dtype["F32"]},
    ]
    assert "t2" not in casts
    # the model card (README.md) states them, and the drop rates of the report
    card = open(os.path.join(whole.output, "README.md"), encoding="utf-8").read()
    assert "- t0: " in card and "F32 → BF16" in card
    if sname != "none":
        merged = [e for e in whole.report["tensors"].values() if e["kind"] == "merge"]
        for task in ("t0", "t1", "t2"):
            n = sum(e["tasks"][task]["n"] for e in merged)
            kept = sum(e["tasks"][task]["kept"] for e in merged)
            assert f"| {task} | {100 * (1 - kept / n):.2f}% |" in card
    else:
        assert "## Drop rates" not in card


def test_mixed_dtypes_emr_keeps_excluded_tensors_in_each_tasks_dtype(mixed):
    """EMR keeps an excluded tensor per task: in the task's own dtype and bytes."""
    root, paths, base, models = mixed
    res = run_merge(config(root, paths, SPARSIFIERS["none"], "emr", "tensor", "emr", True))
    for k, m in enumerate(models):
        kept = load_file(os.path.join(res.output, "tasks", f"t{k}", "model.safetensors"))
        assert kept["head.weight"].dtype == m["head.weight"].dtype
        assert torch.equal(kept["head.weight"], m["head.weight"])
    expected, lam = reference_merge(base, models, SPARSIFIERS["none"], "emr", "tensor")
    got = load_file(os.path.join(res.output, "model.safetensors"))
    for n, (uni, _) in expected.items():
        assert torch.equal(got[n], uni), n
    assert publish.verify_output(res.output) == []


def test_same_dtype_merge_has_no_casts(tmp_path):
    base, models = zoo(seed=2, k=2)
    bp = write_checkpoint(str(tmp_path / "base"), base)
    mps = [write_checkpoint(str(tmp_path / f"m{i}"), m) for i, m in enumerate(models)]
    res = run_merge(
        config(tmp_path, (bp, mps), SPARSIFIERS["none"], "task_arithmetic", "tensor", "o", False)
    )
    assert "casts" not in res.report


def test_float_against_non_float_is_still_refused(tmp_path):
    from tadmerge.errors import InputError

    base, models = zoo(seed=3, k=2)
    models[0]["buffer.ids"] = models[0]["buffer.ids"].float()
    bp = write_checkpoint(str(tmp_path / "base"), base)
    mps = [write_checkpoint(str(tmp_path / f"m{i}"), m) for i, m in enumerate(models)]
    with pytest.raises(InputError, match=r"F32 in model 't0' vs I64 in the base"):
        run_merge(
            config(
                tmp_path, (bp, mps), SPARSIFIERS["none"], "task_arithmetic", "tensor", "o", False
            )
        )
