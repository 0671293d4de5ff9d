"""The embedded demo: build small checkpoints locally and merge them with
EMR + TADrop, then print what came out. No download, a few seconds on a laptop.

The demo model is Llama-shaped (embeddings, attention, MLP, norms, untied head)
and each "fine-tune" adds a heavy-tailed task vector with its own per-tensor
scales, so TADrop's per-tensor drop rates differ the way they do on real models.
"""

from __future__ import annotations

import os
import shlex
import shutil
import time

import torch

from .config import load_config, with_overrides

LAYERS, HIDDEN, FFN, VOCAB = 4, 128, 344, 1000
TASKS = ("math", "code", "chat")
DEMO_CONFIG = """\
# The demo's merge (written by `tadmerge demo`; paths are relative to this file).
# Edit it and rerun: tadmerge plan merge.yaml, then tadmerge merge merge.yaml --overwrite
# Every key: README "Config reference"; the methods: tadmerge methods
base: checkpoints/base
models:
  - {path: checkpoints/math, name: math}
  - {path: checkpoints/code, name: code}
  - {path: checkpoints/chat, name: chat}
sparsify: {method: tadrop, low_q: 0.5, high_q: 0.95, rescale: l2}
merge: {method: emr}
output: {path: merged}
runtime: {memory_budget: 512MB}
"""


def demo_model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def w(*shape, scale=0.02):
        return (torch.randn(shape, generator=g) * scale).to(torch.bfloat16)

    sd = {"model.embed_tokens.weight": w(VOCAB, HIDDEN), "lm_head.weight": w(VOCAB, HIDDEN)}
    sd["model.norm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{proj}.weight"] = w(HIDDEN, HIDDEN)
        sd[p + "mlp.gate_proj.weight"] = w(FFN, HIDDEN)
        sd[p + "mlp.up_proj.weight"] = w(FFN, HIDDEN)
        sd[p + "mlp.down_proj.weight"] = w(HIDDEN, FFN)
        sd[p + "input_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
    return sd


def fine_tune(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    out = {}
    for name, v in base.items():
        scale = 1e-3 * float(torch.exp(torch.randn((), generator=g)))  # per-tensor scale
        heavy = torch.randn(v.shape, generator=g) * torch.exp(
            0.8 * torch.randn(v.shape, generator=g)
        )
        delta = scale * heavy
        out[name] = (v.float() + delta).to(v.dtype)  # bf16: small moves round to zero
    return out


def _save(path: str, sd: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    save_file(sd, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(
            '{"architectures": ["LlamaForCausalLM"], "model_type": "llama", '
            f'"hidden_size": {HIDDEN}, "intermediate_size": {FFN}, '
            f'"num_hidden_layers": {LAYERS}, "vocab_size": {VOCAB}, "torch_dtype": "bfloat16"}}'
        )


def run_demo(out_dir: str = "demo_out", keep: bool = True) -> dict:
    """Build the checkpoints under OUT/checkpoints, merge them into OUT/merged and
    print what came out and the commands to try next. `keep=False` removes the
    checkpoints afterwards (then the EMR output can no longer be read: it
    computes each task from its base)."""
    from .emr import task_state_dict
    from .emr.info import emr_info
    from .run.driver import run_merge

    t0 = time.monotonic()
    ck = os.path.join(out_dir, "checkpoints")
    base = demo_model(0)
    _save(os.path.join(ck, "base"), base)
    tuned = {}
    for i, name in enumerate(TASKS):
        tuned[name] = fine_tune(base, i)
        _save(os.path.join(ck, name), tuned[name])
    merged = os.path.join(out_dir, "merged")
    config_path = os.path.join(out_dir, "merge.yaml")
    with open(config_path, "w", encoding="utf-8") as f:
        f.write(DEMO_CONFIG)
    # the demo merges from the config it leaves, so that a user can edit it and rerun
    cfg = with_overrides(load_config(config_path), progress="none")
    result = run_merge(cfg, overwrite=os.path.exists(merged))
    info = emr_info(result.output)
    rep = result.report
    n_params = sum(v.numel() for v in base.values())
    print(f"\ntadmerge demo: EMR + TADrop over {len(TASKS)} fine-tunes of a "
          f"{n_params / 1e6:.1f}M-parameter Llama-shaped model")  # fmt: skip
    print(f"  output: {result.output}")
    by_type: dict[str, list[float]] = {}
    for name, t in rep["tensors"].items():
        if t["kind"] != "merge":
            continue
        kind = name.split(".")[-2]
        for task_fig in t["tasks"].values():
            by_type.setdefault(kind, []).append(task_fig["drop_rate"])
    print("  TADrop drop rate by tensor type (mean over layers and tasks):")
    for kind, rates in sorted(by_type.items()):
        print(f"    {kind:26s} {sum(rates) / len(rates):.3f}")
    print("  task rescalers:", ", ".join(f"{k} {v:.4f}" for k, v in info["rescalers"].items()))
    b = info["bytes"]
    print(f"  size: unified delta {b['unified_delta'] / 2**20:.1f} MiB + masks "
          f"{b['masks'] / 2**20:.2f} MiB vs {b['k_separate_checkpoints'] / 2**20:.1f} MiB "
          f"for {len(TASKS)} separate checkpoints")  # fmt: skip
    # each task's reconstructed model stays close to its own fine-tune
    for name in TASKS:
        sd = task_state_dict(result.output, name)
        num = den = 0.0
        for k, v in tuned[name].items():
            d_true = v.float() - base[k].float()
            d_rec = sd[k].float() - base[k].float()
            num += float(torch.dot(d_true.view(-1), d_rec.view(-1)))
            den += float(d_true.norm() * d_rec.norm())
        print(f"  task {name}: cosine(task vector, reconstructed task vector) = {num / den:.3f}")
    print(f"  done in {time.monotonic() - t0:.1f}s (merge {rep['timings']['total_s']:.1f}s, "
          f"peak RSS {rep['peak_rss_bytes'] / 2**20:.0f} MiB)")  # fmt: skip
    if not keep:  # the EMR output reads its base: without it no next command would work
        shutil.rmtree(ck, ignore_errors=True)
    else:
        print(f"  config: {config_path} (edit it and merge again)")
        print("  next:")
        for cmd in next_commands(out_dir):
            print(f"    {cmd}")
    return rep


def next_commands(out_dir: str) -> list[str]:
    """What the demo invites a user to run next, as shell lines (tested to succeed)."""
    q = shlex.quote
    merged = q(os.path.join(out_dir, "merged"))
    config = q(os.path.join(out_dir, "merge.yaml"))
    return [
        f"tadmerge info {merged}",
        f"tadmerge verify {merged}",
        f"tadmerge report {merged}",
        f"tadmerge materialize {merged} --task math --to {q(os.path.join(out_dir, 'math_model'))}"
        " --overwrite",
        f"tadmerge plan {config}",
        f"tadmerge merge {config} --overwrite",
    ]
