"""EMR-Merging: a unified task vector τ_uni = σ·max_k(M_k |t_k|) with σ = sign(Σ t_k)
(0 → -1), a 1-bit mask M_k = [t_k σ > 0] and a rescaler λ_k = Σ|t_k| / Σ|M_k ⊙ τ_uni|
per task; task k is θ0 + λ_k M_k ⊙ τ_uni. The rescalers are exact sums over the
whole task vector (integer moments, engine/exact.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .registry import Combiner

if TYPE_CHECKING:
    import torch

    from ..engine.exact import ExactSum


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
    import torch

    from ..engine.exact import exact_abs_sum

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
    import torch

    from ..engine.combine import f32

    return base + f32(rescaler, base) * torch.where(mask, tau_uni, 0.0)


def merge_block(base, taus, plans, spec, ctx, sparsify, chunks, check_finite):
    import torch

    from ..engine import kernels
    from ..engine.block import BlockResult, store
    from ..engine.exact import ExactSum, exact_sum_by_exponent

    stats = [tp.stats for tp in plans]
    n = base.numel()
    if check_finite and kernels.enabled(base, ctx.backend) and n <= kernels.PIECE:
        # one fused pass (kernels.emr_merge), the same bytes and exact sums
        for a, b in chunks:
            sparsify(a, b)
        planes = torch.empty((len(taus), n), dtype=torch.bool)
        abs_t, abs_u = kernels.emr_merge(taus, planes)
        block = EmrBlock(
            taus[0],
            list(planes),
            [exact_sum_by_exponent(v, n) for v in abs_t],
            [exact_sum_by_exponent(v, n) for v in abs_u],
        )
        return BlockResult(None, block, stats)
    # chunk by chunk: τ_uni over the first task's block, the masks into
    # whole-block bool planes, the exact sums added (exactly) across chunks
    masks = [torch.empty(n, dtype=torch.bool, device=base.device) for _ in taus]
    abs_t = [ExactSum() for _ in taus]
    abs_uni = [ExactSum() for _ in taus]
    for a, b in chunks:
        eb = emr(sparsify(a, b))
        store(taus[0][a:b], eb.tau_uni)
        for k in range(len(taus)):
            masks[k][a:b] = eb.masks[k]
            abs_t[k] += eb.abs_t[k]
            abs_uni[k] += eb.abs_masked_uni[k]
    return BlockResult(None, EmrBlock(taus[0], masks, abs_t, abs_uni), stats)


def rescalers(abs_t: list[list[float]], abs_uni: list[list[float]]) -> list[float]:
    """λ_k = Σ_n mean|t_k,n| / Σ_n mean|M_k,n ⊙ τ_uni,n| over the merged tensors n
    (per-tensor means of exact sums, added with fsum), 1.0 where the denominator
    is 0: the rescalers from what every block's exact sums gave (SPEC section 5)."""
    out = []
    for a, b in zip(abs_t, abs_uni, strict=True):
        num, den = math.fsum(a), math.fsum(b)
        out.append(num / den if den > 0 else 1.0)
    return out


METHOD = Combiner(
    name="emr",
    summary="a unified task vector, 1-bit masks and exact rescalers per task (EMR-Merging)",
    # the K masks whole-block (bool) for the mask store, τ_uni in float32
    extra_bytes=lambda k: k + 4,
    merge_block=merge_block,
    cross_block=("rescalers",),
    report_fields=("mean_abs_t", "mean_abs_masked_uni"),
    uses_weights=False,
)
