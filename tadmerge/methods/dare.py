"""DARE (drop and rescale): drop each entry of τ with probability p, scale the
kept ones by 1/(1-p). The draws come from a counter-based stream keyed by (seed,
task, tensor, canonical row block) and the entry's index (engine/sparsify.py),
made chunk by chunk on the block's device, so the result depends neither on how
the work is split nor on the device."""

from __future__ import annotations

from ._common import rescale
from .registry import RANDOM, Param, Sparsifier


def block(tau, u, spec, row_len: int):
    """t in place on `tau` (any slice: DARE is element-wise), and the kept count;
    `u`: the slice's draws, on its device. Kept entries times fl32(1/(1-p)),
    dropped ones +0.0."""
    import torch

    drop = u.to(tau.device) < spec.p
    if spec.rescale == "inverse_keep":
        tau.mul_(torch.tensor(1.0 / (1.0 - spec.p), dtype=torch.float32, device=tau.device))
    tau.masked_fill_(drop, 0.0)
    return tau, tau.numel() - int(torch.count_nonzero(drop))


METHOD = Sparsifier(
    name="random",
    summary="DARE: drop each entry with probability p, scale the kept by 1/(1-p)",
    family=RANDOM,
    params=(
        Param("p", 0.9, "drop probability", lo=0.0, hi=1.0, hi_open=True),
        rescale("inverse_keep", ("none", "inverse_keep")),
    ),
    # (the draws are made chunk by chunk now: this over-counts, kept as the plan's
    # unit sizes were)
    extra_bytes=lambda k: 4 * k + 4,
    block=block,
)
