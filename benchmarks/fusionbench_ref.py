"""FusionBench's in-memory TA / TIES / EMR on a small checkpoint set: the
reference the cross-check test compares tadmerge against.

Runs INSIDE the fusion-bench virtual environment (benchmarks/setup_envs.sh):

    .bench-envs/fusionbench/bin/python benchmarks/fusionbench_ref.py \
        --base B --ft F1 --ft F2 --ft F3 --method ties --density 0.2 --scale 1.0 \
        --out ref.safetensors

Self-contained (torch, safetensors, fusion_bench only). Loads every tensor in
float32 (the models are small), calls FusionBench's own functions:
- task_arithmetic: fusion_bench.method.task_arithmetic.task_arithmetic_merge
  (theta0 + scale * sum_k tau_k);
- ties: fusion_bench.method.ties_merging.ties_merging_utils.ties_merging on
  the flattened task vectors (state_dict_to_vector: tensors sorted by name,
  i.e. tadmerge's `scope: global` order), merge_func mean, then
  theta0 + scale * merged;
- emr: fusion_bench.method.emr_merging.utils.emr_merge, and for each task
  theta_k* = theta0 + rescaler_k * mask_k * tau_uni (EMRTaskModulator.apply).
Writes one safetensors file: the merged tensors (ta, ties) or, for emr, the
tensors of each task model prefixed `task{k}/`, plus `rescalers`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def load_dir(d: Path) -> dict[str, torch.Tensor]:
    d = Path(d)
    index = d / "model.safetensors.index.json"
    files = (
        sorted({d / f for f in json.loads(index.read_text())["weight_map"].values()})
        if index.exists()
        else [d / "model.safetensors"]
    )
    out = {}
    for f in files:
        with safe_open(f, "pt") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k).float()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--ft", type=Path, action="append", required=True)
    ap.add_argument("--method", choices=["task_arithmetic", "ties", "emr"], required=True)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--density", type=float, default=0.2, help="TIES: fraction kept (top-k)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)

    base = load_dir(a.base)
    fts = [load_dir(p) for p in a.ft]
    tensors: dict[str, torch.Tensor] = {}
    if a.method == "task_arithmetic":
        from fusion_bench.method.task_arithmetic.task_arithmetic import task_arithmetic_merge

        def module(sd):
            # a module tree holding the tensors as buffers at their dotted names
            # (FusionBench's state_dict_add refuses Parameter + Tensor mixes)
            root = torch.nn.Module()
            for name, v in sd.items():
                *path, leaf = name.split(".")
                mod = root
                for part in path:
                    if not hasattr(mod, part):
                        mod.add_module(part, torch.nn.Module())
                    mod = getattr(mod, part)
                mod.register_buffer(leaf, v.clone())
            return root

        merged = task_arithmetic_merge(
            module(base), [module(f) for f in fts], scaling_factor=a.scale, inplace=True
        )
        tensors = {k: v.detach().clone() for k, v in merged.state_dict().items()}
    elif a.method == "ties":
        from fusion_bench.method.ties_merging.ties_merging_utils import (
            state_dict_to_vector,
            ties_merging,
            vector_to_state_dict,
        )

        flat_ft = torch.vstack([state_dict_to_vector(f) for f in fts])
        flat_ptm = state_dict_to_vector(base)
        merged_tv = ties_merging(flat_ft - flat_ptm, reset_thresh=a.density, merge_func="mean")
        merged = vector_to_state_dict(
            flat_ptm + a.scale * merged_tv, {k: v.clone() for k, v in base.items()}
        )
        tensors = {k: v.detach().clone() for k, v in merged.items()}
    else:
        from fusion_bench.method.emr_merging.utils import emr_merge

        tvs = [{k: f[k] - base[k] for k in base} for f in fts]
        unified, masks, rescalers = emr_merge(tvs)
        for k in range(len(fts)):
            for n in base:
                tensors[f"task{k}/{n}"] = (
                    base[n] + unified[n] * masks[n][k] * rescalers[k]
                ).contiguous()
        tensors["rescalers"] = rescalers.double()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(a.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
