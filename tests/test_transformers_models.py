"""Real transformers models built here (tiny Llama, Qwen2 and Gemma configs): each
merges, loads with AutoModelForCausalLM.from_pretrained, and its weights equal an
in-memory reference merge; the EMR output does not load as a model."""

from __future__ import annotations

import json
import os

import pytest
import reference as R
import torch
import yaml
from checkpoints import TINY_LM_SIZES
from safetensors.torch import load_file

from tadmerge.config import parse_config
from tadmerge.run.driver import run_merge

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

SIZES = TINY_LM_SIZES
CONFIGS = {
    "llama": transformers.LlamaConfig,
    "qwen2": transformers.Qwen2Config,
    "gemma": transformers.GemmaConfig,
}


def build(path, arch: str, tied: bool, dtype: torch.dtype, seed: int, like: dict | None = None):
    """A model saved by transformers; `like`: a base's state dict, moved a little."""
    cfg = CONFIGS[arch](**SIZES, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    if like is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in model.named_parameters():
                src = like.get(n, like.get("model.embed_tokens.weight"))
                p.copy_(src.float() + 0.02 * torch.randn(p.shape, generator=g))
    model.to(dtype).save_pretrained(str(path))
    return str(path)


def state(path) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(path, "model.safetensors"))


def merge(tmp_path, base, models, out="out", method="task_arithmetic", **extra):
    cfg = {
        "base": base,
        "models": [{"path": p, "name": f"m{i}"} for i, p in enumerate(models)],
        "merge": {"method": method, **({"scale": 0.8} if method == "task_arithmetic" else {})},
        "output": {"path": str(tmp_path / out)},
        "runtime": {"progress": "none"},
        **extra,
    }
    return run_merge(parse_config(cfg))


def reference_ta(base: dict, models: list[dict], scale=0.8) -> dict[str, torch.Tensor]:
    """Task arithmetic in memory: a tied input's head is its embedding."""

    def get(sd, n):
        return sd[n] if n in sd else sd["model.embed_tokens.weight"]

    out = {}
    for n in set(base) | {k for m in models for k in m}:
        b = get(base, n)
        thetas = [get(m, n).float() for m in models]
        taus = [t - b.float() for t in thetas]
        merged = R.combine("task_arithmetic", b.float(), thetas, taus, [1.0] * len(models), scale)
        out[n] = merged.to(b.dtype)
    return out


def assert_loads_as(out: str, expected: dict[str, torch.Tensor]) -> None:
    model = AutoModelForCausalLM.from_pretrained(out)
    params = dict(model.state_dict())
    params["lm_head.weight"] = model.get_output_embeddings().weight
    for n, v in expected.items():
        got = params[n].detach().to(v.dtype)
        assert torch.equal(got, v), n  # (bf16: exactly, not only within one ulp)


def front_matter(out: str) -> dict:
    text = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_llama_bf16_base_with_float32_and_float16_finetunes(tmp_path):
    base = build(tmp_path / "base", "llama", False, torch.bfloat16, 0)
    sd = state(base)
    m32 = build(tmp_path / "ft32", "llama", False, torch.float32, 1, sd)
    m16 = build(tmp_path / "ft16", "llama", False, torch.float16, 2, sd)
    res = merge(tmp_path, base, [m32, m16])
    expected = reference_ta(sd, [state(m32), state(m16)])
    got = state(res.output)
    assert {n: v.dtype for n, v in got.items()} == {n: torch.bfloat16 for n in sd}
    for n, v in expected.items():
        assert torch.equal(got[n], v), n
    assert_loads_as(res.output, expected)
    n = len(sd)
    assert res.report["casts"] == {
        "m0": [{"from": "F32", "to": "BF16", "tensors": n}],
        "m1": [{"from": "F16", "to": "BF16", "tensors": n}],
    }
    card = front_matter(res.output)
    assert card["base_model"] == [base, m32, m16]
    assert card["base_model_relation"] == "merge"
    assert card["tags"] == ["merge", "tadmerge"]
    assert card["library_name"] == "transformers"
    text = open(os.path.join(res.output, "README.md"), encoding="utf-8").read()
    assert "task_arithmetic" in text and "m0: " in text and "```yaml" in text


def test_qwen2_untied_base_with_a_tied_finetune(tmp_path):
    """A fine-tune without lm_head.weight and tie_word_embeddings: true is read as
    tied (its head is its embedding); the output keeps the base's untied head."""
    base = build(tmp_path / "base", "qwen2", False, torch.bfloat16, 0)
    sd = state(base)
    tied = build(tmp_path / "tied", "qwen2", True, torch.bfloat16, 1, sd)
    untied = build(tmp_path / "untied", "qwen2", False, torch.bfloat16, 2, sd)
    assert "lm_head.weight" not in state(tied)
    res = merge(tmp_path, base, [tied, untied])
    expected = reference_ta(sd, [state(tied), state(untied)])
    assert not torch.equal(expected["lm_head.weight"], expected["model.embed_tokens.weight"])
    got = state(res.output)
    assert set(got) == set(sd)
    for n, v in expected.items():
        assert torch.equal(got[n], v), n
    with open(os.path.join(res.output, "config.json")) as f:
        assert json.load(f)["tie_word_embeddings"] is False
    assert_loads_as(res.output, expected)


def test_gemma_tied_base_with_an_untied_finetune(tmp_path):
    """The base is tied, a fine-tune is not: the output stores a merged head, and its
    config.json says tie_word_embeddings: false (else loaders drop that head)."""
    base = build(tmp_path / "base", "gemma", True, torch.bfloat16, 0)
    sd = state(base)
    assert "lm_head.weight" not in sd
    with open(os.path.join(base, "config.json")) as f:
        assert json.load(f)["tie_word_embeddings"] is True
    untied = build(tmp_path / "untied", "gemma", False, torch.bfloat16, 1, sd)
    tied = build(tmp_path / "tied", "gemma", True, torch.bfloat16, 2, sd)
    res = merge(tmp_path, base, [untied, tied])
    expected = reference_ta(sd, [state(untied), state(tied)])
    got = state(res.output)
    assert "lm_head.weight" in got
    for n, v in expected.items():
        assert torch.equal(got[n], v), n
    with open(os.path.join(res.output, "config.json")) as f:
        assert json.load(f)["tie_word_embeddings"] is False
    assert_loads_as(res.output, expected)


def test_all_tied_stays_tied(tmp_path):
    base = build(tmp_path / "base", "gemma", True, torch.bfloat16, 0)
    sd = state(base)
    fts = [build(tmp_path / f"t{i}", "gemma", True, torch.bfloat16, i + 1, sd) for i in range(2)]
    res = merge(tmp_path, base, fts)
    assert "lm_head.weight" not in state(res.output)
    with open(os.path.join(base, "config.json"), "rb") as a:
        with open(os.path.join(res.output, "config.json"), "rb") as b:
            assert a.read() == b.read()  # the base's config, byte for byte
    assert_loads_as(res.output, reference_ta(sd, [state(p) for p in fts]))


def test_emr_output_does_not_load_as_a_model_but_its_tasks_do(tmp_path):
    from tadmerge.emr import materialize, task_state_dict

    base = build(tmp_path / "base", "llama", False, torch.float32, 0)
    sd = state(base)
    fts = [build(tmp_path / f"t{i}", "llama", False, torch.float32, i + 1, sd) for i in range(2)]
    res = merge(tmp_path, base, fts, out="emr", method="emr")
    with open(os.path.join(base, "config.json"), "rb") as a:
        with open(os.path.join(res.output, "base_config.json"), "rb") as b:
            assert a.read() == b.read()
    with pytest.raises(ValueError, match="model type `tadmerge-emr`"):
        AutoModelForCausalLM.from_pretrained(res.output)
    assert "emr" in front_matter(res.output)["tags"]
    assert "not a model" in open(os.path.join(res.output, "README.md")).read()
    task = materialize(res.output, "m1", str(tmp_path / "m1"))
    model = AutoModelForCausalLM.from_pretrained(task)
    expected = task_state_dict(res.output, "m1")
    for n, p in model.state_dict().items():
        assert torch.equal(p, expected[n]), n


def test_missing_head_without_tie_setting_says_which_key(tmp_path):
    """A fine-tune without lm_head.weight whose config.json does not tie: refused
    (exit 3), naming the key that would read it as tied."""
    from tadmerge.errors import InputError

    base = build(tmp_path / "base", "qwen2", False, torch.bfloat16, 0)
    tied = build(tmp_path / "tied", "qwen2", True, torch.bfloat16, 1, state(base))
    cfg_path = os.path.join(tied, "config.json")
    with open(cfg_path) as f:
        doc = json.load(f)
    doc["tie_word_embeddings"] = False
    with open(cfg_path, "w") as f:
        json.dump(doc, f)
    with pytest.raises(InputError, match=r"\[lm_head.weight\]: missing in model 'm0' \(a tied "
                       r"head\? set tie_word_embeddings: true"):  # fmt: skip
        merge(tmp_path, base, [tied])


def test_added_tokens_merge_on_the_base_vocabulary(tmp_path, caplog):
    """A fine-tune with 8 added tokens (embedding and head rows beyond the base's):
    merged on the base's 64 rows, the rest dropped with one warning; the output
    loads and equals the reference on the base's rows."""
    base = build(tmp_path / "base", "llama", False, torch.bfloat16, 0)
    sd = state(base)
    plain = build(tmp_path / "plain", "llama", False, torch.bfloat16, 1, sd)
    model = AutoModelForCausalLM.from_pretrained(
        build(tmp_path / "tmp", "llama", False, torch.bfloat16, 2, sd)
    )
    model.resize_token_embeddings(72)
    model.save_pretrained(str(tmp_path / "grown"))
    grown = state(str(tmp_path / "grown"))
    assert grown["lm_head.weight"].shape[0] == 72
    with caplog.at_level("WARNING", logger="tadmerge"):
        res = merge(tmp_path, base, [plain, str(tmp_path / "grown")])
    assert "added tokens" in caplog.text and "'m1' (8 rows beyond the base's 64" in caplog.text
    cut = {n: v[:64] if v.shape[:1] == (72,) else v for n, v in grown.items()}
    expected = reference_ta(sd, [state(plain), cut])
    got = state(res.output)
    for n, v in expected.items():
        assert torch.equal(got[n], v), n
    assert res.report["vocabulary"]["dropped"]["m1"] == [
        {"tensor": "lm_head.weight", "rows": 72, "rows_merged": 64},
        {"tensor": "model.embed_tokens.weight", "rows": 72, "rows_merged": 64},
    ]
    assert_loads_as(res.output, expected)
