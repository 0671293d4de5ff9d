"""NearSwap (mergekit's `nearswap`): θ = w·θ_1 + (1 − w)·θ0 with, per entry,
w = clamp(t / max(|θ0 − θ_1|, 1e-6), 0, 1): entries where the model stays within
t of the base take the model's value, the others move toward it by t. One model
beside the base; element-wise, so any split gives the same bytes. With a
sparsifier θ_1 is taken as θ0 + t_1."""

from __future__ import annotations

from .registry import Combiner, Param

MIN_DIFF = 1e-6  # mergekit's floor on |θ0 − θ_1| (the divisor)


def nearswap(base, model, t: float):
    """w·θ_1 + (1 − w)·θ0 in float32, in mergekit's order (d, w, then the two
    products and their sum). Consumes `model` (the result is written over it)."""
    import torch

    f = torch.float32
    floor = torch.tensor(MIN_DIFF, dtype=f, device=base.device)
    d = torch.sub(base, model).abs_().clamp_min_(floor)
    w = torch.tensor(t, dtype=f, device=base.device).div(d).clamp_(0.0, 1.0)
    one_minus = torch.rsub(w, 1.0)
    return model.mul_(w).add_(one_minus.mul_(base))


def merge_weights(base, models, spec, check_finite: bool, ctx):
    from ..engine.block import BlockResult, weights_stats

    stats = weights_stats(base, models, check_finite, ctx.backend)
    return BlockResult(nearswap(base, models[0], spec.param("t")), None, stats)


def merge_block(base, taus, plans, spec, ctx, sparsify, chunks, check_finite):
    from ..engine.block import combine_chunks

    t = spec.param("t")
    return combine_chunks(
        base, taus, plans, sparsify, chunks, lambda b, ts: nearswap(b, ts[0].add_(b), t)
    )


METHOD = Combiner(
    name="nearswap",
    summary="w·θ_1 + (1-w)·θ0, w = clamp(t / |θ0 - θ_1|, 0, 1): take the model where it is "
    "near the base (mergekit's nearswap; one model)",
    params=(Param("t", 0.0001, "distance below which the model's value is taken", lo=0.0),),
    # |θ0 - θ_1| and w: two float32 temporaries per chunk (chunk-sized: no extra per element)
    merge_block=merge_block,
    merge_weights=merge_weights,
    models=(1, 1),
    uses_weights=False,
)
