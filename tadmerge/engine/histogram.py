"""Exact order statistics from mergeable histograms of magnitude keys.

Selection is done in two levels on the 31-bit key of |x| (keys.py): a coarse
histogram over the top 15 bits (32768 buckets) and, only for the few buckets
that hold a wanted rank, a fine histogram over the low 16 bits. Both are plain
counts, so histograms of row blocks add up to the histogram of the tensor, and
the value at any rank is found exactly: no sort, no sampling, no 2**24 limit.
The coarse level also carries exact integer sums of squares per bucket (see
exact.py), which gives the exact L2 norm of any rank range (what TADrop's
rescale needs) without another pass over the data.

Histograms are numpy arrays wherever they come from (see exact.py): the torch
path below imports torch where it runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from . import kernels
from .exact import BUCKETS_PER_EXP, SQ_SCALE_BITS, CoarseStats, sparse_keys
from .keys import (
    COARSE_SHIFT,
    N_COARSE,
    N_FINE,
    KeyChunks,
    key_abs_scaled,
    key_chunks,
    key_square_scaled,
    key_to_float,
    numel,
)

if TYPE_CHECKING:
    import torch


@dataclass
class SparseFine:
    """Fine histogram of one bucket: the non-empty low-16-bit bins and their counts.

    Kept sparse everywhere (workers, driver, RankIndex): a bucket of bf16 task
    vector entries holds a few hundred distinct keys at most, and a dense table
    of 2**16 bins per bucket cost more to allocate and scan than to use.
    """

    bins: np.ndarray  # int64, ascending
    counts: np.ndarray  # int64

    def __add__(self, other: SparseFine) -> SparseFine:
        if not other.bins.size:
            return self
        if not self.bins.size:
            return other
        bins, inverse = np.unique(np.concatenate([self.bins, other.bins]), return_inverse=True)
        counts = np.zeros(bins.size, dtype=np.int64)
        np.add.at(counts, inverse, np.concatenate([self.counts, other.counts]))
        return SparseFine(bins, counts)

    def dense(self) -> np.ndarray:
        d = np.zeros(N_FINE, dtype=np.int64)
        d[self.bins] = self.counts
        return d

    def count_at(self, fine_bin: int) -> int:
        i = int(np.searchsorted(self.bins, fine_bin))
        return int(self.counts[i]) if i < self.bins.size and self.bins[i] == fine_bin else 0

    def count_below(self, fine_bin: int) -> int:
        return int(self.counts[: int(np.searchsorted(self.bins, fine_bin))].sum())

    def bin_at(self, within: int) -> int:
        """The bin holding the within-th entry of the bucket (0-based, ascending)."""
        i = int(np.searchsorted(np.cumsum(self.counts), within, side="right"))
        return int(self.bins[i])

    def above(self, fine_bin: int) -> tuple[list[int], list[int]]:
        """The non-empty bins > fine_bin and their counts."""
        i = int(np.searchsorted(self.bins, fine_bin, side="right"))
        return self.bins[i:].tolist(), self.counts[i:].tolist()


@dataclass
class KeysAside:
    """A block's fine histograms in small form, when few of its keys have low bits.

    kernels.coarse_sparse counts a block's buckets and sets aside the keys whose
    low 16 bits are not all zero (~1% of a bf16 task vector's). The other keys of
    a bucket all fall in fine bin 0, so the block's non-empty buckets with their
    counts and the distinct keys set aside, with theirs, give the fine histogram
    of any bucket: a statistics round returns this with the coarse histogram (a
    few KB to a few hundred KB for a block of millions of bf16 entries) and the
    fine round is not needed.
    """

    buckets: np.ndarray  # int64, ascending: the block's non-empty coarse buckets
    counts: np.ndarray  # int64: their entries
    keys: np.ndarray  # int64, ascending: the distinct keys with low bits set
    hits: np.ndarray  # int64: how many entries have each

    @classmethod
    def of(cls, keys: KeyChunks) -> KeysAside | None:
        """From a block whose coarse statistics were just made (exact.sparse_keys'
        answer, kept on the KeyChunks); None when its keys are not sparse."""
        if not keys.sparse:
            return None
        if keys.aside is None:
            keys.aside = cls.from_counts(*keys.sparse)  # type: ignore[misc]
        return keys.aside  # type: ignore[return-value]

    @classmethod
    def from_counts(
        cls, counts: np.ndarray, side: np.ndarray, only: list[int] | None = None
    ) -> KeysAside:
        """From exact.sparse_keys' answer: all bucket counts and the keys set aside;
        with `only`, the fine histograms of those buckets alone are wanted, and only
        their keys are sorted (sorting them all cost ~1 ms per block and task)."""
        keys = side
        if only is None:
            buckets = np.flatnonzero(counts)
        else:
            # only those buckets are looked up (fines): no scan of all 32768
            buckets = np.unique(np.asarray(only, dtype=np.int64))
            buckets = buckets[counts[buckets] > 0]
            if keys.size:
                wanted = np.zeros(N_COARSE, dtype=bool)
                wanted[buckets] = True
                keys = keys[wanted[keys >> COARSE_SHIFT]]
        distinct, hits = np.unique(keys.astype(np.int64), return_counts=True)
        return cls(buckets.astype(np.int64), counts[buckets], distinct, hits.astype(np.int64))

    @property
    def nbytes(self) -> int:
        return 16 * (self.buckets.size + self.keys.size)

    def fine(self, bucket: int) -> SparseFine:
        return self.fines([bucket])[bucket]

    def fines(self, buckets: list[int]) -> dict[int, SparseFine]:
        """The fine histograms of the given buckets: the bins of their keys set
        aside, and bin 0 for the rest of each bucket's count."""
        bk, ck, keys, hits = self.buckets, self.counts, self.keys, self.hits
        want = np.asarray(buckets, dtype=np.int64)
        if bk.size:
            i = np.minimum(np.searchsorted(bk, want), bk.size - 1)
            n = np.where(bk[i] == want, ck[i], 0)
        else:
            n = np.zeros(want.size, dtype=np.int64)
        lo = np.searchsorted(keys, want << COARSE_SHIFT).tolist()
        hi = np.searchsorted(keys, (want + 1) << COARSE_SHIFT).tolist()
        out = {}
        for b, m, a, z in zip(buckets, n.tolist(), lo, hi, strict=True):
            bins, h = keys[a:z] & 0xFFFF, hits[a:z].copy()
            rest = m - int(h.sum())  # the bucket's keys without low bits: bin 0
            if rest:
                bins = np.concatenate((np.zeros(1, np.int64), bins))
                h = np.concatenate((np.array([rest], np.int64), h))
            out[b] = SparseFine(bins, h)
        return out


NARROW_SPAN = 64  # buckets: a request within this span is selected first, then binned


HEAVY_SHARE = 16  # a wanted bucket holding > 1/16 of the first chunk is binned whole
DENSE_ROWS = 4  # at most this many buckets are binned whole (N_FINE bins each)


def _dense_buckets(chunk: torch.Tensor, wanted: list[int]) -> list[int]:
    """The wanted buckets to bin whole rather than pick entries out of.

    Picking costs about 10 ns per picked entry (nonzero, gathers, a
    concatenation), binning a whole chunk about 2 ns per entry, so a bucket that
    holds a large share of the data is binned whole: bucket 0 when much of τ is
    exact zeros (weights a bf16 fine-tune did not move), or a bucket that starts
    an exponent (bf16 differences of one ulp are exact powers of two). Decided
    on the first chunk. When few buckets are wanted and one is heavy, all are
    binned together: one pass instead of two.
    """
    import torch

    counts = torch.bincount(chunk >> COARSE_SHIFT, minlength=N_COARSE)
    share = counts[torch.tensor(wanted, dtype=torch.int64, device=chunk.device)].tolist()
    limit = chunk.numel() // HEAVY_SHARE
    heavy = sorted((c, b) for b, c in zip(wanted, share, strict=True) if c > limit)
    if not heavy:
        return []
    if len(wanted) <= DENSE_ROWS:
        return list(wanted)
    return sorted(b for _, b in heavy[-DENSE_ROWS:])


class _DenseBins:
    """Fine histograms of a few whole buckets, accumulated chunk by chunk.

    One bucket: keys shifted so that the bucket's are 1..N_FINE, the rest
    clamped to the two end bins. Several: a lookup table maps each coarse bucket
    to its row (the last row collects every other bucket), and (row, low 16 bits)
    is binned. Either way one bincount per chunk and no entries picked out.
    """

    def __init__(self, buckets: list[int], device: torch.device):
        import torch

        self.buckets = buckets
        rows = 1 if len(buckets) == 1 else len(buckets) + 1
        self.size = rows * N_FINE + (2 if len(buckets) == 1 else 0)
        self.acc = torch.zeros(self.size, dtype=torch.int64, device=device)
        self.lut = None
        if len(buckets) > 1:
            self.lut = torch.full((N_COARSE,), len(buckets), dtype=torch.int32, device=device)
            w = torch.tensor(buckets, dtype=torch.int64, device=device)
            self.lut[w] = torch.arange(len(buckets), dtype=torch.int32, device=device)

    def add(self, chunk: torch.Tensor) -> None:
        import torch

        if self.lut is None:
            idx = (chunk - ((self.buckets[0] << COARSE_SHIFT) - 1)).clamp_(0, N_FINE + 1)
        else:
            idx = self.lut.index_select(0, chunk >> COARSE_SHIFT)
            idx.bitwise_left_shift_(COARSE_SHIFT).bitwise_or_(chunk & 0xFFFF)
        self.acc += torch.bincount(idx, minlength=self.size)

    def histograms(self) -> dict[int, SparseFine]:
        acc = self.acc.cpu()
        if self.lut is None:
            rows = acc[1 : N_FINE + 1].view(1, N_FINE)
        else:
            rows = acc.view(-1, N_FINE)
        out = {}
        for i, b in enumerate(self.buckets):
            row = rows[i].numpy()
            nz = np.flatnonzero(row)
            out[b] = SparseFine(nz, row[nz])
        return out


def fine_histograms(
    keys: torch.Tensor | KeyChunks, buckets: list[int], backend: str = "auto"
) -> dict[int, SparseFine]:
    """Sparse fine histograms of the given coarse buckets, in one pass over keys.

    `keys`: a key tensor or KeyChunks. Buckets that hold a large share of the
    data are binned whole (`_DenseBins`). The entries of the others are picked
    out: when they lie close together (one cut of a trim, say), with two
    compares (a few percent of the block at most), binned at the end; otherwise
    a lookup table maps each coarse bucket to its slot among the wanted ones (-1
    elsewhere) and the picked keys' (slot, low 16 bits) pairs are binned at once,
    however many buckets are asked for. `backend`: the merge's kernels backend
    (kernels.enabled), handed down from its dispatch; auto outside a merge.
    """
    out: dict[int, SparseFine] = {}
    if not buckets:
        return out
    wanted = sorted(buckets)
    source = keys.x if isinstance(keys, KeyChunks) else keys
    if numel(keys) and kernels.enabled(source, backend):
        sparse = sparse_keys(keys)
        if sparse is not None:  # from the keys set aside (all of them sorted once, if kept)
            aside = keys.aside if isinstance(keys, KeyChunks) else None
            aside = aside or KeysAside.from_counts(*sparse, only=wanted)
            return aside.fines(wanted)  # type: ignore[union-attr]
        # one fused pass (kernels.py): the same counts as the torch path below
        rows = kernels.fine_histogram_rows(source, wanted)
        for b, (bins, counts) in zip(wanted, rows, strict=True):
            out[b] = SparseFine(bins, counts)
        return out
    return _fine_histograms_torch(keys, wanted)


def _fine_histograms_torch(keys: torch.Tensor | KeyChunks, wanted: list[int]):
    """fine_histograms by torch ops, on the keys' device (GPUs, or no kernels)."""
    import torch

    out: dict[int, SparseFine] = {}
    dense: _DenseBins | None = None
    light: list[int] | None = None
    narrow = True
    b0 = b1 = 0
    picked: list[torch.Tensor] = []
    lut = None
    for chunk in key_chunks(keys):
        if light is None:
            whole = _dense_buckets(chunk, wanted)
            dense = _DenseBins(whole, chunk.device) if whole else None
            light = [b for b in wanted if b not in whole]
            if light:
                b0, b1 = light[0], light[-1]
                narrow = b1 - b0 < NARROW_SPAN
        if dense is not None:
            dense.add(chunk)
        if not light:
            continue
        if narrow:
            lo, hi = b0 << COARSE_SHIFT, (b1 + 1) << COARSE_SHIFT
            sel = (chunk >= lo) & (chunk < hi)
            for b in dense.buckets if dense is not None else []:
                if b0 < b < b1:  # binned whole already: picking it would only cost time
                    sel &= (chunk >> COARSE_SHIFT) != b
            picked.append(chunk[sel].sub_(lo))
            continue
        if lut is None:
            w = torch.tensor(light, dtype=torch.int64, device=chunk.device)
            lut = torch.full((N_COARSE,), -1, dtype=torch.int32, device=chunk.device)
            lut[w] = torch.arange(len(light), dtype=torch.int32, device=chunk.device)
        slot = lut.index_select(0, chunk >> COARSE_SHIFT)  # int32 indices: no int64 copy
        where = (slot >= 0).nonzero().view(-1)
        picked.append((slot[where] << 16) | (chunk[where] & 0xFFFF))
    if dense is not None:
        out.update(dense.histograms())
    if light is None:  # no entries at all: every wanted histogram is empty
        light, b0, b1, narrow = wanted, 0, 0, False
    if not light:
        return out
    n_rows = (b1 - b0 + 1) if narrow else len(light)
    if picked:
        allp = torch.cat(picked) if len(picked) > 1 else picked[0]
        rows = torch.bincount(allp, minlength=n_rows * N_FINE).view(n_rows, N_FINE).cpu()
    else:
        rows = torch.zeros((n_rows, N_FINE), dtype=torch.int64)
    index = [b - b0 for b in light] if narrow else list(range(len(light)))
    rows = rows.numpy()
    for b, i in zip(light, index, strict=True):
        nz = np.flatnonzero(rows[i])
        out[b] = SparseFine(nz, rows[i][nz])
    return out


@dataclass(frozen=True)
class Cut:
    """Where rank r splits the ascending order of (|x|, flat index).

    Positions < r are 'below the cut': every key < `key`, plus the first
    `quota` entries equal to `key` in flat order. r == n is encoded as key = -1
    meaning everything is below; r == 0 as key = 0 with quota = 0 and
    below-key count 0 (nothing below).
    """

    rank: int
    key: int  # the key at position `rank` (first entry not below), or -1 when rank == n
    quota: int  # entries equal to key that are below the cut (group-wide)
    below_key: int  # entries with a smaller key (group-wide)

    @property
    def everything(self) -> bool:
        return self.key < 0


@dataclass
class RankIndex:
    """Answers exact rank queries for one group (a tensor, or a whole task vector)."""

    stats: CoarseStats
    fine: dict[int, SparseFine] = field(default_factory=dict)  # bucket -> fine histogram

    def __post_init__(self) -> None:
        self.n = self.stats.n
        self._cum = np.cumsum(self.stats.counts)
        self._suffix: dict[int, list[int]] = {}

    # --- which fine histograms are needed -------------------------------------------
    def bucket_of(self, rank: int) -> int:
        if not 0 <= rank < self.n:
            raise IndexError(f"rank {rank} outside [0, {self.n})")
        return int(np.searchsorted(self._cum, rank, side="right"))

    def bucket_bounds(self, b: int) -> tuple[float, float]:
        """Smallest and largest magnitude a bucket can hold."""
        return key_to_float(b << COARSE_SHIFT), key_to_float((b << COARSE_SHIFT) | 0xFFFF)

    def nonempty_buckets(self, lo_rank: int, hi_rank: int) -> list[int]:
        """Non-empty buckets holding ranks lo_rank..hi_rank (inclusive)."""
        b0, b1 = self.bucket_of(lo_rank), self.bucket_of(hi_rank)
        counts = self.stats.counts[b0 : b1 + 1]
        return [b0 + int(i) for i in np.flatnonzero(counts).tolist()]

    def missing(self, ranks: list[int]) -> set[int]:
        return {self.bucket_of(r) for r in ranks if 0 <= r < self.n} - set(self.fine)

    def add_fine(self, bucket: int, hist: SparseFine) -> None:
        self.fine[bucket] = self.fine[bucket] + hist if bucket in self.fine else hist

    # --- exact answers -------------------------------------------------------------
    def _before_bucket(self, b: int) -> int:
        return int(self._cum[b - 1]) if b > 0 else 0

    def key_at(self, rank: int) -> int:
        b = self.bucket_of(rank)
        if b not in self.fine:
            raise KeyError(f"fine histogram of bucket {b} not computed")
        return (b << COARSE_SHIFT) | self.fine[b].bin_at(rank - self._before_bucket(b))

    def value_at(self, rank: int) -> float:
        return key_to_float(self.key_at(rank))

    def quantile(self, p: float) -> float:
        """numpy 'linear' quantile of |x|: x(j) + (h-j)(x(j+1)-x(j)), h = p(n-1)."""
        if self.n == 0:
            return 0.0
        h = p * (self.n - 1)
        j = math.floor(h)
        xj = self.value_at(j)
        if j + 1 > self.n - 1:
            return xj
        return xj + (h - j) * (self.value_at(j + 1) - xj)

    def quantile_ranks(self, p: float) -> list[int]:
        if self.n == 0:
            return []
        j = math.floor(p * (self.n - 1))
        return [j] if j + 1 > self.n - 1 else [j, j + 1]

    def count_below(self, key: int) -> int:
        b = key >> COARSE_SHIFT
        return self._before_bucket(b) + self.fine[b].count_below(key & 0xFFFF)

    def count_at(self, key: int) -> int:
        return self.fine[key >> COARSE_SHIFT].count_at(key & 0xFFFF)

    def cut(self, rank: int) -> Cut:
        if rank >= self.n:
            return Cut(self.n, -1, 0, self.n)
        if rank <= 0:
            return Cut(0, 0, 0, 0)
        key = self.key_at(rank)
        below = self.count_below(key)
        return Cut(rank, key, rank - below, below)

    # --- exact sums of |x| (moment 1) or x² (moment 2) over rank ranges ---------------
    def _exp_suffix(self, moment: int) -> list[int]:
        """Exact scaled moment of whole exponents, as suffix sums over exponent index."""
        if moment not in self._suffix:
            per_exp = self.stats.exponent_moments(moment)
            suffix = [0] * (len(per_exp) + 1)
            for e in range(len(per_exp) - 1, -1, -1):
                suffix[e] = suffix[e + 1] + per_exp[e]
            self._suffix[moment] = suffix
        return self._suffix[moment]

    def _buckets_from(self, b0: int, moment: int) -> int:
        """Scaled moment of all buckets >= b0."""
        if b0 >= N_COARSE:
            return 0
        e0 = b0 // BUCKETS_PER_EXP
        end = (e0 + 1) * BUCKETS_PER_EXP
        return self._exp_suffix(moment)[e0 + 1] + self.stats.range_moment(b0, end, moment)

    def moment_from(self, cut: Cut, moment: int = 2) -> int:
        """Exact scaled Σ|x|^moment of the positions >= cut.rank."""
        if cut.everything:
            return 0
        if cut.rank == 0:
            return self._buckets_from(0, moment)
        b = cut.key >> COARSE_SHIFT
        j = cut.key & 0xFFFF
        total = self._buckets_from(b + 1, moment)
        value = key_square_scaled if moment == 2 else key_abs_scaled
        for fine_bin, c in zip(*self.fine[b].above(j), strict=True):
            total += c * value((b << COARSE_SHIFT) | fine_bin)
        kept_ties = self.count_at(cut.key) - cut.quota
        return total + kept_ties * value(cut.key)

    def total_moment(self, moment: int = 2) -> int:
        return self._exp_suffix(moment)[0]


def scaled_to_float(v: int, bits: int = SQ_SCALE_BITS) -> float:
    """Round an exact scaled integer to float64 once."""
    from fractions import Fraction

    return float(Fraction(v, 1 << bits))
