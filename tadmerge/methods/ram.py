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


def moved(ts, epsilon: float) -> list:
    """Per task, float32 1.0 where its entry moved together with another task's
    (shared), then where it moved alone (unique): [shared_1..K, unique_1..K],
    whose sums are the counts."""
    import torch

    eps = torch.tensor(epsilon, dtype=torch.float32, device=ts[0].device)
    moved = [t.abs() > eps for t in ts]
    count = moved[0].to(torch.int32)
    for m in moved[1:]:
        count.add_(m)
    several, alone = count > 1, count == 1
    shared = [(m & several).to(torch.float32) for m in moved]
    return shared + [(m & alone).to(torch.float32) for m in moved]


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
