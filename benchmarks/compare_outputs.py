"""Compare two merged checkpoints tensor by tensor (numbers, not the clock).

    python benchmarks/compare_outputs.py DIR_A DIR_B [--rtol 1e-5 --atol 1e-7]

For every tensor: maximum absolute difference, how many entries differ at all,
how many differ beyond `atol + rtol*|b|`, and (for bf16) the largest difference
in units of the last place. Reads one tensor at a time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from safetensors import safe_open

from benchmarks.common import checkpoint_files


def tensor_index(model_dir: Path) -> dict[str, Path]:
    out = {}
    for f in checkpoint_files(model_dir):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                out[k] = f
    return out


def load(model_dir: Path, name: str, index: dict | None = None) -> torch.Tensor:
    index = index or tensor_index(model_dir)
    with safe_open(index[name], "pt") as st:
        return st.get_tensor(name)


def compare_tensors(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> dict:
    dt = a.dtype
    af, bf = a.float(), b.float()
    diff = (af - bf).abs()
    tol = atol + rtol * bf.abs()
    out = {
        "n": a.numel(),
        "dtype": str(dt).replace("torch.", ""),
        "max_abs": float(diff.max()) if diff.numel() else 0.0,
        "n_differ": int((af != bf).sum()),
        "n_beyond_tol": int((diff > tol).sum()),
    }
    if dt in (torch.bfloat16, torch.float16):
        ia, ib = a.view(torch.int16).int(), b.view(torch.int16).int()
        same_sign = (ia >= 0) == (ib >= 0)
        ulp = torch.where(same_sign, (ia - ib).abs(), torch.full_like(ia, 1 << 16))
        out["max_ulp"] = int(ulp.max()) if ulp.numel() else 0
        out["n_beyond_1ulp"] = int((ulp > 1).sum())
    return out


def compare_dirs(
    dir_a: Path, dir_b: Path, rtol: float = 1e-5, atol: float = 1e-7, per_tensor: bool = False
) -> dict:
    ia, ib = tensor_index(dir_a), tensor_index(dir_b)
    if set(ia) != set(ib):
        return {
            "same_names": False,
            "only_a": sorted(set(ia) - set(ib))[:20],
            "only_b": sorted(set(ib) - set(ia))[:20],
        }
    tensors = {}
    tot = {"n": 0, "n_differ": 0, "n_beyond_tol": 0, "max_abs": 0.0, "dtype_mismatch": 0}
    for name in sorted(ia):
        a, b = load(dir_a, name, ia), load(dir_b, name, ib)
        if a.shape != b.shape:
            raise ValueError(f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
        if a.dtype != b.dtype:
            tot["dtype_mismatch"] += 1
            b = b.to(a.dtype)
        r = compare_tensors(a, b, rtol, atol)
        tensors[name] = r
        for k in ("n", "n_differ", "n_beyond_tol"):
            tot[k] += r[k]
        tot["max_abs"] = max(tot["max_abs"], r["max_abs"])
        if "max_ulp" in r:
            tot["max_ulp"] = max(tot.get("max_ulp", 0), r["max_ulp"])
            tot["n_beyond_1ulp"] = tot.get("n_beyond_1ulp", 0) + r["n_beyond_1ulp"]
    tot["same_names"] = True
    tot["frac_differ"] = tot["n_differ"] / max(tot["n"], 1)
    tot["frac_beyond_tol"] = tot["n_beyond_tol"] / max(tot["n"], 1)
    if per_tensor:
        tot["tensors"] = tensors
    else:
        worst = sorted(tensors.items(), key=lambda kv: -kv[1]["n_beyond_tol"])[:5]
        tot["worst_tensors"] = {k: v for k, v in worst if v["n_beyond_tol"]}
    return tot


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="compare two merged checkpoints")
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--rtol", type=float, default=1e-5)
    ap.add_argument("--atol", type=float, default=1e-7)
    ap.add_argument("--per-tensor", action="store_true")
    a = ap.parse_args(argv)
    print(json.dumps(compare_dirs(a.a, a.b, a.rtol, a.atol, a.per_tensor), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
