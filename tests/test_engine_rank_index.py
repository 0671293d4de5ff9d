"""RankIndex (exact order statistics from histograms) against plain references.

Every answer the selections use (the key at a rank, the counts below and at a
key, exact Σ|x| and Σx² above a cut) is checked against a sort and exact
Fraction sums of the same values, with fine histograms added up from several
blocks, as the statistics stage adds them.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from tadmerge.engine.exact import ABS_SCALE_BITS, SQ_SCALE_BITS, CoarseStats, coarse_stats
from tadmerge.engine.histogram import RankIndex, SparseFine, fine_histograms
from tadmerge.engine.keys import COARSE_SHIFT, N_COARSE, magnitude_keys


def _bf16_like_tau(n: int, seed: int) -> torch.Tensor:
    """Differences of bf16 weights: many exact ties and exact zeros, a wide range."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=g) * 0.05).to(torch.bfloat16)
    step = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 2) * 1e-4
    ft = (base.float() + step).to(torch.bfloat16)
    return ft.float() - base.float()


def _index_of_blocks(blocks: list[torch.Tensor]) -> RankIndex:
    stats = CoarseStats.zeros()
    for b in blocks:
        stats = stats + coarse_stats(magnitude_keys(b), moments=2)
    index = RankIndex(stats)
    buckets = sorted(set((torch.cat([magnitude_keys(b) for b in blocks]) >> 16).tolist()))
    for b in blocks:
        for bucket, hist in fine_histograms(magnitude_keys(b), buckets).items():
            index.add_fine(bucket, hist)
    return index


@pytest.mark.parametrize("seed", [0, 1])
def test_rank_queries_match_a_sort(seed):
    x = _bf16_like_tau(20_000, seed)
    blocks = list(x.split(6_001))
    index = _index_of_blocks(blocks)
    keys = magnitude_keys(x)
    ordered = torch.sort(keys).values.tolist()
    assert index.n == len(ordered)
    for rank in [0, 1, 7, len(ordered) // 3, len(ordered) // 2, len(ordered) - 1]:
        key = index.key_at(rank)
        assert key == ordered[rank]
        assert index.count_below(key) == sum(1 for k in ordered if k < key)
        assert index.count_at(key) == sum(1 for k in ordered if k == key)
        cut = index.cut(rank)
        assert cut.below_key + cut.quota == rank

        # exact sums over the positions >= rank, against Fractions of the values
        above = [Fraction(v) for v in torch.sort(x.abs()).values[rank:].double().tolist()]
        assert index.moment_from(cut, 1) == sum(above) * (1 << ABS_SCALE_BITS)
        assert index.moment_from(cut, 2) == sum(v * v for v in above) * (1 << SQ_SCALE_BITS)


def test_range_moment_equals_the_per_bucket_sum():
    x = _bf16_like_tau(50_000, 3)
    stats = coarse_stats(magnitude_keys(x), moments=2)
    buckets = np.flatnonzero(stats.counts).tolist()
    for b in buckets[:: max(1, len(buckets) // 20)]:
        end = (b // 128 + 1) * 128
        for moment in (1, 2):
            want = sum(stats.bucket_moment(c, moment) for c in range(b, min(end, N_COARSE)))
            assert stats.range_moment(b, end, moment) == want


def test_sparse_fine_histograms_add_like_dense_ones():
    g = torch.Generator().manual_seed(5)
    parts = []
    for n in (0, 10, 300, 1):
        keys = (7 << COARSE_SHIFT) | torch.randint(0, 1 << 16, (n,), generator=g)
        parts.append(fine_histograms(keys.to(torch.int32), [7])[7])
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    dense = sum(p.dense() for p in parts)
    assert np.array_equal(total.dense(), dense)
    assert np.array_equal(total.bins, np.flatnonzero(dense))
    for j in (0, int(total.bins[0]), int(total.bins[-1]), 65535):
        assert total.count_at(j) == int(dense[j])
        assert total.count_below(j) == int(dense[:j].sum())
    empty = SparseFine(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    assert np.array_equal((empty + empty).dense(), np.zeros(1 << 16, dtype=np.int64))
