"""Exact order statistics of a signed float32 score (a combiner's derived score
that may be negative: arcee_fusion's importance, engine/spec.py ScoreRequest
`signed`).

The magnitude keys (keys.py) order |x| on 31 bits; a signed order needs all 32:
the order key of x is 2**31 + key(|x|) for x >= 0 and 2**31 - 1 - key(|x|) for
x < 0, an unsigned integer that is monotonic in x (-0.0 and +0.0 share a key,
as they compare equal). Its histograms are the same mergeable counts as the
magnitude ones (a coarse level over the top 16 bits, fine levels over the low
16), so RankIndex answers exact rank queries from them for any split; only the
key's decoding differs (SignedRankIndex). Torch ops, chunk by chunk: the keys
never exist for a whole block; on a CPU with the C kernels (the merge's
`backend`), one pass each with the same counts (kernels.signed_coarse,
signed_fine).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from . import kernels
from .exact import CoarseStats
from .histogram import RankIndex, SparseFine
from .keys import COARSE_SHIFT, N_FINE, key_to_float

if TYPE_CHECKING:
    import torch

N_SIGNED_COARSE = 1 << 16  # top 16 bits of the 32-bit order key
SIGN = 1 << 31
CHUNK = 1 << 18  # values turned into keys at a time


def signed_keys(x: torch.Tensor) -> torch.Tensor:
    """int64 order keys in [0, 2**32) of a contiguous float32 tensor (flattened)."""
    import torch

    if x.dtype != torch.float32:
        raise TypeError(f"signed_keys needs float32, got {x.dtype}")
    bits = x.contiguous().view(-1).view(torch.int32).to(torch.int64)
    mag = bits & 0x7FFFFFFF
    negative = (bits < 0) & (mag != 0)
    return torch.where(negative, (SIGN - 1) - mag, mag + SIGN)


def _chunks(x: torch.Tensor):
    flat = x.reshape(-1)
    for a in range(0, flat.numel(), CHUNK):
        yield signed_keys(flat[a : a + CHUNK])


def signed_coarse(x: torch.Tensor, backend: str = "auto") -> CoarseStats:
    """The coarse histogram (counts only) of x's order keys: N_SIGNED_COARSE buckets."""
    import torch

    zero = np.zeros(N_SIGNED_COARSE, dtype=np.int64)
    if x.numel() and kernels.enabled(x, backend):
        return CoarseStats(kernels.signed_coarse(x), zero, zero.copy(), zero.copy())
    counts = torch.zeros(N_SIGNED_COARSE, dtype=torch.int64, device=x.device)
    for keys in _chunks(x):
        counts += torch.bincount(keys >> COARSE_SHIFT, minlength=N_SIGNED_COARSE)
    return CoarseStats(counts.cpu().numpy(), zero, zero.copy(), zero.copy())


def signed_fine(
    x: torch.Tensor, buckets: list[int], backend: str = "auto"
) -> dict[int, SparseFine]:
    """Sparse fine histograms of the given coarse buckets of x's order keys."""
    import torch

    if x.numel() and buckets and kernels.enabled(x, backend):
        rows = dict(zip(buckets, kernels.signed_fine(x, buckets), strict=True))
    else:
        rows = {b: torch.zeros(N_FINE, dtype=torch.int64, device=x.device) for b in buckets}
        for keys in _chunks(x):
            coarse = keys >> COARSE_SHIFT
            for b, row in rows.items():
                row += torch.bincount(keys[coarse == b] & 0xFFFF, minlength=N_FINE)
        rows = {b: row.cpu().numpy() for b, row in rows.items()}
    out = {}
    for b, r in rows.items():
        nz = np.flatnonzero(r)
        out[b] = SparseFine(nz, r[nz])
    return out


class SignedRankIndex(RankIndex):
    """RankIndex over order keys: the same exact rank queries, signed values."""

    def value_at(self, rank: int) -> float:
        """The float32 value the order key stands for, as a Python float (exact)."""
        key = self.key_at(rank)
        return key_to_float(key - SIGN) if key >= SIGN else -key_to_float(SIGN - 1 - key)
