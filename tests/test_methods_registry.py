"""The method registry (tadmerge/methods/): declarations drive the config, the help
and the README; a method is one module; linear (the first mergekit method) merges
like its reference, whole and split."""

from __future__ import annotations

from pathlib import Path

import pytest
import reference as R
import torch
from checkpoints import write_zoo
from safetensors.torch import load_file

from tadmerge import methods
from tadmerge.cli import main
from tadmerge.config import parse_config
from tadmerge.errors import EXIT_CONFIG, ConfigError
from tadmerge.methods.registry import _README_BLOCK, reference_markdown
from tadmerge.run.driver import run_merge

README = Path(__file__).resolve().parent.parent / "README.md"
WEIGHTS = [1.0, 0.5, 2.0]


def test_every_method_is_registered_once_with_a_block_function():
    assert set(methods.sparsifiers()) == {
        "none", "tadrop", "magnitude", "breadcrumbs", "magnitude_outliers", "random", "della",
    }  # fmt: skip
    assert {"average", "linear", "task_arithmetic", "ties", "emr"} <= set(methods.combiners())
    for c in methods.combiners().values():
        # a block function; one with no merge_block works on the weights
        fn = c.merge_block or c.merge_weights
        assert callable(fn), c.name
    for s in methods.sparsifiers().values():
        assert (s.family == methods.MAGNITUDE) == (s.keep_range is not None), s.name
        assert (s.family == methods.RANDOM) == (s.block is not None), s.name
    # every declared default passes its own validation
    for table in (methods.sparsifiers(), methods.combiners()):
        for m in table.values():
            for p in m.params:
                assert p.parse(p.default, p.name) == p.default


def test_readme_method_reference_is_the_generated_one():
    text = README.read_text()
    m = _README_BLOCK.search(text)
    assert m, "README lacks the methods:begin/end block"
    assert m.group(2) == reference_markdown(), (
        "README's method reference is stale: python -m tadmerge.methods README.md"
    )


def test_methods_command_prints_declarations(capsys):
    assert main(["methods", "tadrop"]) == 0
    out = capsys.readouterr().out
    for key in ("low_q", "high_q", "max_drop", "rescale", "scope", "eps"):
        assert f"{key}:" in out
    assert "density" not in out
    assert main(["methods", "nope"]) == EXIT_CONFIG
    assert "known:" in capsys.readouterr().err


def _raw(**merge):
    return {"base": "b", "models": ["m1", "m2"], "merge": merge}


def test_declared_ranges_and_cross_checks_name_the_key():
    with pytest.raises(ConfigError, match=r"sparsify\.p: must be < 1"):
        parse_config({**_raw(), "sparsify": {"method": "random", "p": 1.0}})
    with pytest.raises(ConfigError, match=r"sparsify\.rescale: expected one of inverse_keep, none"):
        parse_config({**_raw(), "sparsify": {"method": "della", "rescale": "l2"}})
    with pytest.raises(ConfigError, match=r"merge\.normalize: expected true or false"):
        parse_config(_raw(method="linear", normalize="yes"))
    with pytest.raises(ConfigError, match=r"must not sum to 0"):
        parse_config({**_raw(method="linear"), "models": [
            {"path": "a", "weight": 1.0}, {"path": "b", "weight": -1.0}]})  # fmt: skip
    # another method's key is checked, then ignored (and said)
    with pytest.raises(ConfigError, match=r"sparsify\.density: must be > 0"):
        parse_config({**_raw(), "sparsify": {"method": "tadrop", "density": 0}})
    cfg = parse_config({**_raw(method="average", scale=0.3), "sparsify": {"method": "tadrop"}})
    assert cfg.merge.params == () and cfg.to_dict()["merge"] == {"method": "average"}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("linzoo")
    return root, write_zoo(str(root))


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("sparsify", ["none", "tadrop"])
def test_linear_matches_its_reference_whole_and_split(zoo, normalize, sparsify):
    root, (base_path, model_paths, base, models) = zoo
    sp = {"method": sparsify}
    outs = []
    for split in (False, True):
        runtime = {"progress": "none", "block_elements": 64}
        if split:
            runtime.update(workers=2, max_unit_elements=128, memory_budget="256MB")
        cfg = parse_config({
            "base": base_path,
            "models": [{"path": p, "weight": w} for p, w in zip(model_paths, WEIGHTS, strict=True)],
            "sparsify": sp,
            "merge": {"method": "linear", "normalize": normalize},
            "exclude": ["^head\\."],
            "output": {"path": str(root / f"lin-{normalize}-{sparsify}-{split}")},
            "runtime": runtime,
        })  # fmt: skip
        result = run_merge(cfg)
        outs.append(load_file(result.output + "/model.safetensors"))
        # the report's per-task figures: every merge's, plus what the methods declare
        fig = next(iter(result.report["tensors"]["layers.0.attn.weight"]["tasks"].values()))
        assert {"n", "kept", "drop_rate", "norm", "norm_after"} <= set(fig)
        assert ("q_low" in fig) == (sparsify == "tadrop") and ("scale" in fig) == (
            sparsify == "tadrop"
        )
    whole, split = outs
    sp_ref = {"method": sparsify, "low_q": 0.5, "high_q": 0.95, "rescale": "l2"}
    for name, got in whole.items():
        assert _bits(got) == _bits(split[name]), name
        b = base[name]
        if not b.is_floating_point() or name == "head.weight":
            continue
        taus = [m[name].float() - b.float() for m in models]
        ts = taus if sparsify == "none" else [
            R.sparsify(t, sp_ref, task=k, name=name, seed=0, block_rows=1)
            for k, t in enumerate(taus)
        ]  # fmt: skip
        want = R.linear(
            b.float(), [m[name].float() for m in models], ts, WEIGHTS, normalize,
            sparse=sparsify != "none",
        ).to(b.dtype)  # fmt: skip
        assert _bits(got) == _bits(want), name


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


# the combiners whose math never reads a model's weight (docs/semantics.md: "Weights
# ignored", "not used"; slerp interpolates at t, passthrough copies)
IGNORE_WEIGHTS = {"karcher", "model_stock", "sce", "arcee_fusion", "nearswap", "ram",
                  "ramplus_tl", "emr", "slerp", "passthrough"}  # fmt: skip


def test_combiners_declare_whether_they_use_the_models_weights():
    table = methods.combiners()
    assert {n for n, c in table.items() if not c.uses_weights} == IGNORE_WEIGHTS
    assert IGNORE_WEIGHTS < set(table)


def _weights_raw(method: str, *weights, **merge) -> dict:
    models = [{"path": f"m{i}", "weight": w} for i, w in enumerate(weights)]
    return {"base": "b", "models": models, "merge": {"method": method, **merge}}


@pytest.mark.parametrize(
    "method,merge,weights,warned",
    [
        ("ram", {}, (0.5, 1.0, 2), ["m0", "m2"]),
        ("sce", {}, (1.0, [1.0, 0.3]), ["m1"]),  # a gradient that is not 1 everywhere
        ("karcher", {}, ([{"filter": "mlp", "value": 0.5}, {"value": 1.0}], 1), ["m0"]),
        ("nearswap", {"t": 0.5}, (3.0,), ["m0"]),
        ("ram", {}, (1, 1.0, [1.0, 1.0]), []),  # all 1: nothing to say
        ("task_arithmetic", {}, (0.5, 2.0), []),  # it uses them
    ],
)
def test_a_weight_the_combiner_ignores_is_warned_once(caplog, method, merge, weights, warned):
    with caplog.at_level("WARNING", logger="tadmerge"):
        parse_config(_weights_raw(method, *weights, **merge))
    lines = [r.getMessage() for r in caplog.records if "weight" in r.getMessage()]
    if not warned:
        assert lines == []
        return
    (line,) = lines
    assert method in line and "ignores" in line
    for i in range(len(weights)):
        assert (f"m{i}" in line) == (f"m{i}" in warned), line


def test_methods_command_and_reference_say_a_combiner_ignores_weights(capsys):
    assert main(["methods", "ram"]) == 0
    assert "ignores the models' weight" in capsys.readouterr().out
    assert main(["methods", "ties"]) == 0
    assert "ignores the models' weight" not in capsys.readouterr().out
    ref = reference_markdown()
    for line in ref.splitlines():
        name = line.split("`")[1] if line.startswith("| `") else None
        if name in methods.combiners() and line.count("`") >= 2:
            assert ("ignores the models' weight" in line) == (name in IGNORE_WEIGHTS), line
