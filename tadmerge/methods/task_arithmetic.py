"""Task Arithmetic: θ = θ0 + λ Σ_k w_k t_k."""

from __future__ import annotations

from .registry import Combiner, Param

SCALE = Param("scale", 1.0, "λ, the scale of the combined task vector")


def merge_block(base, taus, plans, spec, ctx, sparsify, chunks, check_finite):
    from ..engine import combine as C
    from ..engine.block import combine_chunks

    w = list(spec.weights)
    return combine_chunks(
        base, taus, plans, sparsify, chunks, lambda b, ts: C.task_arithmetic(b, ts, w, spec.scale)
    )


METHOD = Combiner(
    name="task_arithmetic",
    summary="θ0 + λ Σ w_k t_k",
    params=(SCALE,),
    merge_block=merge_block,
)
