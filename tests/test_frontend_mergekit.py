"""mergekit configs (tadmerge/frontends/mergekit.py): detected from their keys,
translated into the native config of the same merge, every unsupported key named
in one error before any read; `tadmerge convert` prints a native config that
merges to the same bytes. (The comparison with mergekit itself is
tests/test_crosscheck_mergekit.py.)"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import reference as R
import torch
import yaml
from checkpoints import write_zoo
from safetensors.torch import load_file

from tadmerge import methods
from tadmerge.cli import main
from tadmerge.config import load_config, parse_config
from tadmerge.errors import EXIT_CONFIG, ConfigError
from tadmerge.frontends import detect
from tadmerge.frontends.mergekit import translate

WEIGHTS = [1.0, 0.5, 2.0]


def _mk(method: str, params: dict | None = None, per_model: dict | None = None, **top) -> dict:
    models = [
        {"model": f"m{i}", "parameters": {"weight": w, **(per_model or {})}}
        for i, w in enumerate(WEIGHTS)
    ]
    cfg = {"merge_method": method, "base_model": "b", "models": models, **top}
    if params:
        cfg["parameters"] = params
    return cfg


@pytest.mark.parametrize(
    "method, params, sparsify, merge",
    [
        ("linear", {"weight": 0.5}, {"method": "none"}, {"method": "linear", "normalize": True}),
        ("task_arithmetic", {"lambda": 0.3}, {"method": "none"},
         {"method": "task_arithmetic", "scale": 0.3}),
        ("ties", {"density": 0.2}, {"method": "magnitude", "density": 0.2, "rescale": "none"},
         {"method": "ties", "scale": 1.0, "disjoint": "mean"}),
        ("ties", {"density": 0.2, "normalize": False, "rescale": True, "lambda": 2},
         {"method": "magnitude", "density": 0.2, "rescale": "l1"},
         {"method": "ties", "scale": 2.0, "disjoint": "sum"}),
        ("ties", {}, {"method": "none"}, {"method": "ties", "scale": 1.0, "disjoint": "mean"}),
        ("dare_ties", {"density": 0.3}, {"method": "random", "p": 0.7, "rescale": "inverse_keep"},
         {"method": "ties", "scale": 1.0, "disjoint": "sum"}),
        ("dare_linear", {"density": 0.3, "rescale": False},
         {"method": "random", "p": 0.7, "rescale": "none"},
         {"method": "task_arithmetic", "scale": 1.0}),
        ("breadcrumbs", {"density": 0.5},
         {"method": "magnitude_outliers", "density": 0.5, "gamma": 0.01, "rescale": "none"},
         {"method": "task_arithmetic", "scale": 1.0}),
        ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.05},
         {"method": "magnitude_outliers", "density": 0.5, "gamma": 0.05, "rescale": "none"},
         {"method": "ties", "scale": 1.0, "disjoint": "sum"}),
        ("della", {"density": 0.5},
         {"method": "della", "density": 0.5, "epsilon": 0.15, "rescale": "inverse_keep"},
         {"method": "ties", "scale": 1.0, "disjoint": "mean"}),
        ("della_linear", {"density": 0.5, "epsilon": 0.2},
         {"method": "della", "density": 0.5, "epsilon": 0.2, "rescale": "inverse_keep"},
         {"method": "task_arithmetic", "scale": 1.0}),
    ],
)  # fmt: skip
def test_each_mapped_method_translates_to_its_sparsifier_and_combiner(
    tmp_path, method, params, sparsify, merge
):
    raw = _mk(method, params)
    assert detect(raw) == "mergekit" and detect({"base": "b", "merge": {}}) == "native"
    native, _ = translate(raw, tmp_path)
    assert native["sparsify"] == sparsify
    assert native["merge"] == merge
    weights = [m["weight"] for m in native["models"]]
    # mergekit's linear merges the base too, with the top-level weight
    assert weights == (WEIGHTS + [0.5] if method == "linear" else WEIGHTS)
    assert native["output"]["path"] == str(tmp_path / "out")


def test_linear_includes_the_base_and_normalize_folds_into_the_weights(tmp_path):
    # mergekit's linear merges base_model too, with the top-level weight
    native, _ = translate(_mk("linear", {"weight": 0.25}), tmp_path)
    assert [m["weight"] for m in native["models"]] == [*WEIGHTS, 0.25]
    assert native["models"][-1]["path"] == "b"
    with pytest.raises(ConfigError, match=r"parameters\.weight: required"):
        translate(_mk("linear"), tmp_path)
    # normalize without a consensus: task arithmetic with w_k / Σ w
    native, _ = translate(_mk("dare_linear", {"density": 0.5, "normalize": True}), tmp_path)
    total = sum(WEIGHTS)
    assert [m["weight"] for m in native["models"]] == [w / total for w in WEIGHTS]
    # the base listed among the models is the base, not a task (GTA methods)
    raw = _mk("ties", {"density": 0.5})
    raw["models"].append({"model": "b", "parameters": {"weight": 9.0}})
    native, _ = translate(raw, tmp_path)
    assert len(native["models"]) == 3


def test_parameters_resolve_like_mergekit(tmp_path):
    # per model over global; an unfiltered {value} or a constant gradient maps exactly
    raw = _mk("ties", {"density": 0.9, "weight": 7.0})
    raw["models"][0]["parameters"] = {"density": [0.5, 0.5, 0.5], "weight": [{"value": 2.0}]}
    raw["models"][1]["parameters"] = {"density": {"value": 0.5, "filter": "*"}}
    raw["models"][2]["parameters"] = {
        "density": 0.5,
        "weight": [{"filter": "mlp", "value": 3.0}, {"value": 3.0}, {"filter": "x", "value": 1}],
    }
    native, notes = translate({**raw, "dtype": "bfloat16"}, tmp_path)
    assert native["sparsify"]["density"] == 0.5
    assert [m["weight"] for m in native["models"]] == [2.0, 7.0, 3.0]
    assert native["output"]["dtype"] == "bfloat16"  # out_dtype absent: mergekit writes dtype
    assert any("computes in float32" in n for n in notes)
    native, _ = translate({**raw, "dtype": "bfloat16", "out_dtype": "float32"}, tmp_path)
    assert native["output"]["dtype"] == "float32"


def test_every_unsupported_key_is_named_in_one_error_before_any_read(tmp_path, capsys):
    raw = _mk("ties", {"density": 0.5})
    # numbers per tensor are taken (a layer gradient, filter entries); booleans are not
    raw["models"][0]["parameters"]["weight"] = [0.1, 0.9]
    raw["models"][1]["parameters"]["weight"] = [{"filter": "mlp", "value": 0.3}, {"value": 1}]
    raw["parameters"]["normalize"] = [True, False]
    raw["parameters"]["int8_mask"] = [{"filter": "mlp", "value": True}, {"value": False}]
    raw["models"][2]["parameters"]["density"] = 0.0  # a density of its own, out of range
    raw["models"].append({"model": "x+lora", "parameters": {"weight": 1}})
    tok = {"source": "union", "tokens": {"<x>": {"source": "m0"}}}
    raw.update(modules={"x": {}}, tokenizer=tok, chat_template="chatml")
    raw.update(dtype="int64", tadmerge={"bogus": 1})
    cfg = tmp_path / "mk.yml"
    cfg.write_text(yaml.safe_dump(raw))
    # the paths do not exist: a read would be exit 3, the config error comes first
    assert main(["merge", str(cfg), "--out", str(tmp_path / "o")]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "9 unsupported settings" in err
    assert "weight" not in err
    for key in (
        "modules:", "tokenizer.tokens:", "chat_template:", "dtype:", "tadmerge.bogus:",
        "parameters.normalize: a layer gradient", "models[3].model:",
        "parameters.int8_mask: values per tensor (filter 'mlp')",
        "density (model 'm2'): 0.0: a density <= 0",
    ):  # fmt: skip
        assert key in err, key
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match=r"slices: passthrough stacks layer ranges"):
        translate(_mk("passthrough"), tmp_path)
    for method in ("nope",):
        with pytest.raises(ConfigError, match=r"merge_method: .*" + method):
            translate(_mk(method), tmp_path)
    with pytest.raises(ConfigError, match=r"base_model: required by dare_ties"):
        translate({k: v for k, v in _mk("dare_ties").items() if k != "base_model"}, tmp_path)
    with pytest.raises(ConfigError, match=r"epsilon: della needs"):
        translate(_mk("della", {"density": 0.9, "epsilon": 0.15}), tmp_path)


def test_magnitude_outliers_keeps_what_mergekit_keeps():
    """mergekit's magnitude_outliers: n_bot = max(0, n - int(d n) - int(g n)), keep
    ranks [n_bot, n_bot + int(d n)) ascending (sparsify.py, read not copied)."""
    keep_range = methods.sparsifier("magnitude_outliers").keep_range
    for n in (1, 7, 64, 100, 1000, 4097):
        for d in (0.01, 0.2, 0.5, 0.95, 1.0):
            for g in (0.0, 0.01, 0.1, 0.5):

                class S:
                    density, gamma = d, g

                target, top = int(d * n), int(g * n)
                n_bot = max(0, n - target - top)
                assert keep_range(n, S, None) == (n_bot, n_bot + target), (n, d, g)
    # today's breadcrumbs keeps more at these sizes (why magnitude_outliers exists)
    bc = methods.sparsifier("breadcrumbs").keep_range

    class S2:
        density, gamma = 0.2, 0.01

    assert bc(64, S2, None) == (50, 64) and keep_range(64, S2, None) == (52, 64)
    assert math.floor(0.2 * 64) == 12


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("mkzoo")
    return root, write_zoo(str(root))


def _merge(args: list[str]) -> None:
    assert main(["-q", "merge", *args, "--overwrite", "--progress", "none"]) == 0


@pytest.mark.parametrize(
    "method, params, ext",
    [
        ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.1}, None),
        ("dare_ties", {"density": 0.4}, {"seed": 3, "exclude": ["^head\\."]}),
        ("task_arithmetic", {"lambda": 0.5}, {"sparsify": "tadrop"}),
        ("ties", {"density": 0.5}, {"sparsify": {"method": "tadrop", "max_drop": 0.8}}),
    ],
)
def test_convert_prints_a_native_config_of_the_same_merge(
    zoo, tmp_path, monkeypatch, capsys, method, params, ext
):
    root, (base_path, model_paths, base, models) = zoo
    monkeypatch.chdir(root)  # mergekit reads relative paths from the working directory
    raw = {
        "merge_method": method,
        "base_model": "./base",
        "models": [
            {"model": "./" + Path(p).name, "parameters": {"weight": w}}
            for p, w in zip(model_paths, WEIGHTS, strict=True)
        ],
        "parameters": params,
    }
    if ext:
        raw["tadmerge"] = ext
    mk = tmp_path / "mk.yml"
    mk.write_text(yaml.safe_dump(raw))
    assert main(["convert", str(mk), "--out", str(tmp_path / "native-out")]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# tadmerge native config")
    native = tmp_path / "sub" / "native.yml"  # elsewhere: its paths are absolute
    native.parent.mkdir()
    native.write_text(text)
    cfg = load_config(native)
    if ext and "sparsify" in ext:
        assert cfg.sparsify.method == "tadrop"
        assert cfg.merge.method == ("ties" if method == "ties" else "task_arithmetic")
    _merge([str(mk), "--out", str(tmp_path / "mk-out")])
    _merge([str(native)])
    a = load_file(str(tmp_path / "mk-out" / "model.safetensors"))
    b = load_file(str(tmp_path / "native-out" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert _bits(a[name]) == _bits(b[name]), name
    if method == "breadcrumbs_ties":  # and it is mergekit's breadcrumbs (the reference)
        sp = {"method": "magnitude_outliers", "density": 0.5, "gamma": 0.1, "rescale": "none"}
        for name, got in a.items():
            b0 = base[name]
            if not b0.is_floating_point() or name.startswith("head."):
                continue
            taus = [m[name].float() - b0.float() for m in models]
            ts = [R.sparsify(t, sp, task=k, name=name, seed=0, block_rows=1)
                  for k, t in enumerate(taus)]  # fmt: skip
            want = R.combine("ties", b0.float(), None, ts, WEIGHTS, 1.0, "sum").to(b0.dtype)
            assert _bits(got) == _bits(want), name


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _mk_file(root: Path, model_paths: list[str], tmp_path: Path, ext: dict | None) -> Path:
    raw = {
        "merge_method": "dare_ties",
        "base_model": str(root / "base"),
        "models": [
            {"model": p, "parameters": {"weight": w, "density": 0.5}}
            for p, w in zip(model_paths, WEIGHTS, strict=True)
        ],
        "dtype": "float32",
    }
    if ext:
        raw["tadmerge"] = ext
    mk = tmp_path / f"mk-{len(ext or {})}.yml"
    mk.write_text(yaml.safe_dump(raw))
    return mk


def test_merge_py_runs_a_mergekit_config(zoo, tmp_path):
    """`python merge.py mergekit.yml` (the Ray job entry point) is `tadmerge merge`."""
    import subprocess
    import sys

    root, (base_path, model_paths, base, models) = zoo
    mk = _mk_file(root, model_paths, tmp_path, None)
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(repo / "merge.py"), str(mk), "--out", str(tmp_path / "a")]
    r = subprocess.run(
        [*cmd, "--progress", "none"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    _merge([str(mk), "--out", str(tmp_path / "b")])
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(_bits(a[n]) == _bits(b[n]) for n in a)


@pytest.mark.ray
def test_mergekit_config_on_ray_matches_local(ray_session, zoo, tmp_path):
    """The extension's runtime section picks the Ray executor: the same bytes."""
    root, (base_path, model_paths, base, models) = zoo
    mk_local = _mk_file(root, model_paths, tmp_path, None)
    mk_ray = _mk_file(root, model_paths, tmp_path, {"runtime": {"executor": "ray", "workers": 2}})
    assert load_config(mk_ray).runtime.executor == "ray"
    _merge([str(mk_local), "--out", str(tmp_path / "local")])
    _merge([str(mk_ray), "--out", str(tmp_path / "ray")])
    a = load_file(str(tmp_path / "local" / "model.safetensors"))
    b = load_file(str(tmp_path / "ray" / "model.safetensors"))
    assert a.keys() == b.keys() and all(_bits(a[n]) == _bits(b[n]) for n in a)


@pytest.mark.parametrize(
    "method, params, merge",
    [
        ("ram", {}, {"method": "ram", "epsilon": 1e-5}),
        ("ramplus_tl", {"r": 0.3, "alpha": 0.5},
         {"method": "ramplus_tl", "r": 0.3, "alpha": 0.5, "epsilon": 1e-5}),
        ("sce", {"select_topk": 0.4, "int8_mask": True}, {"method": "sce", "select_topk": 0.4}),
    ],
)  # fmt: skip
def test_own_combiners_translate_with_their_parameters(tmp_path, method, params, merge):
    native, notes = translate(_mk(method, params), tmp_path)
    assert native["sparsify"] == {"method": "none"}
    assert native["merge"] == merge
    assert [m["weight"] for m in native["models"]] == [1.0] * 3  # mergekit uses no weight
    assert any("takes no weight" in n for n in notes)


def test_nearswap_needs_t_and_one_model_and_sce_takes_tadrop(tmp_path):
    with pytest.raises(ConfigError, match=r"parameters\.t: required by nearswap") as e:
        translate(_mk("nearswap"), tmp_path)
    assert "nearswap merges exactly 1 model(s)" in str(e.value)
    raw = _mk("nearswap", {"t": 0.01})
    raw["models"] = raw["models"][:1]
    native, _ = translate(raw, tmp_path)
    assert native["merge"] == {"method": "nearswap", "t": 0.01}
    native, notes = translate(_mk("sce", {"select_topk": 0.3}, tadmerge={"sparsify": "tadrop"}),
                              tmp_path)  # fmt: skip
    assert native["sparsify"] == {"method": "tadrop"}
    assert native["merge"] == {"method": "sce", "select_topk": 1.0}
    assert any("replaces sce's variance selection" in n for n in notes)


def test_tokenizer_source_maps_to_the_native_tokenizer(tmp_path):
    """mergekit's tokenizer_source (or tokenizer.source, default union): union, base
    (the native default: no key) or a model's path, which becomes its name."""
    native, _ = translate(_mk("ties", tokenizer_source="union"), tmp_path)
    assert native["tokenizer"] == {"source": "union"}
    assert parse_config(native).tokenizer.source == "union"
    native, _ = translate(_mk("ties", tokenizer={}), tmp_path)  # (mergekit's default)
    assert native["tokenizer"] == {"source": "union"}
    native, _ = translate(_mk("ties", tokenizer_source="m1"), tmp_path)
    assert native["tokenizer"] == {"source": "m1"}
    assert parse_config(native).tokenizer.source == "m1"
    for base in ("base", "b"):
        native, _ = translate(_mk("ties", tokenizer_source=base), tmp_path)
        assert "tokenizer" not in native
    with pytest.raises(ConfigError, match=r"tokenizer_source: 'x' is neither the base_model"):
        translate(_mk("ties", tokenizer_source="x"), tmp_path)
    with pytest.raises(ConfigError, match=r"tokenizer.pad_to_multiple_of: not supported yet"):
        translate(_mk("ties", tokenizer={"source": "union", "pad_to_multiple_of": 64}), tmp_path)


def test_tensor_sums_methods_translate(tmp_path):
    """slerp, nuslerp, multislerp, karcher and model_stock map onto the combiners of
    the same name with no sparsifier; their parameters, the base's role and the
    model counts as mergekit has them."""
    two = {**_mk("slerp", {"t": 0.25}), "models": [{"model": "b"}, {"model": "m1"}]}
    native, _ = translate(two, tmp_path)
    assert native["sparsify"] == {"method": "none"}
    assert native["merge"] == {"method": "slerp", "t": 0.25}
    assert [Path(m["path"]).name for m in native["models"]] == ["m1"]
    native, _ = translate(_mk("nuslerp", {"nuslerp_flatten": False})
                          | {"models": _mk("x")["models"][:2]}, tmp_path)  # fmt: skip
    assert native["merge"] == {
        "method": "nuslerp", "tasks": True, "row_wise": False, "flatten": False,
    }  # fmt: skip
    assert [m["weight"] for m in native["models"]] == WEIGHTS[:2]
    no_base = {k: v for k, v in _mk("multislerp").items() if k != "base_model"}
    native, _ = translate(no_base, tmp_path)
    assert native["merge"]["tasks"] is False and Path(native["base"]).name == "m0"
    native, _ = translate(_mk("karcher", {"max_iter": 5}), tmp_path)
    # mergekit's karcher averages the base with the models
    assert [Path(m["path"]).name for m in native["models"]] == ["m0", "m1", "m2", "b"]
    assert native["merge"] == {"method": "karcher", "max_iter": 5, "tol": 1e-5}
    native, _ = translate(_mk("model_stock", {"filter_wise": True}), tmp_path)
    assert native["merge"] == {"method": "model_stock", "filter_wise": True}
    with pytest.raises(ConfigError, match=r"parameters\.t: required by slerp"):
        translate(two | {"parameters": {}}, tmp_path)
    with pytest.raises(ConfigError, match=r"models: slerp merges exactly 1"):
        translate(_mk("slerp", {"t": 0.5}), tmp_path)
    with pytest.raises(ConfigError, match=r"base_model: required by model_stock"):
        translate({k: v for k, v in _mk("model_stock").items() if k != "base_model"}, tmp_path)
    with pytest.raises(ConfigError, match=r"tadmerge\.sparsify: karcher merges the weights"):
        translate(_mk("karcher", tadmerge={"sparsify": "tadrop"}), tmp_path)


def test_a_density_per_model_is_each_models_sparsify(tmp_path):
    raw = _mk("ties", {"density": 0.5})
    raw["models"][1]["parameters"]["density"] = 0.2
    raw["models"][2]["parameters"]["density"] = 1.0
    native, _ = translate(raw, tmp_path)
    assert native["sparsify"]["density"] == 0.5
    assert [m.get("sparsify") for m in native["models"]] == [
        None,
        {"density": 0.2},
        {"density": 1.0},
    ]
    raw = _mk("dare_ties", {"density": 0.5})
    raw["models"][0]["parameters"]["density"] = 0.7
    native, _ = translate(raw, tmp_path)
    assert native["sparsify"] == {"method": "random", "p": 1.0 - 0.7, "rescale": "inverse_keep"}
    assert native["models"][1]["sparsify"] == {"p": 0.5}
    parse_config(native)  # the native parser takes it as it is
    raw = _mk("della", {"density": 0.5, "epsilon": 0.1})
    raw["models"][2]["parameters"]["epsilon"] = 0.2
    native, _ = translate(raw, tmp_path)
    assert native["models"][2]["sparsify"] == {"epsilon": 0.2}
    parse_config(native)


def test_slices_translate_into_native_slices(tmp_path):
    raw = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": "a", "layer_range": [0, 16]}]},
            {"sources": [{"model": "c", "layer_range": [8, 24]}]},
        ],
        "dtype": "bfloat16",
    }
    native, notes = translate(raw, tmp_path)
    assert native["merge"] == {"method": "passthrough"}
    assert [m["name"] for m in native["models"]] == ["a", "c"]
    assert native["base"] == native["models"][0]["path"]
    assert native["slices"] == [
        {"sources": [{"model": "a", "layer_range": [0, 16]}]},
        {"sources": [{"model": "c", "layer_range": [8, 24]}]},
    ]
    assert "dtype" not in native["output"] and any("copies the sources" in n for n in notes)
    assert parse_config(native).slices[1].sources[0].start == 8
    ties = {
        "merge_method": "ties",
        "base_model": "b",
        "parameters": {"density": 0.5},
        "slices": [
            {
                "sources": [
                    {"model": "b", "layer_range": [0, 4]},
                    {"model": "a", "layer_range": [0, 4], "parameters": {"weight": 0.5}},
                ]
            },
            {
                "sources": [
                    {"model": "a", "layer_range": [2, 6], "parameters": {"weight": 0.5}},
                    {"model": "b", "layer_range": [4, 8]},
                ]
            },
        ],  # fmt: skip
    }
    native, _ = translate(ties, tmp_path)
    assert native["merge"]["method"] == "ties" and native["models"][0]["weight"] == 0.5
    assert native["slices"][1] == {
        "sources": [{"model": "base", "layer_range": [4, 8]}, {"model": "a", "layer_range": [2, 6]}]
    }
    parse_config(native)


@pytest.mark.parametrize(
    "change,key",
    [
        (
            lambda s: s[1]["sources"][0]["parameters"].update(weight=0.9),
            "slices[1].sources[0].parameters: differ",
        ),  # fmt: skip
        (lambda s: s[1].update(parameters={"density": 0.2}), "slices[1].parameters"),
        (lambda s: s[1]["sources"].pop(1), "base_model 'b' is not a source"),
        (lambda s: s[1]["sources"][1].update(model="z"), "slices[1].sources: models"),
    ],
)
def test_slices_that_do_not_map_are_named(tmp_path, change, key):
    slices = [
        {"sources": [{"model": "b", "layer_range": [0, 4]},
                     {"model": "a", "layer_range": [0, 4], "parameters": {"weight": 0.5}}]},
        {"sources": [{"model": "a", "layer_range": [2, 6], "parameters": {"weight": 0.5}},
                     {"model": "b", "layer_range": [4, 8]}]},
    ]  # fmt: skip
    change(slices)
    raw = {
        "merge_method": "ties",
        "base_model": "b",
        "slices": slices,
        "parameters": {"density": 0.5},
    }
    with pytest.raises(ConfigError) as e:
        translate(raw, tmp_path)
    assert key in str(e.value)


def test_the_front_end_reads_a_weight_exactly_where_the_combiner_uses_it(tmp_path, monkeypatch):
    """Whether a mergekit method takes a per-model weight is the native combiner's
    declaration (Combiner.uses_weights), not a list of the front end's own: a
    combiner declared to ignore weights gets none (a note says so, and the native
    config carries 1, so the parser has nothing to warn about); one that uses them
    gets the config's."""
    from tadmerge.frontends import mergekit

    for name in (*mergekit.OWN, *mergekit.SUMS):
        uses = methods.combiner(name).uses_weights
        assert ("weight" in mergekit._spec(name)[1]) == uses, name
    # the declaration decides: a combiner declared to use weights would get them
    import dataclasses

    ram = methods.combiner("ram")
    monkeypatch.setattr(
        methods, "combiner", lambda n: dataclasses.replace(ram, uses_weights=True)
        if n == "ram" else methods.registry.combiner(n),
    )  # fmt: skip
    assert "weight" in mergekit._spec("ram")[1]
