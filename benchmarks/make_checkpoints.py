"""Generate realistic Llama-shaped checkpoints for the speed/memory benchmarks.

    python benchmarks/make_checkpoints.py --params 271M --tasks 3 --dtype bf16 \
        --out /work/bench-data/llama-271M-k3-bf16 --seed 0 --shard-size 2GB

writes, in HF layout (``model-0000i-of-0000N.safetensors`` +
``model.safetensors.index.json`` + ``config.json`` with LlamaConfig fields):

    OUT/base/            theta_0
    OUT/ft_1 .. ft_K/    theta_k = theta_0 + tau_k
    OUT/manifest.json    what was generated, with which parameters

What makes it look like real fine-tuning (and not like i.i.d. noise):
- base weights: per-tensor standard deviations that differ (init-like 0.02
  scaled by a log-normal per-tensor factor, smaller for the residual output
  projections o_proj/down_proj), RMSNorm weights near 1, a few outlier
  channels in the base (as LLM weights have);
- task vectors: heavy-tailed entries, a Laplace distribution whose scale is
  itself log-normal per entry, mixed with a small fraction of Student-t(3)
  outliers; per-tensor scale factors spread over about a decade (and by
  kind: norms and embeddings move differently from projections); a shared
  component across tasks (fine-tunes of one base agree in part, so TIES'
  sign election is not a coin flip); embedding rows of tokens a task never
  saw stay exactly unchanged;
- in bf16, theta_k = bf16(float32(theta_0) + tau_k): every entry whose
  update is below half a bf16 ulp of the weight did not move, so the task
  vector has exact zeros (tens of percent, varying per tensor), as real
  bf16 fine-tunes do.

Generation streams tensor by tensor, in row chunks (all K+1 checkpoints of a
chunk at once), and writes safetensors headers first, so memory stays at a few
hundred MB whatever the model size. The output is a deterministic function of
(seed, shapes, dtype, K): every chunk has its own generator seeded from a hash
of (seed, role, tensor name, chunk index); chunks have a fixed row count for a
given shape.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import StreamingShardWriter, human_count, parse_bytes, parse_count

CHUNK_ELEMS = 1 << 22  # 4M elements per generated chunk (fixed: part of the definition)


# ---------------------------------------------------------------- shapes


@dataclass(frozen=True)
class LlamaShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes in HF order (embeddings, layers, norm, lm_head)."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        kv = self.num_key_value_heads * self.head_dim
        out = [("model.embed_tokens.weight", (v, h))]
        for layer in range(self.num_hidden_layers):
            p = f"model.layers.{layer}."
            out += [
                (p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
        return out

    def num_params(self) -> int:
        return sum(math.prod(s) for _, s in self.tensors())

    def hf_config(self, torch_dtype: str) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": 4096,
            "mlp_bias": False,
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "pretraining_tp": 1,
            "rms_norm_eps": 1e-5,
            "rope_scaling": None,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
            "torch_dtype": torch_dtype,
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }


# (max params, hidden, intermediate, heads, kv heads): Llama / TinyLlama-like
# width classes; the layer count is solved for the requested size.
_WIDTHS = [
    (60e6, 512, 1408, 8, 8),
    (200e6, 768, 2048, 12, 12),
    (600e6, 1024, 2816, 16, 16),
    (1.6e9, 2048, 5632, 16, 16),
    (4.5e9, 3072, 8192, 24, 8),
    (float("inf"), 4096, 11008, 32, 32),
]


def shape_for(
    params: int,
    vocab: int = 32000,
    hidden: int | None = None,
    layers: int | None = None,
    intermediate: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
) -> LlamaShape:
    """A Llama shape with about `params` parameters (untied lm_head)."""
    _, h, i, nh, nkv = next(row for row in _WIDTHS if params <= row[0])
    h, i, nh, nkv = hidden or h, intermediate or i, heads or nh, kv_heads or nkv
    nh = min(nh, max(1, h // 16))
    nkv = min(nkv, nh)
    if layers is None:
        probe = LlamaShape(vocab, h, i, 1, nh, nkv)
        per_layer = probe.num_params() - LlamaShape(vocab, h, i, 0, nh, nkv).num_params()
        fixed = LlamaShape(vocab, h, i, 0, nh, nkv).num_params()
        layers = max(1, round((params - fixed) / per_layer))
    return LlamaShape(vocab, h, i, layers, nh, nkv)


# ---------------------------------------------------------------- randomness


def _seed(*parts) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _gen(*parts) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(_seed(*parts))
    return g


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=g, dtype=torch.float64).item()


def _lognormal(g: torch.Generator, sigma: float) -> float:
    return math.exp(sigma * torch.randn((), generator=g, dtype=torch.float64).item())


def _kind(name: str) -> str:
    if "norm" in name:
        return "norm"
    if "embed_tokens" in name:
        return "embed"
    if "lm_head" in name:
        return "lm_head"
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return "out_proj"
    return "proj"


@dataclass
class TensorPlan:
    """Per-tensor parameters of the base and of each task vector."""

    base_std: float
    tau_unit: float  # the weight magnitude tau_scale is relative to
    outlier_cols: list[int]
    tau_scale: list[float]  # per task, relative to base_std
    shared: float  # fraction of tau variance shared across tasks
    heavy_frac: float  # fraction of Student-t outliers
    unseen_rows: float  # embedding rows a task never updated


def plan_tensor(
    seed: int, name: str, shape: tuple[int, ...], tasks: int, num_layers: int
) -> TensorPlan:
    g = _gen(seed, "plan", name)
    kind = _kind(name)
    std = 0.02 * _lognormal(g, 0.25)
    if kind == "out_proj":
        std /= math.sqrt(2 * max(num_layers, 1)) ** 0.5
    cols = []
    if len(shape) == 2 and kind in ("proj", "out_proj"):
        n_out = 1 + int(_uniform(g, 0, 4))
        cols = torch.randint(0, shape[1], (n_out,), generator=g).tolist()
    # log10 of |tau| relative to the weight scale: about 1e-3 .. 2e-2, by kind
    lo, hi = {
        "norm": (-2.6, -1.8),
        "embed": (-2.8, -1.8),
        "lm_head": (-2.6, -1.8),
        "proj": (-2.8, -1.6),
        "out_proj": (-2.8, -1.6),
    }[kind]
    base_level = _uniform(g, lo, hi)
    shared = _uniform(g, 0.1, 0.5)
    heavy_frac = _uniform(g, 0.002, 0.02)
    unseen_rows = _uniform(g, 0.2, 0.6) if kind == "embed" else 0.0
    # drawn last, so that a set with more tasks extends one with fewer:
    # ft_1..ft_K of a K=8 set are bit-identical to those of a K=3 set
    scales = [10 ** (base_level + _uniform(g, -0.35, 0.35)) for _ in range(tasks)]
    return TensorPlan(
        base_std=std,
        tau_unit=1.0 if kind == "norm" else std,
        outlier_cols=cols,
        tau_scale=scales,
        shared=shared,
        heavy_frac=heavy_frac,
        unseen_rows=unseen_rows,
    )


def base_chunk(seed: int, name: str, shape, rows: slice, plan: TensorPlan, ci: int) -> torch.Tensor:
    g = _gen(seed, "base", name, ci)
    if len(shape) == 1:
        n = rows.stop - rows.start
        return (
            1.0 + 0.05 * torch.randn(n, generator=g)
            if "norm" in name
            else plan.base_std * torch.randn(n, generator=g)
        )
    x = torch.randn((rows.stop - rows.start, shape[1]), generator=g)
    x.mul_(plan.base_std)
    if plan.outlier_cols:
        x[:, plan.outlier_cols] *= 8.0
    return x


def _heavy_noise(g: torch.Generator, shape, heavy_frac: float) -> torch.Tensor:
    """Laplace with a log-normal per-entry scale, a Student-t(3) outlier mix;
    unit median absolute value, roughly."""
    u = torch.rand(shape, generator=g).sub_(0.5)
    lap = torch.sign(u).mul_(torch.log1p(u.abs().mul_(-2.0).clamp_(min=-1 + 1e-7)).neg_())
    lap.mul_(torch.randn(shape, generator=g).mul_(0.5).exp_())
    pick = torch.rand(shape, generator=g) < heavy_frac
    n = int(pick.sum())
    if n:
        z = torch.randn(n, generator=g)
        chi2 = torch.randn((n, 3), generator=g).square_().sum(1).div_(3.0)
        lap[pick] = 3.0 * z / chi2.sqrt()
    return lap


def task_chunks(
    seed: int, name: str, shape, rows: slice, plan: TensorPlan, ci: int, tasks: int
) -> list[torch.Tensor]:
    """tau_k for the rows, k = 1..K."""
    cshape = (rows.stop - rows.start,) + tuple(shape[1:])
    common = _heavy_noise(_gen(seed, "common", name, ci), cshape, plan.heavy_frac)
    a = math.sqrt(plan.shared)
    b = math.sqrt(1.0 - plan.shared)
    out = []
    for k in range(tasks):
        g = _gen(seed, "task", k, name, ci)
        tau = _heavy_noise(g, cshape, plan.heavy_frac).mul_(b).add_(common, alpha=a)
        tau.mul_(plan.tau_scale[k] * plan.tau_unit)
        if plan.unseen_rows > 0:
            unseen = torch.rand(cshape[0], generator=g) < plan.unseen_rows
            tau[unseen] = 0.0
        out.append(tau)
    return out


# ---------------------------------------------------------------- writing


def shard_layout(tensors, elem_size: int, shard_bytes: int) -> list[list[tuple[str, tuple]]]:
    shards, cur, cur_bytes = [], [], 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * elem_size
        if cur and cur_bytes + nbytes > shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, shape))
        cur_bytes += nbytes
    if cur:
        shards.append(cur)
    return shards


def generate(
    out: Path,
    params: int | None = None,
    tasks: int = 3,
    dtype: str = "bf16",
    seed: int = 0,
    shard_size: int = 2 * 10**9,
    shape: LlamaShape | None = None,
    quiet: bool = False,
) -> dict:
    if shape is None:
        shape = shape_for(params)
    tdtype = {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp32": torch.float32,
        "float32": torch.float32,
    }[dtype]
    hf_dtype = "bfloat16" if tdtype == torch.bfloat16 else "float32"
    elem = torch.empty((), dtype=tdtype).element_size()
    tensors = shape.tensors()
    shards = shard_layout(tensors, elem, shard_size)
    n_sh = len(shards)
    shard_names = [
        "model.safetensors" if n_sh == 1 else f"model-{i + 1:05d}-of-{n_sh:05d}.safetensors"
        for i in range(n_sh)
    ]
    models = ["base"] + [f"ft_{k + 1}" for k in range(tasks)]
    out = Path(out)
    for m in models:
        (out / m).mkdir(parents=True, exist_ok=True)
        (out / m / "config.json").write_text(json.dumps(shape.hf_config(hf_dtype), indent=2) + "\n")
    t0 = time.perf_counter()
    zero_count = [0] * tasks
    total = shape.num_params()
    done = 0
    for si, shard in enumerate(shards):
        entries = [(n, tdtype, s) for n, s in shard]
        writers = [StreamingShardWriter(out / m / shard_names[si], entries) for m in models]
        for name, shp in shard:
            plan = plan_tensor(seed, name, shp, tasks, shape.num_hidden_layers)
            row_elems = math.prod(shp[1:]) if len(shp) > 1 else 1
            rows_per = max(1, CHUNK_ELEMS // row_elems)
            for ci, r0 in enumerate(range(0, shp[0], rows_per)):
                rows = slice(r0, min(shp[0], r0 + rows_per))
                base = base_chunk(seed, name, shp, rows, plan, ci)
                base_q = base.to(tdtype)
                writers[0].write(base_q)
                base_f = base_q.float()
                for k, tau in enumerate(task_chunks(seed, name, shp, rows, plan, ci, tasks)):
                    ft = (base_f + tau).to(tdtype)
                    writers[k + 1].write(ft)
                    zero_count[k] += int((ft == base_q).sum())
                done += base.numel()
            if not quiet:
                print(
                    f"\r[make_checkpoints] {done / total:6.1%} {name[:60]:<60}",
                    end="",
                    file=sys.stderr,
                    flush=True,
                )
        for w in writers:
            w.close()
    if not quiet:
        print(file=sys.stderr)
    weight_map = {n: shard_names[si] for si, shard in enumerate(shards) for n, _ in shard}
    for m in models:
        if n_sh > 1:
            index = {"metadata": {"total_size": total * elem}, "weight_map": weight_map}
            text = json.dumps(index, indent=2) + "\n"
            (out / m / "model.safetensors.index.json").write_text(text)
    manifest = {
        "generator": "benchmarks/make_checkpoints.py",
        "params": total,
        "params_human": human_count(total),
        "tasks": tasks,
        "dtype": hf_dtype,
        "seed": seed,
        "shard_size": shard_size,
        "shards": n_sh,
        "shape": asdict(shape),
        "models": models,
        "bytes_per_checkpoint": total * elem,
        "unchanged_fraction_per_task": [z / total for z in zero_count],
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="100M", help="target parameter count (100M, 1.5B)")
    ap.add_argument("--tasks", type=int, default=3, help="number K of fine-tunes")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "bfloat16", "fp32", "float32"])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-size", default="2GB")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--intermediate", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--kv-heads", type=int)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    shape = shape_for(
        parse_count(a.params),
        vocab=a.vocab,
        hidden=a.hidden,
        layers=a.layers,
        intermediate=a.intermediate,
        heads=a.heads,
        kv_heads=a.kv_heads,
    )
    m = generate(
        a.out,
        tasks=a.tasks,
        dtype=a.dtype,
        seed=a.seed,
        shard_size=parse_bytes(a.shard_size),
        shape=shape,
        quiet=a.quiet,
    )
    print(
        json.dumps(
            {
                k: m[k]
                for k in (
                    "params",
                    "params_human",
                    "tasks",
                    "dtype",
                    "shards",
                    "unchanged_fraction_per_task",
                    "seconds",
                )
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
