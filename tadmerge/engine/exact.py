"""Exact, order-independent moments (Σ|x|, Σx²) of float32 values.

Every finite float32 |x| with magnitude key k (keys.py) is M · 2**(e − 150) with
e = max(k >> 23, 1) and an integer mantissa M < 2**24. Inside one coarse bucket
(the top 16 bits of k) the exponent and the top 8 bits of M are fixed, so
M = B·2**16 + L with B fixed per bucket and L the key's low 16 bits. Hence per
bucket:  Σ M = n·B·2**16 + Σ L  and  Σ M² = n·B²·2**32 + 2·B·2**16·Σ L + Σ L².
Counts, Σ L (< 2**16 each) and Σ L² (< 2**32 each) are integer histograms that
float64 bincount adds exactly (chunks of at most 2**20 values keep every partial
sum below 2**53), and they add across blocks like any histogram. Scaled by
2**149 (|x|) or 2**298 (x²) every total is an exact Python integer, rounded to
float64 once, which equals math.fsum of the float64 terms.

Why: TADrop's L2 rescale and EMR's rescalers change output bytes, and they must
be identical for any block split, worker count, order or device.

The histograms are numpy arrays (small: 32768 buckets), whatever made them: a
merge whose statistics all come from the C kernels (bf16 inputs on a CPU,
engine/raw.py) never imports torch. The torch path (float32 blocks, GPUs)
imports it where it runs and hands its bincounts over as numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np

from . import kernels
from .keys import COARSE_SHIFT, N_COARSE, KeyChunks, key_chunks, magnitude_keys, numel

if TYPE_CHECKING:
    import torch

ABS_SCALE_BITS = 149
SQ_SCALE_BITS = 298
CHUNK = 1 << 20  # values per bincount call: exactness bound and temporaries (~40 MB)
BUCKETS_PER_EXP = 1 << 7
_LO32 = (1 << 32) - 1

# per bucket: the fixed top bits B of the mantissa and the effective exponent
_b = np.arange(N_COARSE, dtype=np.int64)
_EXP = _b >> 7
BUCKET_HIGH = ((_EXP > 0).astype(np.int64) << 7) | (_b & 0x7F)
BUCKET_EXP = np.maximum(_EXP, 1)


@dataclass
class CoarseStats:
    """Per coarse bucket: count, Σ L and Σ L² (carried as hi·2**32 + lo). Adds exactly."""

    counts: np.ndarray  # int64 [N_COARSE]
    s1: np.ndarray  # int64: Σ L
    s2_hi: np.ndarray  # int64: Σ L² = s2_hi·2**32 + s2_lo
    s2_lo: np.ndarray  # int64, < 2**32 once normalised

    @classmethod
    def zeros(cls) -> CoarseStats:
        return cls(*(np.zeros(N_COARSE, dtype=np.int64) for _ in range(4)))

    def __add__(self, other: CoarseStats) -> CoarseStats:
        lo = self.s2_lo + other.s2_lo
        return CoarseStats(
            self.counts + other.counts,
            self.s1 + other.s1,
            self.s2_hi + other.s2_hi + (lo >> 32),
            lo & _LO32,
        )

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    @property
    def nonfinite(self) -> int:
        """Values with an all-ones exponent (Inf or NaN)."""
        return int(self.counts[0x7F80:].sum())

    def bucket_moment(self, b: int, moment: int) -> int:
        """Exact scaled Σ|x| (moment 1) or Σx² (moment 2) of bucket b."""
        n = int(self.counts[b])
        if n == 0:
            return 0
        hi, e = int(BUCKET_HIGH[b]), int(BUCKET_EXP[b])
        s1 = int(self.s1[b])
        if moment == 1:
            return ((n * hi << 16) + s1) << (e - 1)
        s2 = (int(self.s2_hi[b]) << 32) + int(self.s2_lo[b])
        return ((n * hi * hi << 32) + (hi * s1 << 17) + s2) << (2 * e - 2)

    def range_moment(self, b0: int, b1: int, moment: int) -> int:
        """Exact scaled moment of buckets [b0, b1), which share one exponent.

        The per-bucket terms of bucket_moment added in int64 first (they fit while
        the range holds fewer than 2**28 values), then shifted once: a few tensor
        sums instead of a Python loop over up to 128 buckets.
        """
        c = self.counts[b0:b1]
        if int(c.sum()) >= 1 << 28:
            return sum(self.bucket_moment(b, moment) for b in range(b0, b1))
        hi, e = BUCKET_HIGH[b0:b1], int(BUCKET_EXP[b0])
        s1 = self.s1[b0:b1]
        if moment == 1:
            return ((int((c * hi).sum()) << 16) + int(s1.sum())) << (e - 1)
        t1 = int((c * hi * hi).sum())
        t2 = int((hi * s1).sum())
        t3 = (int(self.s2_hi[b0:b1].sum()) << 32) + int(self.s2_lo[b0:b1].sum())
        return ((t1 << 32) + (t2 << 17) + t3) << (2 * e - 2)

    def exponent_moments(self, moment: int) -> list[int]:
        """Exact scaled moment per exponent (256 entries)."""
        out = [0] * (N_COARSE // BUCKETS_PER_EXP)
        if self.n < (1 << 28):  # every per-exponent sum fits int64: vectorise
            # over the exponents that hold values only (a task vector's span a few
            # dozen of the 256): a block's fixed cost, paid per tensor and task
            rows = self.counts.reshape(-1, BUCKETS_PER_EXP)
            live = np.flatnonzero(rows.sum(1))
            c = rows[live]
            hi = BUCKET_HIGH.reshape(-1, BUCKETS_PER_EXP)[live]
            s1 = self.s1.reshape(-1, BUCKETS_PER_EXP)[live]
            exps = live.tolist()
            if moment == 1:
                per = ((c * hi << 16) + s1).sum(1).tolist()
                for e, x in zip(exps, per, strict=True):
                    out[e] = x << (max(e, 1) - 1)
                return out
            s2_hi = self.s2_hi.reshape(-1, BUCKETS_PER_EXP)[live]
            s2_lo = self.s2_lo.reshape(-1, BUCKETS_PER_EXP)[live]
            t1 = (c * hi * hi).sum(1).tolist()
            t2 = (hi * s1).sum(1).tolist()
            t3 = ((s2_hi << 32) + s2_lo).sum(1).tolist()
            for e, a, b, d in zip(exps, t1, t2, t3, strict=True):
                out[e] = ((a << 32) + (b << 17) + d) << (2 * max(e, 1) - 2)
            return out
        for b in np.flatnonzero(self.counts).tolist():
            out[b // BUCKETS_PER_EXP] += self.bucket_moment(b, moment)
        return out

    def total(self, moment: int) -> int:
        return sum(self.exponent_moments(moment))


def sparse_keys(keys: torch.Tensor | KeyChunks) -> tuple[np.ndarray, np.ndarray] | None:
    """(counts per coarse bucket, the keys whose low 16 bits are not all zero)
    when those keys are few (kernels.coarse_sparse: bf16 task vectors), else
    None. Asked once per KeyChunks, which keeps the answer for the block's later
    histograms. The caller checks that the kernels take the block."""
    if isinstance(keys, KeyChunks) and keys.sparse is not None:
        return keys.sparse or None  # type: ignore[return-value]
    result = kernels.coarse_sparse(keys.x if isinstance(keys, KeyChunks) else keys)
    if isinstance(keys, KeyChunks):
        keys.sparse = result if result is not None else False
    return result


def coarse_stats(
    keys: torch.Tensor | KeyChunks, *, moments: int = 2, backend: str = "auto"
) -> CoarseStats:
    """Coarse histogram of magnitude keys; moments: 0 counts only, 1 adds Σ L, 2 adds Σ L².

    `keys`: a key tensor, or KeyChunks (keys made chunk by chunk; chunks must stay
    at most CHUNK long, which keeps every float64 partial sum exact). On the CPU
    with the C kernels, one fused pass over the values instead (kernels.py): the
    same integers. `backend`: the merge's kernels backend (kernels.enabled),
    handed down from its dispatch; auto outside a merge.
    """
    if isinstance(keys, KeyChunks) and keys.x is None:  # SparseKeys: counts only
        on_cpu = numel(keys) > 0 and kernels.enabled(None, backend)
    else:
        source = keys.x if isinstance(keys, KeyChunks) else keys
        on_cpu = source.numel() > 0 and kernels.enabled(source, backend)
    if on_cpu:
        sparse = sparse_keys(keys)
        if sparse is not None:  # the moments are those of the keys set aside
            counts, side = sparse
            if not (moments and side.size):
                zero = np.zeros(N_COARSE, dtype=np.int64)
                return CoarseStats(counts, zero, zero.copy(), zero.copy())
            s1, s2 = _side_moments(side, moments)
            return CoarseStats(counts, s1, s2 >> 32, s2 & _LO32)
        out = CoarseStats.zeros()
        for counts, s1, s2 in kernels.coarse_pieces(source, moments):
            out = out + CoarseStats(counts, s1, s2 >> 32, s2 & _LO32)
        return out
    return _coarse_stats_torch(keys, moments)


def _coarse_stats_torch(keys: torch.Tensor | KeyChunks, moments: int) -> CoarseStats:
    """coarse_stats by torch ops, on the keys' device (GPUs, or no kernels)."""
    import torch

    acc = None
    for chunk in key_chunks(keys):
        if acc is None:
            acc = [torch.zeros(N_COARSE, dtype=torch.int64, device=chunk.device) for _ in range(3)]
        b = chunk >> COARSE_SHIFT  # int32 indices: bincount takes them as they are
        acc[0] += torch.bincount(b, minlength=N_COARSE)
        if moments >= 1:
            low = (chunk & 0xFFFF).to(torch.float64)
            acc[1] += torch.bincount(b, weights=low, minlength=N_COARSE).to(torch.int64)
            if moments >= 2:
                low.mul_(low)
                acc[2] += torch.bincount(b, weights=low, minlength=N_COARSE).to(torch.int64)
    if acc is None:
        return CoarseStats.zeros()
    counts, s1, s2 = (a.cpu().numpy() for a in acc)
    return CoarseStats(counts, s1, s2 >> 32, s2 & _LO32)


# The keys set aside go to float64 bincounts this many at a time: every partial
# sum of L² < 2**32 stays below 2**53, so the counts are exact integers.
SMALL_SIDE = 1 << 21


def _side_moments(side, moments: int):
    """Σ L and Σ L² per coarse bucket of the few keys set aside (int64 arrays):
    bincounts over them, SMALL_SIDE keys at a time (each an exact float64 sum),
    not a kernel pass with its 1.5 MB of tables to clear and add (the fixed cost
    that mattered, once per block and task). numpy only: the raw bf16 path that
    sets keys aside needs no kernel of float32 blocks."""
    s1 = np.zeros(N_COARSE, np.int64)
    s2 = np.zeros(N_COARSE, np.int64)
    for a in range(0, side.size, SMALL_SIDE):
        part = side[a : a + SMALL_SIDE]
        buckets = part >> COARSE_SHIFT
        # binned over the buckets the keys span (a task vector's few dozen
        # exponents), not all 32768: the tables' allocation and conversion were
        # most of the cost
        b0, b1 = int(buckets.min()), int(buckets.max()) + 1
        buckets -= b0
        low = (part & 0xFFFF).astype(np.float64)
        s1[b0:b1] += np.bincount(buckets, weights=low, minlength=b1 - b0).astype(np.int64)
        if moments >= 2:
            low *= low
            s2[b0:b1] += np.bincount(buckets, weights=low, minlength=b1 - b0).astype(np.int64)
    return s1, s2


@dataclass
class ExactSum:
    """Σ|x| of a set of float32 values, as an exact scaled integer."""

    abs_scaled: int = 0  # Σ|x| · 2**149
    count: int = 0

    def __add__(self, other: ExactSum) -> ExactSum:
        return ExactSum(self.abs_scaled + other.abs_scaled, self.count + other.count)

    @property
    def abs_sum(self) -> float:
        return float(Fraction(self.abs_scaled, 1 << ABS_SCALE_BITS))

    def to_json(self) -> list:
        return [str(self.abs_scaled), "0", self.count]  # ("0": the resume log's old Σx²)

    @classmethod
    def from_json(cls, v: list) -> ExactSum:
        return cls(int(v[0]), int(v[2]))


ABS_CHUNK = 1 << 28  # values per exponent bincount: each mantissa < 2**24, sums < 2**52


def exact_sum_by_exponent(per_exponent, count: int) -> ExactSum:
    """Σ|x| from the sums of the 24-bit mantissas of |x| per exponent e (256):
    |x| = M·2**(e−150) (e >= 1), so the sum scaled by 2**149 is Σ_e S_e·2**(e−1)."""
    total = sum(int(v) << (max(e, 1) - 1) for e, v in enumerate(per_exponent) if v)
    return ExactSum(total, count)


def exact_abs_sum(x: torch.Tensor) -> ExactSum:
    """Exact Σ|x| of a float32 tensor, by exponent: |x| = M·2**(e−150), so the
    mantissas of each exponent add exactly (float64 holds sums below 2**53), and
    Σ M·2**(e−1) is |x|'s sum scaled by 2**149. One 256-bin bincount per chunk,
    where the per-bucket moments of coarse_stats take two of 32768 bins."""
    import torch

    if x.numel() == 0:
        return ExactSum()
    total = 0
    for chunk in x.reshape(-1).split(ABS_CHUNK):
        keys = magnitude_keys(chunk)
        e = keys >> 23
        m = (keys & 0x7FFFFF) | ((e > 0).to(torch.int32) << 23)
        per = torch.bincount(e, weights=m.to(torch.float64), minlength=256).cpu().tolist()
        total += exact_sum_by_exponent(per, 0).abs_scaled
    return ExactSum(total, x.numel())
