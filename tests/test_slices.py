"""Layer stacking (`slices`): passthrough frankenmerges and merges per slice.

Tiny models built with transformers: the stacked output loads with
AutoModelForCausalLM.from_pretrained, each output tensor is its source's bytes
(passthrough) or the reference merge of its sources (tests/reference.py), the
config.json counts the output's layers (and rebuilds per-layer lists), and the
same bytes come out split into small units, resumed, and on the Ray executor
(that one in tests/test_ray.py's style, marked slow)."""

from __future__ import annotations

import json
import os

import killpoints
import pytest
import reference as R
import torch
from checkpoints import TINY_LM_SIZES
from outputs import model_files
from safetensors.torch import load_file

from tadmerge.config import parse_config
from tadmerge.errors import ConfigError
from tadmerge.run.driver import run_merge

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

LAYERS = 4
SIZES = {**TINY_LM_SIZES, "num_hidden_layers": LAYERS}


def build(path, seed: int, like: dict | None = None, arch: str = "llama", **extra) -> str:
    """A tiny model saved by transformers; `like`: a base's state dict, moved a little
    (a fine-tune)."""
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[arch]
    cfg = cls(**SIZES, tie_word_embeddings=False, **extra)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    if like is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(like[n].float() + 0.02 * torch.randn(p.shape, generator=g))
    model.to(torch.bfloat16).save_pretrained(str(path))
    return str(path)


def state(path) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(path, "model.safetensors"))


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("slices")
    base = build(root / "base", 0)
    b = state(base)
    fts = [build(root / f"ft{i}", 10 + i, like=b) for i in (1, 2)]
    return root, base, fts


FRANKEN = [
    {"sources": [{"model": "a", "layer_range": [0, 3]}]},
    {"sources": [{"model": "b", "layer_range": [1, 4]}]},
    {"sources": [{"model": "a", "layer_range": [3, 4]}]},
]
# output layer -> (model, source layer)
FRANKEN_MAP = [("a", 0), ("a", 1), ("a", 2), ("b", 1), ("b", 2), ("b", 3), ("a", 3)]


def passthrough(root, fts, out: str, slices=FRANKEN, **runtime):
    raw = {
        "models": [{"path": fts[0], "name": "a"}, {"path": fts[1], "name": "b"}],
        "merge": {"method": "passthrough"},
        "slices": slices,
        "output": {"path": str(root / out)},
        "runtime": {"progress": "none", **runtime},
    }
    return parse_config(raw)


def test_passthrough_stacks_layers_that_load_and_equal_their_sources(family):
    root, _, fts = family
    res = run_merge(passthrough(root, fts, "franken"))
    got = state(res.output)
    src = {"a": state(fts[0]), "b": state(fts[1])}
    n_out = len(FRANKEN_MAP)
    expected = {}
    for i, (m, layer) in enumerate(FRANKEN_MAP):
        for name, v in src[m].items():
            prefix = f"model.layers.{layer}."
            if name.startswith(prefix):
                expected[f"model.layers.{i}." + name[len(prefix) :]] = v
    # outside the layers: embeddings from the first slice's model, norm and head from the last's
    expected["model.embed_tokens.weight"] = src["a"]["model.embed_tokens.weight"]
    expected["model.norm.weight"] = src["a"]["model.norm.weight"]
    expected["lm_head.weight"] = src["a"]["lm_head.weight"]
    assert set(got) == set(expected)
    for n, v in expected.items():
        assert got[n].dtype == v.dtype and torch.equal(
            got[n].view(torch.int16), v.view(torch.int16)
        ), n
    cfg = json.load(open(os.path.join(res.output, "config.json")))
    assert cfg["num_hidden_layers"] == n_out
    model = AutoModelForCausalLM.from_pretrained(res.output)
    assert len(model.model.layers) == n_out
    sd = model.state_dict()
    for n, v in expected.items():
        assert torch.equal(sd[n], v), n
    assert all(t.kind == "pass" for t in res.plan.tensors)
    # inputs: the base (no base given: the first slice's model), then a, b
    assert res.plan.config.base == fts[0]
    assert res.plan.layer_map == tuple((1 if m == "a" else 2, n) for m, n in FRANKEN_MAP)


def test_passthrough_split_units_and_resume_give_the_same_bytes(family, monkeypatch):
    root, _, fts = family
    whole = run_merge(passthrough(root, fts, "pt-whole"))
    cfg = passthrough(root, fts, "pt-split", max_unit_elements=64, workers=1)
    split = run_merge(cfg)
    assert any(len(t.units) > 1 for t in split.plan.tensors)
    assert model_files(whole.output) == model_files(split.output)
    # stopped (Ctrl-C) after 5 units, then resumed: the 5 are reused, the bytes the same
    cfg = passthrough(root, fts, "pt-resume", max_unit_elements=64, workers=1)
    with monkeypatch.context() as m:
        killpoints.install("progress:5", killpoints.interrupt, m.setattr)
        with pytest.raises(KeyboardInterrupt):
            run_merge(cfg)
    assert not os.path.exists(cfg.output.path)
    resumed = run_merge(cfg, resume=True)
    assert resumed.report["units"]["reused"] == 5
    assert model_files(resumed.output) == model_files(whole.output)


@pytest.mark.ray
def test_passthrough_on_ray_gives_the_local_bytes(ray_session, family):
    root, _, fts = family
    local = run_merge(passthrough(root, fts, "pt-local", max_unit_elements=64))
    on_ray = run_merge(
        passthrough(root, fts, "pt-ray", max_unit_elements=64, executor="ray", workers=2)
    )
    assert model_files(on_ray.output) == model_files(local.output)


def test_passthrough_rebuilds_per_layer_lists_of_the_config(tmp_path):
    kinds = ["sliding_attention", "full_attention"] * (LAYERS // 2)
    a = build(tmp_path / "qa", 1, arch="qwen2", layer_types=kinds, use_sliding_window=True)
    b_kinds = ["full_attention"] * LAYERS
    b = build(tmp_path / "qb", 2, arch="qwen2", layer_types=b_kinds, use_sliding_window=True)
    slices = [
        {"sources": [{"model": "a", "layer_range": [0, 3]}]},
        {"sources": [{"model": "b", "layer_range": [2, 4]}]},
    ]
    res = run_merge(passthrough(tmp_path, [a, b], "q", slices=slices))
    cfg = json.load(open(os.path.join(res.output, "config.json")))
    assert cfg["num_hidden_layers"] == 5
    assert cfg["layer_types"] == kinds[:3] + b_kinds[2:4]
    model = AutoModelForCausalLM.from_pretrained(res.output)
    assert len(model.model.layers) == 5


def test_ties_per_slice_merges_each_layer_from_its_sources(family):
    root, base, fts = family
    slices = [
        {
            "sources": [
                {"model": "base", "layer_range": [0, 2]},
                {"model": "a", "layer_range": [0, 2]},
                {"model": "b", "layer_range": [2, 4]},
            ]
        },  # fmt: skip
        {
            "sources": [
                {"model": "base", "layer_range": [2, 4]},
                {"model": "a", "layer_range": [2, 4]},
                {"model": "b", "layer_range": [0, 2]},
            ]
        },  # fmt: skip
    ]
    raw = {
        "base": base,
        "models": [{"path": fts[0], "name": "a", "weight": 0.7}, {"path": fts[1], "name": "b"}],
        "sparsify": {"method": "magnitude", "density": 0.5},
        "merge": {"method": "ties", "scale": 1.0},
        "slices": slices,
        "output": {"path": str(root / "ties-slices")},
        "runtime": {"progress": "none"},
    }
    res = run_merge(parse_config(raw))
    raw["output"]["path"] = str(root / "ties-slices-split")
    raw["runtime"].update(max_unit_elements=64, workers=2)
    split = run_merge(parse_config(raw))
    assert model_files(res.output) == model_files(split.output)
    got = state(res.output)
    b, sa, sb = state(base), state(fts[0]), state(fts[1])
    # output layer -> (base layer, a's layer, b's layer)
    lmap = [(0, 0, 2), (1, 1, 3), (2, 2, 0), (3, 3, 1)]
    sp = {"method": "magnitude", "density": 0.5, "rescale": "none"}
    checked = 0
    for name, v in got.items():
        if name.startswith("model.layers."):
            i, rest = int(name.split(".")[2]), name.split(".", 3)[3]
            lb, la, lb2 = lmap[i]
            srcs = [b[f"model.layers.{lb}.{rest}"], sa[f"model.layers.{la}.{rest}"],
                    sb[f"model.layers.{lb2}.{rest}"]]  # fmt: skip
        else:
            srcs = [b[name], sa[name], sb[name]]
        base_t = srcs[0].float()
        thetas = [s.float() for s in srcs[1:]]
        ts = [
            R.sparsify(t - base_t, sp, task=k, name=name, seed=0, block_rows=1)
            for k, t in enumerate(thetas)
        ]
        want = R.combine("ties", base_t, thetas, ts, [0.7, 1.0], 1.0).to(torch.bfloat16)
        assert torch.equal(v, want), name
        checked += 1
    assert checked == len(got) and len(got) == len(b)
    assert AutoModelForCausalLM.from_pretrained(res.output) is not None


@pytest.mark.parametrize(
    "change,key",
    [
        (lambda r: r.pop("slices"), "slices"),
        (
            lambda r: r["slices"][0]["sources"].append({"model": "b", "layer_range": [0, 3]}),
            "slices[0].sources",
        ),  # fmt: skip
        (lambda r: r["slices"][1]["sources"][0].update(model="c"), "slices[1].sources[0].model"),
        (
            lambda r: r["slices"][1]["sources"][0].update(layer_range=[2, 1]),
            "slices[1].sources[0].layer_range",
        ),  # fmt: skip
        (lambda r: r.update(sparsify={"method": "magnitude"}), "sparsify.method"),
        (lambda r: r.update(exclude=["norm"]), "exclude"),
        (lambda r: r.update(merge={"method": "emr"}), "slices"),
        (lambda r: (r.pop("base"), r["slices"][1]["sources"][0].update(model="base")), "base:"),
    ],
)
def test_bad_slices_name_the_key(change, key):
    raw = {
        "base": "/x/base",
        "models": [{"path": "/x/a", "name": "a"}, {"path": "/x/b", "name": "b"}],
        "merge": {"method": "passthrough"},
        "slices": [
            {"sources": [{"model": "a", "layer_range": [0, 3]}]},
            {"sources": [{"model": "b", "layer_range": [1, 4]}]},
        ],
    }
    change(raw)
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    assert key in str(e.value)


def test_a_layer_range_past_the_model_names_it(family):
    root, _, fts = family
    slices = [{"sources": [{"model": "a", "layer_range": [2, LAYERS + 1]}]}]
    with pytest.raises(ConfigError, match=r"slices\[0\]\.sources\[0\]\.layer_range"):
        run_merge(passthrough(root, fts, "past", slices=slices))
    assert not os.path.exists(root / "past")
