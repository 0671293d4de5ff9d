"""Linear (mergekit's `linear`): θ = Σ w_k θ_k / Σ w_k, or Σ w_k θ_k without
normalize. With a sparsifier it acts on task vectors: θ0 + Σ w_k t_k (/ Σ w_k).
Averaging is linear with normalize (methods/average.py)."""

from __future__ import annotations

from .registry import Combiner, Param

NORMALIZE = Param("normalize", True, "divide by the sum of the weights")


def merge_weights(base, models, spec, check_finite: bool, ctx, normalize: bool | None = None):
    """Without a sparsifier the weights themselves are combined (τ_k only for the
    report and the finite check). Consumes `models`."""
    from ..engine import combine as C
    from ..engine.block import BlockResult, weights_stats

    normalize = spec.param("normalize") if normalize is None else normalize
    stats = weights_stats(base, models, check_finite, ctx.backend)
    w = list(spec.weights)
    merged = C.average(models, w) if normalize else C.weighted_sum(models, w)
    return BlockResult(merged, None, stats)


def merge_block(base, taus, plans, spec, ctx, sparsify, chunks, check_finite, normalize=None):
    from ..engine import combine as C
    from ..engine.block import combine_chunks

    normalize = spec.param("normalize") if normalize is None else normalize
    w = list(spec.weights)

    def combine(b, ts):
        return C.average_of_deltas(b, ts, w) if normalize else C.weighted_sum(ts, w).add_(b)

    return combine_chunks(base, taus, plans, sparsify, chunks, combine)


METHOD = Combiner(
    name="linear",
    summary="Σ w_k θ_k / Σ w_k (mergekit's linear; without normalize: Σ w_k θ_k)",
    params=(NORMALIZE,),
    merge_block=merge_block,
    merge_weights=merge_weights,
)
