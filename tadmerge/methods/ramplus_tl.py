"""RAMPlus, tensor-local (mergekit's `ramplus_tl`, arXiv 2601.13572): RAM whose
entries moved by one task alone are scaled by λ_k = 1 + r·clamp(ρ_k, 0, alpha),
ρ_k = (task k's entries moved together with another task) / max(its entries
moved alone, epsilon), both counted over the whole tensor. The counts are exact
integers that add over row blocks (engine/tensor_stats.py), so a split tensor
gets the same λ_k; λ_k is computed in float64 and cast to float32 once."""

from __future__ import annotations

from .ram import EPSILON, moved_counts, ram_delta
from .registry import Combiner, Param, TensorStats

SUMS_CHUNK = 1 << 18  # entries counted at a time (bool masks stay chunk-sized)


def sums(base, ts, spec, backend: str) -> list[int]:
    """[shared_1..K, unique_1..K] of the block (ram.moved_counts), chunk by chunk."""
    n = ts[0].numel()
    total = [0] * (2 * len(ts))
    for a in range(0, n, SUMS_CHUNK):
        part = moved_counts([t[a : a + SUMS_CHUNK] for t in ts], spec.param("epsilon"))
        total = [x + y for x, y in zip(total, part, strict=True)]
    return total


def lambdas(shared: list[int], unique: list[int], r: float, alpha: float, eps: float):
    """λ_k = 1 + r·clamp(shared_k / max(unique_k, eps), 0, alpha), float64."""
    return [
        1.0 + r * min(max(s / max(u, eps), 0.0), alpha) for s, u in zip(shared, unique, strict=True)
    ]


def finish(totals: list[int], n: int, spec) -> dict:
    k = len(totals) // 2
    lam = lambdas(
        totals[:k], totals[k:], spec.param("r"), spec.param("alpha"), spec.param("epsilon")
    )
    return {"lambdas": lam}


def merge_block(base, taus, plans, spec, ctx, sparsify, chunks, check_finite):
    from ..engine import tensor_stats as TS
    from ..engine.block import BlockResult

    for a, b in chunks:
        sparsify(a, b)
    st = ctx.tensor_stats or TS.local(base, taus, spec, backend=ctx.backend)
    lam = st["values"]["lambdas"]
    eps = spec.param("epsilon")
    for a, b in chunks:
        ram_delta([t[a:b] for t in taus], eps, lam).add_(base[a:b])
    return BlockResult(taus[0], None, [tp.stats for tp in plans])


METHOD = Combiner(
    name="ramplus_tl",
    summary="RAM with each task's unique entries scaled by 1 + r·clamp(shared/unique, 0, "
    "alpha), counted per tensor (mergekit's ramplus_tl)",
    params=(
        Param("r", 0.1, "gain of the unique entries' rescale", lo=0.0),
        Param("alpha", 0.2, "upper bound of the shared/unique ratio", lo=0.0),
        EPSILON,
    ),
    merge_block=merge_block,
    tensor_stats=TensorStats(sums=sums, finish=finish),
)
