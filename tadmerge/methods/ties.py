"""TIES-Merging: elect a sign per entry (the sign of Σ w_k t_k, zero votes taking
the tensor's majority sign), keep the task entries that agree with it, and take
their disjoint mean (or sum): θ = θ0 + λ · that. A split tensor's majority sign is
a statistic of the whole tensor: its blocks use +1 provisionally and the driver
reruns the few whose exact vote cancellations needed the other sign."""

from __future__ import annotations

from .registry import Combiner, Param
from .task_arithmetic import SCALE


def merge_block(base, taus, plans, spec, ctx, sparsify, chunks, check_finite):
    from ..engine import combine as C
    from ..engine import kernels
    from ..engine.block import BlockResult, store

    w = list(spec.weights)
    stats = [tp.stats for tp in plans]
    # the fused kernel (finite values; the disjoint mean's divisor needs positive
    # weights) or the torch ops chunk by chunk: the same bytes
    fused = (
        check_finite
        and (spec.disjoint == "sum" or all(x > 0 for x in w))
        and kernels.enabled(base, ctx.backend)
    )
    sparsified = False
    if fused:
        for a, b in chunks:
            sparsify(a, b)
        sparsified = True
    majority = ctx.majority
    if majority is None and ctx.whole:
        # the block is the whole tensor: its own vote decides, so count it first
        if fused:
            votes = kernels.ties_votes(taus, w)
        else:
            votes = sum(C.ties_vote(sparsify(a, b), w) for a, b in chunks)
            sparsified = True
        majority = C.majority_sign(votes)
    else:
        # a split tensor's majority sign is only known once every block voted:
        # the resolved one, or +1 provisionally (see the module docstring)
        majority = 1 if majority is None else majority
    if fused:
        mean = spec.disjoint == "mean"
        sign_sum, cancel = kernels.ties_merge(
            taus, w, base, spec.scale, mean, majority, not ctx.whole
        )
        return BlockResult(taus[0], None, stats, (sign_sum, cancel, majority))
    sign_sum = cancel = 0
    for a, b in chunks:
        ts = [t[a:b] for t in taus] if sparsified else sparsify(a, b)
        tb = C.ties(base[a:b], ts, w, spec.scale, spec.disjoint, majority, not ctx.whole)
        store(taus[0][a:b], tb.merged)
        sign_sum += tb.sign_sum
        cancel += tb.cancel
    return BlockResult(taus[0], None, stats, (sign_sum, cancel, majority))


METHOD = Combiner(
    name="ties",
    summary="elect a sign per entry, disjoint mean (or sum) of the agreeing t_k, times λ",
    params=(
        SCALE,
        Param(
            "disjoint",
            "mean",
            "mean: divide by the agreeing tasks' weights; sum: add them",
            choices=("mean", "sum"),
        ),
    ),
    merge_block=merge_block,
    cross_block=("majority",),
)
