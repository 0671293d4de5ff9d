"""The same merge, written for tadmerge and for mergekit.

One table of methods, used by the speed comparison (compare_mergekit.py), the
scaling runs and the cross-check tests, so that what is timed is what is
checked. Where the two tools' definitions agree the configs compute the same
thing; the remaining differences are listed in docs/benchmarks.md
("Known differences") and summarised here:

- task_arithmetic: identical definitions, theta0 + lambda * sum_k w_k tau_k.
  mergekit: `normalize: false` (its default for this method), `lambda`.
- ties (per-tensor trim): mergekit trims each tensor to `int(density*n)`
  largest |tau| (at least 1; `torch.argsort`, so the order among equal
  magnitudes is unspecified); tadmerge keeps floor(density*n), dropping the
  lowest flat index first among equals. mergekit elects +1 where
  sum_k w_k tau_k == 0, tadmerge the tensor's majority sign. With
  `normalize: true` (mergekit's default for ties) its divisor is
  sum_k w_k m_k, i.e. tadmerge's `disjoint: mean`. mergekit computes in the
  `dtype` of its config; we set `dtype: float32` so both compute in float32
  and cast once (`out_dtype` = the checkpoint's dtype).
- dare_ties: random drop (different random streams: never bit-comparable);
  mergekit's `rescale: true` rescales the kept entries so the task vector
  keeps its l1 norm, tadmerge's `random` rescales by 1/(1-p) (DARE's own
  rule; tadmerge does not offer l1 for `random`): equal in expectation, the
  same cost. `normalize: false`, so the merge is a sign-elected sum:
  tadmerge `disjoint: sum`.
"""

from __future__ import annotations

from pathlib import Path

DENSITY = 0.2  # TIES trim / DARE keep fraction (TIES paper: top 20%)
LAMBDA_TA = 0.3  # task arithmetic scale (paper setting)

# Methods both tools run (the comparison), then tadmerge-only rows.
SHARED_METHODS = ("task_arithmetic", "ties", "dare_ties")
TADMERGE_ONLY = ("tadrop_ta", "tadrop_ties", "tadrop_emr")

TADROP = {
    "method": "tadrop",
    "scope": "tensor",
    "low_q": 0.5,
    "high_q": 0.95,
    "rescale": "l2",
    "max_drop": 1.0,
}


def tadmerge_sections(
    method: str, density: float = DENSITY, lam: float = LAMBDA_TA, scope: str = "tensor"
) -> dict:
    """The `sparsify` and `merge` sections of a tadmerge config for a method."""
    if method == "task_arithmetic":
        return {
            "sparsify": {"method": "none"},
            "merge": {"method": "task_arithmetic", "scale": lam},
        }
    if method == "ties":
        return {
            "sparsify": {"method": "magnitude", "scope": scope, "density": density},
            "merge": {"method": "ties", "scale": 1.0, "disjoint": "mean"},
        }
    if method == "dare_ties":
        return {
            "sparsify": {"method": "random", "p": 1.0 - density},
            "merge": {"method": "ties", "scale": 1.0, "disjoint": "sum"},
        }
    if method == "tadrop_ta":
        return {"sparsify": dict(TADROP), "merge": {"method": "task_arithmetic", "scale": lam}}
    if method == "tadrop_ties":
        return {
            "sparsify": dict(TADROP),
            "merge": {"method": "ties", "scale": 1.0, "disjoint": "mean"},
        }
    if method == "tadrop_emr":
        return {"sparsify": dict(TADROP), "merge": {"method": "emr"}}
    if method == "emr":
        return {"sparsify": {"method": "none"}, "merge": {"method": "emr"}}
    raise ValueError(f"unknown method {method!r}")


def tadmerge_config(
    method: str,
    base: Path,
    fts: list[Path],
    out: Path,
    *,
    density: float = DENSITY,
    lam: float = LAMBDA_TA,
    memory_budget: str | None = None,
    workers: int | None = None,
    scope: str = "tensor",
    seed: int = 0,
    shard_size: str | None = None,
    weights: list[float] | None = None,
) -> dict:
    cfg: dict = {
        "base": str(base),
        "models": [
            {"path": str(p), "name": f"t{i + 1}", "weight": (weights[i] if weights else 1.0)}
            for i, p in enumerate(fts)
        ],
        **tadmerge_sections(method, density, lam, scope),
        "output": {"path": str(out), "dtype": "auto"},
        "seed": seed,
    }
    if shard_size:
        cfg["output"]["shard_size"] = shard_size
    runtime = {}
    if memory_budget:
        runtime["memory_budget"] = memory_budget
    if workers:
        runtime["workers"] = workers
    if runtime:
        cfg["runtime"] = runtime
    return cfg


def mergekit_config(
    method: str,
    base: Path,
    fts: list[Path],
    *,
    density: float = DENSITY,
    lam: float = LAMBDA_TA,
    dtype: str | None = "float32",
    out_dtype: str | None = None,
    weights: list[float] | None = None,
) -> dict:
    """mergekit YAML (as a dict) computing what tadmerge_config(method) computes."""
    if method not in SHARED_METHODS:
        raise ValueError(f"mergekit has no equivalent of {method!r}")
    models = []
    for i, p in enumerate(fts):
        params: dict = {"weight": weights[i] if weights else 1.0}
        if method in ("ties", "dare_ties"):
            params["density"] = density
        models.append({"model": str(p), "parameters": params})
    cfg: dict = {"merge_method": method, "base_model": str(base), "models": models}
    if method == "task_arithmetic":
        cfg["parameters"] = {"lambda": lam, "normalize": False}
    elif method == "ties":
        cfg["parameters"] = {"normalize": True, "lambda": 1.0, "int8_mask": False}
    elif method == "dare_ties":
        cfg["parameters"] = {"normalize": False, "rescale": True, "lambda": 1.0, "int8_mask": False}
    if dtype:
        cfg["dtype"] = dtype
    if out_dtype:
        cfg["out_dtype"] = out_dtype
    return cfg


MERGEKIT_FLAGS = ["--no-copy-tokenizer", "--no-write-model-card", "--quiet"]
