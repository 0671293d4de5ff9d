"""PEFT LoRA adapters as inputs (io/lora.py), made by peft itself on tiny
transformers models: the task vector is scaling·B·A on the target modules (rsLoRA,
fan_in_fan_out, embedding adapters), zero elsewhere; a merge of a base, an adapter
and a full fine-tune equals the same merge computed in memory; DoRA and other
PEFT types are refused naming them."""

from __future__ import annotations

import math
import os

import pytest
import reference as R
import torch
from checkpoints import TINY_LM_SIZES
from safetensors.torch import load_file

from tadmerge.config import parse_config
from tadmerge.errors import InputError
from tadmerge.io.block_io import read_rows
from tadmerge.io.lora import LoraEntry
from tadmerge.planners.plan import make_plan
from tadmerge.run.driver import run_merge

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SIZES = TINY_LM_SIZES


def llama(seed: int):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**SIZES)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def gpt2(seed: int):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=16)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def save_adapter(model, path, seed: int, **lora) -> dict[str, torch.Tensor]:
    """A peft adapter on `model` (B made non-zero), saved; returns its tensors."""
    cfg = peft.LoraConfig(r=4, lora_alpha=8, **lora)
    pm = peft.get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(str(path))
    return load_file(os.path.join(path, "adapter_model.safetensors"))


def delta(adapter: dict, module: str, scaling: float, transpose: bool = False) -> torch.Tensor:
    """ΔW computed whole: B @ A * scaling (transposed for fan_in_fan_out)."""
    pre = f"base_model.model.{module}."
    emb = pre + "lora_embedding_A" in adapter
    a = adapter[pre + ("lora_embedding_A" if emb else "lora_A.weight")].float()
    b = adapter[pre + ("lora_embedding_B" if emb else "lora_B.weight")].float()
    d = b @ a * scaling
    return d.t() if transpose or emb else d


def plan_for(tmp_path, base, adapter, method="task_arithmetic", models=()):
    return parse_config(
        {
            "base": base,
            "models": [{"path": adapter, "name": "lora"}]
            + [{"path": p, "name": f"m{i}"} for i, p in enumerate(models)],
            "merge": {"method": method},
            "output": {"path": str(tmp_path / "out")},
            "runtime": {"progress": "none", "max_unit_elements": 256, "block_elements": 64},
        }
    )


@pytest.mark.parametrize("rslora", [False, True])
def test_task_vector_is_scaled_b_times_a(tmp_path, rslora):
    base_model = llama(0)
    base_model.save_pretrained(str(tmp_path / "base"))
    targets = ["q_proj", "v_proj", "embed_tokens"]
    adapter = save_adapter(
        llama(0), tmp_path / "lora", 1, target_modules=targets, use_rslora=rslora
    )
    scaling = 8 / math.sqrt(4) if rslora else 8 / 4
    plan = make_plan(plan_for(tmp_path, str(tmp_path / "base"), str(tmp_path / "lora")))
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    lora_tensors = 0
    for t in plan.tensors:
        src = t.sources[1]
        theta = torch.cat([read_rows(src, plan.units[u].row_start, plan.units[u].row_end)
                           for u in t.units]).view(t.shape)  # fmt: skip
        tau = theta - base[t.name].float()
        module = t.name.removesuffix(".weight")
        if module.split(".")[-1] in targets:
            assert isinstance(src, LoraEntry)
            assert len(t.units) > 1  # made per row block
            lora_tensors += 1
            want = delta(adapter, module, scaling)
            # θ = fl32(base + ΔW): τ is ΔW up to the rounding of that sum
            assert torch.equal(theta, base[t.name].float() + want), t.name
            ulp = (base[t.name].float().abs() + want.abs()).max() * 2**-23  # ≥ ½ ulp(θ)
            assert (tau - want).abs().max() <= ulp, t.name
        else:
            assert not isinstance(src, LoraEntry)
            assert torch.equal(tau, torch.zeros_like(tau)), t.name
    assert lora_tensors == 2 * 2 + 1


def test_fan_in_fan_out_gpt2_matches_peft_merge(tmp_path):
    """GPT-2's Conv1D stores W transposed: fan_in_fan_out, ΔW = (B·A)ᵀ; the adapter's
    θ equals peft's own merge_and_unload."""
    gpt2(0).save_pretrained(str(tmp_path / "base"))
    model = gpt2(0)
    save_adapter(model, tmp_path / "lora", 2, target_modules=["c_attn"], fan_in_fan_out=True)
    merged = peft.PeftModel.from_pretrained(gpt2(0), str(tmp_path / "lora")).merge_and_unload()
    want = merged.state_dict()
    plan = make_plan(plan_for(tmp_path, str(tmp_path / "base"), str(tmp_path / "lora")))
    seen = 0
    for t in plan.tensors:
        if isinstance(t.sources[1], LoraEntry):
            seen += 1
            theta = read_rows(t.sources[1], 0, t.shape[0]).view(t.shape)
            torch.testing.assert_close(theta, want[t.name], rtol=0, atol=1e-6)
    assert seen == 2


def test_merge_of_base_adapter_and_full_finetune_equals_reference(tmp_path):
    base_model = llama(0).to(torch.bfloat16)
    base_model.save_pretrained(str(tmp_path / "base"))
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    adapter = save_adapter(llama(0), tmp_path / "lora", 3, target_modules=["q_proj", "o_proj"])
    ft = llama(0)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in ft.named_parameters():
            p.copy_(base[n].float() + 0.02 * torch.randn(p.shape, generator=g))
    ft.to(torch.bfloat16).save_pretrained(str(tmp_path / "ft"))
    full = load_file(str(tmp_path / "ft" / "model.safetensors"))
    for sname in ("none", "tadrop"):
        cfg = plan_for(tmp_path, str(tmp_path / "base"), str(tmp_path / "lora"), models=[
            str(tmp_path / "ft")])  # fmt: skip
        raw = cfg.to_dict()
        raw["sparsify"] = {"method": sname}
        raw["output"]["path"] = str(tmp_path / f"out-{sname}")
        cfg = parse_config(raw)
        res = run_merge(cfg)
        got = load_file(os.path.join(res.output, "model.safetensors"))
        sp = cfg.to_dict()["sparsify"]
        for n, b in base.items():
            module = n.removesuffix(".weight")
            lora = b.float()
            if module.endswith(("q_proj", "o_proj")):
                lora = b.float() + delta(adapter, module, 2.0)
            thetas = [lora, full[n].float()]
            taus = [th - b.float() for th in thetas]
            ts = [
                R.sparsify(tau, sp, task=k, name=n, seed=cfg.seed, block_rows=1)
                for k, tau in enumerate(taus)
            ]
            want = R.combine("task_arithmetic", b.float(), thetas, ts, [1.0, 1.0], 1.0)
            assert torch.equal(got[n], want.to(b.dtype)), (sname, n)
        assert "lora" not in res.report.get("casts", {})  # (made in float32)
        model = transformers.AutoModelForCausalLM.from_pretrained(res.output)
        assert model is not None


def test_dora_and_other_peft_types_are_refused_naming_them(tmp_path):
    llama(0).save_pretrained(str(tmp_path / "base"))
    save_adapter(llama(0), tmp_path / "dora", 1, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(InputError, match="DoRA"):
        make_plan(plan_for(tmp_path, str(tmp_path / "base"), str(tmp_path / "dora")))
    pm = peft.get_peft_model(llama(0), peft.IA3Config(target_modules=["q_proj"],
                                                      feedforward_modules=[]))  # fmt: skip
    pm.save_pretrained(str(tmp_path / "ia3"))
    with pytest.raises(InputError, match="PEFT type 'IA3' is not supported"):
        make_plan(plan_for(tmp_path, str(tmp_path / "base"), str(tmp_path / "ia3")))
    with pytest.raises(InputError, match="the base is a LoRA adapter"):
        save_adapter(llama(0), tmp_path / "lora", 1, target_modules=["q_proj"])
        make_plan(plan_for(tmp_path, str(tmp_path / "lora"), str(tmp_path / "base")))
