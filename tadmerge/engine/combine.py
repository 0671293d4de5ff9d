"""The weighted sums that several combiners share (SPEC section 5): task
arithmetic, averaging and linear; each method's own math is in its module
(methods/).

Every formula is evaluated in float32 in a fixed order (task 1..K, products
before sums, scalars cast to float32 once), so the result is the same bits on
any device and for any block split; the order is documented in docs/semantics.md
and mirrored by the reference implementation in the tests.
"""

from __future__ import annotations

import torch


def f32(v: float, like: torch.Tensor) -> torch.Tensor:
    """fl32(v) on `like`'s device: a scalar of a float32 formula, cast once."""
    return torch.tensor(v, dtype=torch.float32, device=like.device)


def scale_(t: torch.Tensor, w: float) -> torch.Tensor:
    """t ·= fl32(w) in place (x·1 = x exactly, so w = 1 costs nothing)."""
    return t if w == 1.0 else t.mul_(f32(w, t))


def weighted_sum(ts: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Σ_k fl32(w_k)·t_k, accumulated in task order. Consumes `ts` (in place)."""
    acc = scale_(ts[0], weights[0])
    for t, w in zip(ts[1:], weights[1:], strict=True):
        acc.add_(scale_(t, w))
    return acc


def average(thetas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """θ = Σ w_k θ_k / Σ w_k (Σ w_k in float64, cast once). Consumes `thetas`."""
    return weighted_sum(thetas, weights).div_(f32(sum(weights), thetas[0]))


def average_of_deltas(base: torch.Tensor, ts: list[torch.Tensor], weights: list[float]):
    """With a sparsifier, averaging acts on task vectors: θ0 + Σ w_k t_k / Σ w_k."""
    return weighted_sum(ts, weights).div_(f32(sum(weights), base)).add_(base)


def task_arithmetic(base: torch.Tensor, ts: list[torch.Tensor], weights: list[float], scale):
    """θ = θ0 + λ Σ w_k t_k. Consumes `ts`."""
    return weighted_sum(ts, weights).mul_(f32(scale, base)).add_(base)
