"""RAM, Reinforced Agent Merging (mergekit's `ram`, arXiv 2601.13572): an entry
counts for task k when |t_k| > epsilon; entries moved by one task take its
value, entries moved by c > 1 tasks the mean of theirs: θ = θ0 + Σ_k [|t_k| >
ε] · t_k / max(c, 1). Element-wise (the weights are not used, as in mergekit)."""

from __future__ import annotations

from .registry import Combiner, Param

EPSILON = Param("epsilon", 1e-5, "an entry counts for a task when its |t_k| exceeds this", lo=0.0)


def ram_delta(ts, epsilon: float, lambdas=None):
    """Σ_k [|t_k| > ε] · (c == 1 ? t_k·fl32(λ_k) : t_k / c), c = max(Σ_k [|t_k| > ε], 1),
    summed in task order in float32 (λ_k = 1: RAM; RAMPlus scales the unique
    entries). Consumes `ts` (the result is written over ts[0])."""
    import torch

    f = torch.float32
    eps = torch.tensor(epsilon, dtype=f, device=ts[0].device)
    moved = [t.abs() > eps for t in ts]
    count = moved[0].to(f)
    for m in moved[1:]:
        count.add_(m)
    unique = count == 1
    count.clamp_min_(1.0)
    acc = None
    for k, (t, m) in enumerate(zip(ts, moved, strict=True)):
        part = t / count
        if lambdas is not None and lambdas[k] != 1.0:
            part = torch.where(unique, t * torch.tensor(lambdas[k], dtype=f, device=t.device), part)
        part = torch.where(m, part, 0.0)
        acc = part if acc is None else acc.add_(part)
    return ts[0].copy_(acc)


COUNT_CHUNK = 1 << 17  # entries per step of the reference's counts (bounded temporaries)


def moved_counts(ts, epsilon: float, backend: str):
    """Per task, its entries that moved (|t_k| > ε) together with another task's
    (shared), then alone (unique): int64 [shared_1..K, unique_1..K] of the
    block; on a CPU with the C kernels (the merge's `backend`), one pass."""
    import numpy as np
    import torch

    from ..engine import kernels

    if kernels.enabled(ts[0], backend):
        return kernels.ram_counts(ts, epsilon)
    eps = torch.tensor(epsilon, dtype=torch.float32, device=ts[0].device)
    out = np.zeros(2 * len(ts), np.int64)
    for a in range(0, ts[0].numel(), COUNT_CHUNK):
        moved = [t[a : a + COUNT_CHUNK].abs() > eps for t in ts]
        count = sum(m.to(torch.int32) for m in moved)
        several, alone = count > 1, count == 1
        out += [int((m & several).sum()) for m in moved] + [int((m & alone).sum()) for m in moved]
    return out


def ram_merge(base, ts, epsilon: float, backend: str, lambdas=None):
    """θ0 + ram_delta over a chunk, written over ts[0]: the torch reference, or on
    a CPU with the C kernels (the merge's `backend`) one pass with the same bits."""
    from ..engine import kernels

    if kernels.enabled(base, backend):
        return kernels.ram_merge(ts, base, epsilon, lambdas)
    return ram_delta(ts, epsilon, lambdas).add_(base)


def merge_block(base, taus, plans, spec, ctx, sparsify, chunks, check_finite):
    from ..engine.block import combine_chunks

    eps = spec.param("epsilon")
    return combine_chunks(
        base, taus, plans, sparsify, chunks, lambda b, ts: ram_merge(b, ts, eps, ctx.backend)
    )


METHOD = Combiner(
    name="ram",
    summary="entries moved (|t_k| > epsilon) by one task take its t_k, by several the mean "
    "of theirs (mergekit's ram)",
    params=(EPSILON,),
    merge_block=merge_block,
    uses_weights=False,
)
