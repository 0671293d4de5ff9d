"""DELLA (MAGPRUNE): per row, each entry is kept with a probability that grows
linearly with the rank of its |τ| in the row, from density - epsilon to
density + epsilon; kept entries are scaled by 1/probability. 0-d and 1-D
tensors are one row (and are never split)."""

from __future__ import annotations

from ._common import DENSITY, rescale
from .registry import RANDOM, Param, Sparsifier


def block(tau, u, spec, row_len: int, backend: str = "torch"):
    """t and the kept count, for whole rows of `row_len` entries. The torch
    reference makes t as a new tensor; on a CPU with the C kernels (the merge's
    `backend`), one pass per row rewrites τ with the same bits."""
    import torch

    from ..engine import kernels
    from ..engine.keys import magnitude_keys

    m = row_len
    lo, c = spec.density - spec.epsilon, 2.0 * spec.epsilon
    # (the C pass ranks rows of int32 positions: below 2**31 entries)
    if m < 2**31 and kernels.enabled(tau, backend) and kernels.enabled(u, backend):
        inverse = spec.rescale == "inverse_keep"
        return tau, kernels.della_rows(tau, u, m, lo, c, spec.density, inverse)
    rows = magnitude_keys(tau).view(-1, m)
    order = torch.sort(rows, dim=1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(m, device=tau.device).expand_as(order))
    if m > 1:
        prob = lo + c * rank.double() / (m - 1)
    else:
        prob = torch.full(rank.shape, spec.density, dtype=torch.float64, device=tau.device)
    prob = prob.view(-1)
    keep = u.to(tau.device).double() < prob
    if spec.rescale == "inverse_keep":
        out = tau * (1.0 / prob.clamp_min(1e-300)).to(torch.float32)
    else:
        out = tau
    return torch.where(keep, out, torch.zeros((), device=tau.device)), int(keep.sum())


def _check(values, where: str) -> str | None:
    density, epsilon = values["density"], values["epsilon"]
    if density - epsilon <= 0 or density + epsilon > 1:
        return (
            f"{where}.epsilon: della needs 0 < density - epsilon and density + epsilon <= 1 "
            f"(density {density}, epsilon {epsilon})"
        )
    return None


METHOD = Sparsifier(
    name="della",
    summary="keep each entry with a probability rising with its |τ| rank in its row",
    family=RANDOM,
    params=(
        DENSITY,
        Param("epsilon", 0.1, "half-width of the keep probabilities' range", lo=0.0, hi=1.0),
        rescale("inverse_keep", ("none", "inverse_keep")),
    ),
    # per-row ranking: int64 indices and ranks, float64 probabilities
    extra_bytes=lambda k: 56,
    check=_check,
    block=block,
    whole_rows=True,
)
