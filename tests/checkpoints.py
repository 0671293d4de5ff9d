"""Tiny checkpoints with every case the merge math must get right."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

# Runtime of merges that must split the zoo's tensors into many small units.
SPLIT_RUNTIME = {
    "block_elements": 64,
    "max_unit_elements": 256,
    "memory_budget": "256MB",
    "progress": "none",
    "device": "cpu",
}

# A tiny causal LM's sizes (Llama, Qwen2, Gemma configs built in the tests).
TINY_LM_SIZES = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
)


def write_checkpoint(path: str, tensors: dict[str, torch.Tensor], shards: int = 1) -> str:
    os.makedirs(path, exist_ok=True)
    names = sorted(tensors)
    if shards == 1:
        save_file(
            {n: tensors[n].contiguous() for n in names}, os.path.join(path, "model.safetensors")
        )
    else:
        weight_map = {}
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n].contiguous() for n in names[s::shards]}
            save_file(part, os.path.join(path, fname))
            weight_map.update({n: fname for n in part})
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "tadmerge-test"}, f)
    return path


def zoo(seed: int = 0, k: int = 3) -> tuple[dict, list[dict]]:
    """Base and K fine-tunes: bf16 and f32, 0-d, 1-D, all-zero task vector, bf16 ties,
    a non-float buffer and a tensor meant to be excluded."""
    g = torch.Generator().manual_seed(seed)

    def rn(*shape):
        return torch.randn(tuple(shape), generator=g)

    base = {
        "emb.weight": rn(48, 40).bfloat16(),
        "layers.0.attn.weight": rn(40, 24),
        "layers.0.bias": rn(24),
        "layers.0.norm.weight": (1 + 0.1 * rn(64)).bfloat16(),
        "scale": torch.tensor(0.75),
        "zero.weight": rn(16, 8),
        "buffer.ids": torch.arange(10),
        "head.weight": rn(5, 24),
    }
    models = []
    for i in range(k):
        m = {}
        for n, v in base.items():
            if not v.is_floating_point():
                m[n] = v.clone()
                continue
            heavy = rn(*v.shape) * torch.exp(rn(*v.shape))  # heavy tails
            delta = 0.02 * (i + 1) * heavy
            if n == "layers.0.norm.weight":  # most entries unchanged: many ties at zero
                delta = delta * (torch.rand(v.shape, generator=g) < 0.2)
            if n == "zero.weight" and i == 0:  # an all-zero task vector
                delta = torch.zeros_like(delta)
            m[n] = (v.float() + delta).to(v.dtype)
        models.append(m)
    return base, models


def write_zoo(root: str, seed: int = 0, k: int = 3) -> tuple[str, list[str], dict, list[dict]]:
    base, models = zoo(seed, k)
    bp = write_checkpoint(os.path.join(root, "base"), base, shards=2)
    mps = [write_checkpoint(os.path.join(root, f"m{i}"), m) for i, m in enumerate(models)]
    return bp, mps, base, models
