"""RAMPlus, tensor-local (mergekit's `ramplus_tl`, arXiv 2601.13572): RAM whose
entries moved by one task alone are scaled by λ_k = 1 + r·clamp(ρ_k, 0, alpha),
ρ_k = (task k's entries moved together with another task) / max(its entries
moved alone, epsilon), both counted over the whole tensor. The counts are
integers added over the blocks (a CountRequest), so a split tensor gets the same
λ_k; λ_k is computed in float64 and cast to float32 once."""

from __future__ import annotations

from .ram import EPSILON, moved_counts, ram_merge
from .registry import Combiner, Param


def lambdas(shared: list[float], unique: list[float], r: float, alpha: float, eps: float):
    """λ_k = 1 + r·clamp(shared_k / max(unique_k, eps), 0, alpha), float64."""
    return [
        1.0 + r * min(max(s / max(u, eps), 0.0), alpha) for s, u in zip(shared, unique, strict=True)
    ]


def statistics(spec, shape, name):
    """The counts of every task's shared and unique entries, then the λ_k."""
    from ..engine.spec import CountRequest

    k = len(spec.weights)
    c = [int(x) for x in (yield CountRequest())]
    lam = lambdas(c[:k], c[k:], spec.param("r"), spec.param("alpha"), spec.param("epsilon"))
    return {"lambdas": lam}


def merge_block(base, taus, plans, spec, ctx, sparsify, chunks, check_finite):
    from ..engine import tensor_stats as TS
    from ..engine.block import BlockResult

    for a, b in chunks:
        sparsify(a, b)
    lam = TS.resolve(base, taus, spec, ctx)["values"]["lambdas"]
    eps = spec.param("epsilon")
    for a, b in chunks:
        ram_merge(base[a:b], [t[a:b] for t in taus], eps, ctx.backend, lam)
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
    statistics=statistics,
    counts=lambda ts, spec, backend: moved_counts(ts, spec.param("epsilon"), backend),
    uses_weights=False,
)
