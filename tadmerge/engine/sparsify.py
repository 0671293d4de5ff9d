"""The sparsifiers Φ applied to each task vector tensor (SPEC sections 3 and 4).

Magnitude-based methods (tadrop, magnitude, breadcrumbs) all keep the positions
[lo, hi) of one total order: |τ| ascending, ties broken by flat index (lowest
index first). They differ only in how lo and hi are chosen. Their group-wide
statistics are resolved by `resolve_selection`, a generator that yields the
coarse buckets whose fine histograms it still needs. (Resolving is selection.py's, torch-free; this
module applies the resolved selections to tensors.)
DARE (random) and DELLA need no group statistics: their randomness comes from
streams keyed by (seed, task, tensor, canonical row block), so the result does
not depend on how the work is split.
"""

from __future__ import annotations

import hashlib

import torch

from .selection import (  # noqa: F401  (re-exported)
    PREDICTED_BUCKETS,
    Selection,
    resolve_selection,
    run_locally,
    tadrop_rate,
)
from .spec import (  # noqa: F401  (re-exported: the engine's names for them)
    ALL_METHODS,
    DEFAULT_RESCALE,
    MAGNITUDE_METHODS,
    RANDOM_METHODS,
    SparsifySpec,
)

# ---------------------------------------------------------------------------------
# Applying a resolved selection to one block
# ---------------------------------------------------------------------------------


def below_bits(keys: torch.Tensor, key: int, tie_end: int) -> torch.Tensor:
    """int32 mask of entries below a cut: -1 (all bits) below, 0 elsewhere.

    Below the cut are the keys < `key`, and the ties (keys == `key`) at flat
    positions < `tie_end` (see `ties_below`). Integer arithmetic instead of
    bool masks: (k - key) >> 31 is -1 exactly where k < key (keys and cut keys are
    in [0, 2**31), so the difference cannot overflow), and comparing the first
    `tie_end` entries with key + 1 instead takes their ties in without listing
    them. The mask is applied to float bits with one bitwise and; all of it
    vectorises, where masked_fill_ and bool sums do not.
    """
    if key < 0:
        return torch.full_like(keys, -1)
    mask = torch.sub(keys, key)
    if tie_end > 0:
        mask[:tie_end].sub_(1)
    return mask.bitwise_right_shift_(31)


def ties_below(keys: torch.Tensor, key: int, quota: int) -> tuple[int, int]:
    """Where a cut's ties end in one chunk, taken in flat order: (tie_end, quota left).

    `quota` is how many of the block's ties at `key` (entries equal to it) are
    below the cut and not yet met in earlier chunks. The first `quota` ties of
    this chunk are below: tie_end is one past the last of them (the chunk's
    length when it holds no more than `quota`), and the rest of the quota is for
    the chunks after it. Run in the apply pass on the chunk's keys while they
    are in cache, instead of a pass of its own over the block.
    """
    if quota <= 0 or key < 0:
        return 0, 0
    eq = keys == key
    here = int(torch.count_nonzero(eq))
    if here <= quota:
        return (keys.numel() if here else 0), quota - here
    return int(eq.nonzero()[quota - 1, 0]) + 1, 0


def apply_cuts(
    tau: torch.Tensor,
    keys: torch.Tensor,
    lo: tuple[int, int],
    hi: tuple[int, int],
    scale: float,
) -> tuple[torch.Tensor, int]:
    """t = τ̂ · fl32(scale), τ̂ = τ on ranks [lo, hi), in place on `tau`.

    lo/hi are (cut key, tie_end): the block's ties at a cut key that lie below
    the cut are those before tie_end (ties_below). Dropped entries become
    +0.0: their bits are cleared after the scaling, as in the definition (kept
    entries times fl32(scale), then the mask).
    """
    keep = below_bits(keys, *lo).bitwise_not_()
    if hi[0] >= 0:  # otherwise the hi cut is the end of the order
        keep.bitwise_and_(below_bits(keys, *hi))
    if scale != 1.0:
        tau.mul_(torch.tensor(scale, dtype=torch.float32, device=tau.device))
    tau.view(torch.int32).bitwise_and_(keep)
    return tau, int(torch.count_nonzero(keep))


# ---------------------------------------------------------------------------------
# Random streams (DARE, DELLA: methods/): reproducible independent of the split
# ---------------------------------------------------------------------------------


def stream_seed(seed: int, task: int, tensor: str, block_start: int) -> int:
    """seed = hash(run seed, task index, tensor name, row block start)."""
    h = hashlib.blake2b(f"{seed}\0{task}\0{tensor}\0{block_start}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def uniform_stream(
    seed: int, task: int, tensor: str, row_start: int, row_end: int, rng_rows: int, row_numel: int
) -> torch.Tensor:
    """Uniform [0,1) float32 draws for rows [row_start, row_end), made on the CPU.

    Rows are grouped in canonical blocks of `rng_rows` rows (a function of the
    tensor's shape only); each block has its own generator, so any split of the
    tensor along canonical block boundaries sees the same numbers.
    """
    parts = []
    start = row_start
    while start < row_end:
        block = (start // rng_rows) * rng_rows
        block_end = block + rng_rows
        g = torch.Generator().manual_seed(stream_seed(seed, task, tensor, block))
        draws = torch.rand((block_end - block) * row_numel, generator=g)
        lo = (start - block) * row_numel
        hi = (min(row_end, block_end) - block) * row_numel
        parts.append(draws[lo:hi])
        start = min(row_end, block_end)
    return torch.cat(parts) if parts else torch.empty(0)
