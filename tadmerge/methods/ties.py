"""TIES-Merging: elect a sign per entry (the sign of Σ w_k t_k, zero votes taking
the tensor's majority sign), keep the task entries that agree with it, and take
their disjoint mean (or sum): θ = θ0 + λ · that. A split tensor's majority sign is
a statistic of the whole tensor: its blocks use +1 provisionally and the driver
reruns the few whose exact vote cancellations needed the other sign."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .registry import Combiner, Param
from .task_arithmetic import SCALE

if TYPE_CHECKING:
    import torch


def merge_block(base, taus, plans, spec, ctx, sparsify, chunks, check_finite):
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
            votes = sum(ties_vote(sparsify(a, b), w) for a, b in chunks)
            sparsified = True
        majority = majority_sign(votes)
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
        tb = ties(base[a:b], ts, w, spec.scale, spec.disjoint, majority, not ctx.whole)
        store(taus[0][a:b], tb.merged)
        sign_sum += tb.sign_sum
        cancel += tb.cancel
    return BlockResult(taus[0], None, stats, (sign_sum, cancel, majority))


def majority_sign(sign_sum: int) -> int:
    return -1 if sign_sum < 0 else 1


def ties_vote(ts: list[torch.Tensor], weights: list[float]) -> int:
    """Σ sign(Σ_k fl32(w_k)·t_k) over a block, computed as ties() does (ts unchanged)."""
    import torch

    from ..engine.combine import f32

    total = None
    for t, w in zip(ts, weights, strict=True):
        p = t if w == 1.0 else t * f32(w, t)
        if total is None:
            total = p
        elif total is ts[0]:
            total = total + p
        else:
            total.add_(p)
    return int(torch.count_nonzero(total > 0)) - int(torch.count_nonzero(total < 0))


@dataclass
class TiesBlock:
    merged: torch.Tensor
    sign_sum: int  # Σ sign(Σ_k w_k t_k) over the block: the majority vote's share
    cancel: int  # entries where the weighted votes cancel exactly but some t_k != 0
    majority: int  # the sign used for those entries


def ties(
    base: torch.Tensor,
    ts: list[torch.Tensor],
    weights: list[float],
    scale: float,
    disjoint: str,
    majority: int | None,
    count_cancel: bool = False,
) -> TiesBlock:
    """TIES: elect a sign, keep agreeing entries, disjoint mean (or sum). Consumes `ts`.

    `majority` None: the block is the whole tensor and its own vote decides.
    Computed as q_k = p_k·s with s = ±1 the elected sign (exact): p_k agrees iff
    q_k > 0, and Σ agreeing p_k = s·Σ max(q_k, 0) exactly (negation commutes with
    rounding), summed in task order like the definition. Only arithmetic and
    comparisons that vectorise are used (no masked_fill_, where or bool sums):
    this is the hot loop of a TIES merge.
    """
    import torch

    from ..engine.combine import f32, scale_

    prods = [scale_(t, w) for t, w in zip(ts, weights, strict=True)]
    total = prods[0].clone() if len(prods) == 1 else torch.add(prods[0], prods[1])
    for p in prods[2:]:
        total.add_(p)
    n_up = int(torch.count_nonzero(total > 0))
    n_down = int(torch.count_nonzero(total < 0))
    sign_sum = n_up - n_down
    if majority is None:
        majority = majority_sign(sign_sum)
    cancel = 0
    if count_cancel and n_up + n_down < total.numel():  # votes that cancel while a task moved
        zero = total == 0
        moved = prods[0] != 0
        for p in prods[1:]:
            moved |= p != 0
        cancel = int(torch.count_nonzero(zero & moved))
    # s = sign(total), zero votes take the majority sign: copysign(1, total + 0.0)
    # (-0.0 + 0.0 = +0.0), or for a negative majority -copysign(1, 0.0 - total)
    if majority > 0:
        sign = torch.ones_like(total).copysign_(total.add_(0.0))
    else:
        sign = torch.ones_like(total).copysign_(torch.rsub(total, 0.0)).neg_()
    del total
    if disjoint == "mean" and not all(w > 0 for w in weights):
        return _ties_signed_weights(base, prods, weights, scale, sign, sign_sum, cancel, majority)
    num = None
    den = None
    for p, w in zip(prods, weights, strict=True):
        q = p.mul_(sign)
        if disjoint == "mean":
            agree = q > 0
            if den is None:
                den = agree.to(torch.float32)
                if w != 1.0:
                    den.mul_(f32(w, base))
            elif w == 1.0:
                den.add_(agree)
            else:
                den.add_(agree.to(torch.float32).mul_(f32(w, base)))
            del agree
        q.clamp_min_(0.0)  # max(q, 0): agreeing entries, ±0.0 elsewhere
        num = q if num is None else num.add_(q)
    num.mul_(sign)
    if den is not None:
        # the weights are positive here, so Σ w_k m_k = 0 exactly where no task
        # agrees, and num is ±0.0 there: dividing by 1 instead leaves it as it is
        num.div_(den.add_(den == 0))
    num.add_(0.0)  # ±0.0 where no task agrees becomes +0.0, as defined
    merged = num.mul_(f32(scale, base)).add_(base)
    return TiesBlock(merged, sign_sum, cancel, majority)


def _ties_signed_weights(base, prods, weights, scale, sign, sign_sum, cancel, majority):
    """Disjoint mean with some non-positive weights: Σ w_k m_k can vanish where tasks
    agree, and such entries are defined as 0; the general (slower) masked form."""
    import torch

    from ..engine.combine import f32

    num = None
    den = None
    for p, w in zip(prods, weights, strict=True):
        q = p.mul_(sign)
        agree = q > 0
        q = torch.where(agree, q, 0.0)
        num = q if num is None else num.add_(q)
        m = agree.to(torch.float32)
        if w != 1.0:
            m.mul_(f32(w, base))
        den = m if den is None else den.add_(m)
    num.mul_(sign)
    nz = den != 0
    num.div_(den.masked_fill_(~nz, 1.0)).masked_fill_(~nz, 0.0)
    merged = num.mul_(f32(scale, base)).add_(base)
    return TiesBlock(merged, sign_sum, cancel, majority)


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
