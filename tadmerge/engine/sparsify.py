"""The sparsifiers Φ applied to each task vector tensor (SPEC sections 3 and 4).

Magnitude-based methods (tadrop, magnitude, breadcrumbs) all keep the positions
[lo, hi) of one total order: |τ| ascending, ties broken by flat index (lowest
index first). They differ only in how lo and hi are chosen. Their group-wide
statistics are resolved by `resolve_selection`, a generator that yields the
coarse buckets whose fine histograms it still needs. (Resolving is selection.py's, torch-free; this
module applies the resolved selections to tensors.)
DARE (random) and DELLA need no group statistics: their randomness comes from
counter-based streams keyed by (seed, task, tensor, canonical row block) and
each entry's index, integer ops made on the block's device, so the result
depends neither on how the work is split nor on the device.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from . import kernels

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


@dataclass
class BlockCuts:
    """A resolved selection as one block applies it, chunk by chunk in flat order:
    the two cut keys, how many of the block's ties at each are below the cut and
    not yet met (ties_below), and the scale of kept entries."""

    lo_key: int
    lo_left: int
    hi_key: int
    hi_left: int
    scale: float = 1.0

    def keep(self, keys: torch.Tensor) -> torch.Tensor:
        """int32 mask of the next chunk's kept entries (-1 kept, 0 dropped), from
        its magnitude keys: ranks [lo, hi). The tie quotas run down."""
        lo_end, self.lo_left = ties_below(keys, self.lo_key, self.lo_left)
        hi_end, self.hi_left = ties_below(keys, self.hi_key, self.hi_left)
        keep = below_bits(keys, self.lo_key, lo_end).bitwise_not_()
        if self.hi_key >= 0:  # otherwise the hi cut is the end of the order
            keep.bitwise_and_(below_bits(keys, self.hi_key, hi_end))
        return keep


def apply_keep(tau: torch.Tensor, keep: torch.Tensor, scale: float) -> tuple[torch.Tensor, int]:
    """t = τ̂ · fl32(scale) in place on `tau`, τ̂ = τ where `keep` (BlockCuts.keep).

    Dropped entries become +0.0: their bits are cleared after the scaling, as in
    the definition (kept entries times fl32(scale), then the mask).
    """
    if scale != 1.0:
        tau.mul_(torch.tensor(scale, dtype=torch.float32, device=tau.device))
    tau.view(torch.int32).bitwise_and_(keep)
    return tau, int(torch.count_nonzero(keep))


# ---------------------------------------------------------------------------------
# Random streams (DARE, DELLA: methods/): reproducible independent of the split
# ---------------------------------------------------------------------------------


def stream_seed(seed: int, task: int, tensor: str, block_start: int) -> int:
    """The key of a canonical row block's stream: the first 8 bytes (little-endian)
    of blake2b-64 of "seed\0task\0tensor\0block_start", top bit cleared."""
    h = hashlib.blake2b(f"{seed}\0{task}\0{tensor}\0{block_start}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


# The draws are a counter-based hash of (key, element index), in 32-bit lanes:
# fmix32 is MurmurHash3's finalizer, its products taken mod 2**32. torch has no
# unsigned 32-bit arithmetic on every device, so the lanes live in int64 and
# every product is of a value in [0, 2**32) and a multiplier's representative
# in (-2**31, 2**31) (the same residue mod 2**32): |product| < 2**63, never an
# overflow, and `& MASK32` (two's complement, as on every device) is the residue.
MASK32 = 0xFFFFFFFF
FMIX_M1, FMIX_M2 = 0x85EBCA6B, 0xC2B2AE35
_M1, _M2 = FMIX_M1 - (1 << 32), FMIX_M2 - (1 << 32)  # the signed representatives
GOLDEN32 = 0x9E3779B9
# elements hashed at a time by torch ops on a CPU: the int64 lanes stay in cache
# between ops; on a GPU, pieces whose two int64 lanes stay a fixed overhead
DRAW_CHUNK = 1 << 16
GPU_DRAW_CHUNK = 1 << 22


def fmix32(x: int) -> int:
    """MurmurHash3's 32-bit finalizer, of a Python int in [0, 2**32)."""
    x ^= x >> 16
    x = (x * FMIX_M1) & MASK32
    x ^= x >> 13
    x = (x * FMIX_M2) & MASK32
    return x ^ (x >> 16)


def lane_keys(key: int, hi: int) -> tuple[int, int]:
    """(c1, c2): the per-element hash's two 32-bit keys for the stream `key` (a
    block's stream_seed) and the high 32 bits `hi` of the element index."""
    c1 = fmix32((key & MASK32) ^ fmix32((key >> 32) ^ hi))
    return c1, fmix32(c1 ^ GOLDEN32)


def _fmix32_(x: torch.Tensor, tmp: torch.Tensor) -> None:
    """fmix32 in place on int64 lanes in [0, 2**32) (tmp: a scratch tensor like x)."""
    x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=tmp))
    x.mul_(_M1).bitwise_and_(MASK32)
    x.bitwise_xor_(torch.bitwise_right_shift(x, 13, out=tmp))
    x.mul_(_M2).bitwise_and_(MASK32)
    x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=tmp))


def _hash_into(out: torch.Tensor, lo: int, c1: int, c2: int) -> None:
    """out[j] = u(lo + j) for the 32-bit lane keys c1, c2 (lo + len(out) <= 2**32):
    h = fmix32(fmix32(i ^ c1) + c2 mod 2**32), u = (h >> 8) / 2**24."""
    n = out.numel()
    x = torch.arange(lo, lo + n, dtype=torch.int64, device=out.device)
    tmp = torch.empty_like(x)
    x.bitwise_xor_(c1)
    _fmix32_(x, tmp)
    x.add_(c2).bitwise_and_(MASK32)
    _fmix32_(x, tmp)
    x.bitwise_right_shift_(8)
    torch.mul(x, 2.0**-24, out=out)  # (an integer below 2**24 times 2**-24: exact in float32)


def block_draws(key: int, start: int, out: torch.Tensor, backend: str = "auto") -> None:
    """The draws of elements [start, start + len(out)) of the canonical block
    whose stream key is `key`, into the contiguous float32 tensor `out`, on its
    device: with the C kernel where `backend` takes it (kernels.enabled), else
    by torch ops; the same bits."""
    native = kernels.enabled(out, backend)
    step = out.numel() if native else DRAW_CHUNK if out.device.type == "cpu" else GPU_DRAW_CHUNK
    a, n = 0, out.numel()
    while a < n:
        i = start + a
        hi, lo = i >> 32, i & MASK32
        b = min(n, a + max(1, step), a + (1 << 32) - lo)  # (never across a 2**32 boundary)
        if native:
            kernels.uniform_draws(out[a:b], lo, *lane_keys(key, hi))
        else:
            _hash_into(out[a:b], lo, *lane_keys(key, hi))
        a = b


def uniform_stream(
    seed: int,
    task: int,
    tensor: str,
    row_start: int,
    row_end: int,
    rng_rows: int,
    row_numel: int,
    device: torch.device | str = "cpu",
    backend: str = "auto",
) -> torch.Tensor:
    """Uniform [0,1) float32 draws for rows [row_start, row_end), made on `device`.

    Rows are grouped in canonical blocks of `rng_rows` rows (a function of the
    tensor's shape only); each block has its own key (stream_seed), and an
    element's draw is a hash of that key and the element's flat index within
    the block (docs/semantics.md gives it exactly): any split of the tensor, any
    device, any chunking sees the same numbers, with no generator state.
    `backend`: the merge's kernels backend (the C twin on a CPU, block_draws).
    """
    n = (row_end - row_start) * row_numel
    out = torch.empty(n, dtype=torch.float32, device=device)
    uniform_into(out, seed, task, tensor, row_start * row_numel, rng_rows, row_numel, backend)
    return out


def uniform_into(
    out: torch.Tensor,
    seed: int,
    task: int,
    tensor: str,
    first: int,
    rng_rows: int,
    row_numel: int,
    backend: str = "auto",
) -> None:
    """The draws of the tensor's flat elements [first, first + len(out)) into
    `out` (float32, on its device): uniform_stream's numbers for any range, so
    that a block's draws can be made chunk by chunk as they are used."""
    block_numel = rng_rows * row_numel
    pos, end = first, first + out.numel()
    while pos < end:
        block = pos // block_numel
        stop = min(end, (block + 1) * block_numel)
        key = stream_seed(seed, task, tensor, block * rng_rows)
        block_draws(key, pos - block * block_numel, out[pos - first : stop - first], backend)
        pos = stop
