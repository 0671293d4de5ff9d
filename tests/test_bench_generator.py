"""The benchmark checkpoint generator makes valid, realistic, deterministic
Llama-shaped sharded checkpoints (benchmarks/make_checkpoints.py)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import checkpoint_files  # noqa: E402
from benchmarks.make_checkpoints import generate, shape_for  # noqa: E402

TINY = dict(params=0, vocab=256, hidden=64, layers=2, intermediate=160, heads=4, kv_heads=2)


def _make(out: Path, dtype: str = "bf16", seed: int = 0, tasks: int = 2) -> dict:
    shape = shape_for(**TINY)
    return generate(
        out, tasks=tasks, dtype=dtype, seed=seed, shard_size=40_000, shape=shape, quiet=True
    )


def _load(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in checkpoint_files(model_dir):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k)
    return out


def _digest(model_dir: Path) -> str:
    h = hashlib.sha256()
    for f in checkpoint_files(model_dir):
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def bf16_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "tiny-bf16"
    return out, _make(out)


def test_sharded_hf_layout(bf16_set):
    out, manifest = bf16_set
    assert manifest["shards"] > 1
    for m in manifest["models"]:
        d = out / m
        index = json.loads((d / "model.safetensors.index.json").read_text())
        files = sorted(set(index["weight_map"].values()))
        assert files == [
            f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))
        ]
        tensors = _load(d)
        assert set(tensors) == set(index["weight_map"])
        assert index["metadata"]["total_size"] == sum(
            t.numel() * t.element_size() for t in tensors.values()
        )
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["architectures"] == ["LlamaForCausalLM"]
        assert cfg["tie_word_embeddings"] is False
        assert cfg["num_hidden_layers"] == TINY["layers"]


def test_llama_names_and_shapes(bf16_set):
    out, manifest = bf16_set
    t = _load(out / "base")
    h, i, v = TINY["hidden"], TINY["intermediate"], TINY["vocab"]
    kv = TINY["kv_heads"] * (h // TINY["heads"])
    assert t["model.embed_tokens.weight"].shape == (v, h)
    assert t["lm_head.weight"].shape == (v, h)
    assert t["model.norm.weight"].shape == (h,)
    for layer in range(TINY["layers"]):
        p = f"model.layers.{layer}."
        assert t[p + "self_attn.q_proj.weight"].shape == (h, h)
        assert t[p + "self_attn.k_proj.weight"].shape == (kv, h)
        assert t[p + "self_attn.v_proj.weight"].shape == (kv, h)
        assert t[p + "self_attn.o_proj.weight"].shape == (h, h)
        assert t[p + "mlp.gate_proj.weight"].shape == (i, h)
        assert t[p + "mlp.up_proj.weight"].shape == (i, h)
        assert t[p + "mlp.down_proj.weight"].shape == (h, i)
        assert t[p + "input_layernorm.weight"].shape == (h,)
    assert all(x.dtype == torch.bfloat16 for x in t.values())
    assert manifest["params"] == sum(x.numel() for x in t.values())
    # norms near 1, projections small
    assert abs(float(t["model.norm.weight"].float().mean()) - 1.0) < 0.05
    assert float(t["model.layers.0.self_attn.q_proj.weight"].float().std()) < 0.1


def test_task_vectors_realistic(bf16_set):
    out, _ = bf16_set
    base = _load(out / "base")
    ft1, ft2 = _load(out / "ft_1"), _load(out / "ft_2")
    zero_fracs, agree = [], []
    for name, b in base.items():
        t1 = ft1[name].float() - b.float()
        t2 = ft2[name].float() - b.float()
        zero_fracs.append(float((t1 == 0).float().mean()))
        both = (t1 != 0) & (t2 != 0)
        if both.sum() > 100:
            agree.append(float(((t1 * t2) > 0)[both].float().mean()))
    # exact zeros where the bf16 weight did not move, varying by tensor
    assert min(zero_fracs) > 0.0
    assert max(zero_fracs) - min(zero_fracs) > 0.1
    assert 0.02 < sum(zero_fracs) / len(zero_fracs) < 0.9
    # fine-tunes of one base agree in sign more often than chance
    assert sum(agree) / len(agree) > 0.55
    # heavy tails: excess kurtosis of the nonzero entries of a big tensor
    t = (
        ft1["model.layers.0.mlp.up_proj.weight"].float()
        - base["model.layers.0.mlp.up_proj.weight"].float()
    ).flatten()
    t = t[t != 0]
    kurt = float(((t - t.mean()) ** 4).mean() / t.var() ** 2)
    assert kurt > 6.0
    # embedding rows of unseen tokens are exactly unchanged
    e = ft1["model.embed_tokens.weight"].float() - base["model.embed_tokens.weight"].float()
    assert int((e.abs().sum(1) == 0).sum()) > 0


def test_float32_and_determinism(tmp_path, bf16_set):
    out, _ = bf16_set
    again = tmp_path / "again"
    _make(again)
    for m in ("base", "ft_1", "ft_2"):
        assert _digest(out / m) == _digest(again / m)
    # a set with more tasks extends one with fewer (scaling runs use prefixes)
    more = tmp_path / "k3"
    _make(more, tasks=3)
    for m in ("base", "ft_1", "ft_2"):
        assert _digest(out / m) == _digest(more / m)
    other = tmp_path / "seed1"
    _make(other, seed=1)
    assert _digest(out / "ft_1") != _digest(other / "ft_1")
    f32 = tmp_path / "f32"
    _make(f32, dtype="fp32")
    b = _load(f32 / "base")
    assert all(x.dtype == torch.float32 for x in b.values())
    # float32 keeps tiny updates: far fewer exact zeros than bf16
    t = (
        _load(f32 / "ft_1")["model.layers.0.mlp.up_proj.weight"]
        - b["model.layers.0.mlp.up_proj.weight"]
    )
    assert float((t == 0).float().mean()) < 0.01


def test_size_presets():
    for target in (100e6, 271e6, 1e9, 3e9):
        s = shape_for(int(target))
        assert abs(s.num_params() - target) / target < 0.06
        assert s.hidden_size % s.num_attention_heads == 0
        assert s.num_attention_heads % s.num_key_value_heads == 0
