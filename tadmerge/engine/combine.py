"""Combiners: merge the K sparsified task vectors of one block (SPEC section 5).

Every formula is evaluated in float32 in a fixed order (task 1..K, products
before sums, scalars cast to float32 once), so the result is the same bits on
any device and for any block split; the order is documented in docs/semantics.md
and mirrored by the reference implementation in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .exact import ExactSum, exact_abs_sum


def _f32(v: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32, device=like.device)


def _scale_(t: torch.Tensor, w: float) -> torch.Tensor:
    """t ·= fl32(w) in place (x·1 = x exactly, so w = 1 costs nothing)."""
    return t if w == 1.0 else t.mul_(_f32(w, t))


def weighted_sum(ts: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Σ_k fl32(w_k)·t_k, accumulated in task order. Consumes `ts` (in place)."""
    acc = _scale_(ts[0], weights[0])
    for t, w in zip(ts[1:], weights[1:], strict=True):
        acc.add_(_scale_(t, w))
    return acc


def average(thetas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """θ = Σ w_k θ_k / Σ w_k (Σ w_k in float64, cast once). Consumes `thetas`."""
    return weighted_sum(thetas, weights).div_(_f32(sum(weights), thetas[0]))


def average_of_deltas(base: torch.Tensor, ts: list[torch.Tensor], weights: list[float]):
    """With a sparsifier, averaging acts on task vectors: θ0 + Σ w_k t_k / Σ w_k."""
    return weighted_sum(ts, weights).div_(_f32(sum(weights), base)).add_(base)


def task_arithmetic(base: torch.Tensor, ts: list[torch.Tensor], weights: list[float], scale):
    """θ = θ0 + λ Σ w_k t_k. Consumes `ts`."""
    return weighted_sum(ts, weights).mul_(_f32(scale, base)).add_(base)


def majority_sign(sign_sum: int) -> int:
    return -1 if sign_sum < 0 else 1


def ties_vote(ts: list[torch.Tensor], weights: list[float]) -> int:
    """Σ sign(Σ_k fl32(w_k)·t_k) over a block, computed as ties() does (ts unchanged)."""
    total = None
    for t, w in zip(ts, weights, strict=True):
        p = t if w == 1.0 else t * _f32(w, t)
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
    prods = [_scale_(t, w) for t, w in zip(ts, weights, strict=True)]
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
                    den.mul_(_f32(w, base))
            elif w == 1.0:
                den.add_(agree)
            else:
                den.add_(agree.to(torch.float32).mul_(_f32(w, base)))
            del agree
        q.clamp_min_(0.0)  # max(q, 0): agreeing entries, ±0.0 elsewhere
        num = q if num is None else num.add_(q)
    num.mul_(sign)
    if den is not None:
        # the weights are positive here, so Σ w_k m_k = 0 exactly where no task
        # agrees, and num is ±0.0 there: dividing by 1 instead leaves it as it is
        num.div_(den.add_(den == 0))
    num.add_(0.0)  # ±0.0 where no task agrees becomes +0.0, as defined
    merged = num.mul_(_f32(scale, base)).add_(base)
    return TiesBlock(merged, sign_sum, cancel, majority)


def _ties_signed_weights(base, prods, weights, scale, sign, sign_sum, cancel, majority):
    """Disjoint mean with some non-positive weights: Σ w_k m_k can vanish where tasks
    agree, and such entries are defined as 0; the general (slower) masked form."""
    num = None
    den = None
    for p, w in zip(prods, weights, strict=True):
        q = p.mul_(sign)
        agree = q > 0
        q = torch.where(agree, q, 0.0)
        num = q if num is None else num.add_(q)
        m = agree.to(torch.float32)
        if w != 1.0:
            m.mul_(_f32(w, base))
        den = m if den is None else den.add_(m)
    num.mul_(sign)
    nz = den != 0
    num.div_(den.masked_fill_(~nz, 1.0)).masked_fill_(~nz, 0.0)
    merged = num.mul_(_f32(scale, base)).add_(base)
    return TiesBlock(merged, sign_sum, cancel, majority)


@dataclass
class EmrBlock:
    """EMR-Merging of one block: the unified delta, the task masks, and the exact
    sums that the task rescalers are made of."""

    tau_uni: torch.Tensor  # float32
    masks: list[torch.Tensor]  # bool, one per task
    abs_t: list[ExactSum]  # Σ|t_k| over the block
    abs_masked_uni: list[ExactSum]  # Σ|M_k ⊙ τ_uni| over the block


def emr(ts: list[torch.Tensor]) -> EmrBlock:
    """σ = sign(Σ t_k) with 0 → -1; M_k = [t_k σ > 0]; τ_uni = σ·max_k(M_k |t_k|).

    Consumes `ts`. With s = ±1 the elected sign, q_k = t_k·s is exact, M_k is
    q_k > 0 and M_k |t_k| = max(q_k, 0): arithmetic that vectorises instead of
    torch.where over bool masks.
    """
    total = ts[0].clone() if len(ts) == 1 else torch.add(ts[0], ts[1])
    for t in ts[2:]:
        total.add_(t)
    sign = torch.ones_like(total).copysign_(torch.rsub(total, 0.0)).neg_()  # 0 → -1
    del total
    abs_t = [exact_abs_sum(t) for t in ts]
    masks = []
    mag = None
    for t in ts:
        q = t.mul_(sign)
        masks.append(q > 0)
        q.clamp_min_(0.0)  # M_k |t_k|, ±0.0 elsewhere
        mag = q if mag is None else torch.maximum(mag, q, out=mag)
    abs_uni = []
    for m in masks:
        kept = mag.clone()
        kept.view(torch.int32).bitwise_and_(m.to(torch.int32).neg_())
        abs_uni.append(exact_abs_sum(kept))
    tau_uni = mag.mul_(sign).add_(0.0)  # +0.0 where no task agrees
    return EmrBlock(tau_uni, masks, abs_t, abs_uni)


def emr_task_block(base: torch.Tensor, tau_uni: torch.Tensor, mask: torch.Tensor, rescaler):
    """θ_k* = θ0 + fl32(λ_k) · (M_k ⊙ τ_uni)."""
    return base + _f32(rescaler, base) * torch.where(mask, tau_uni, 0.0)
