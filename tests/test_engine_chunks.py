"""The chunked statistics passes against whole-tensor and plain-Python references.

Merges resolve their statistics from keys made chunk by chunk (KeyChunks), find
the ties below a cut by counting chunk by chunk, and sum |x| by exponent. Small
chunk sizes make every run of ties and every bucket straddle chunk boundaries.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tadmerge.config import RuntimeSpec, available_cpus
from tadmerge.engine import exact as exact_mod
from tadmerge.engine import kernels, native
from tadmerge.engine.exact import coarse_stats, exact_abs_sum
from tadmerge.engine.histogram import fine_histograms
from tadmerge.engine.keys import N_COARSE, KeyChunks, magnitude_keys
from tadmerge.engine.sparsify import below_bits, ties_below

needs_c = pytest.mark.skipif(not native.available(), reason="no C kernels")


@pytest.fixture(params=["torch", "c"])
def stats_backend(request):
    """The backend a statistics test passes: the torch reference, then the C
    kernels (kernels.py)."""
    if request.param == "c" and not native.available():
        pytest.skip(f"C kernels {native.describe()}")
    return request.param


def _tied_values(n: int, seed: int) -> torch.Tensor:
    """float32 values with many exact ties and both signs (like bf16 task vectors)."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.tensor([0.0, 1e-3, 2e-3, 2.5e-3, 0.5, 3.0], dtype=torch.float32)
    x = levels[torch.randint(0, len(levels), (n,), generator=g)]
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    return (x * sign).to(torch.float32)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_ties_below_a_cut_chunk_by_chunk_match_a_listing_of_ties(chunk):
    x = _tied_values(701, seed=chunk)
    keys = magnitude_keys(x)
    for key in sorted(set(keys.tolist())):
        ties = [i for i, k in enumerate(keys.tolist()) if k == key]
        for quota in (0, 1, len(ties) // 2, len(ties), len(ties) + 5):
            # the apply pass: chunks in flat order, the quota running down
            left = quota
            parts = []
            for part in keys.split(chunk):
                tie_end, left = ties_below(part, key, left)
                parts.append(below_bits(part, key, tie_end) == -1)
            below = torch.cat(parts)
            ref = torch.tensor([k < key for k in keys.tolist()])
            ref[ties[:quota]] = True
            assert torch.equal(below, ref)
            assert left == max(0, quota - len(ties))


@pytest.mark.parametrize("chunk", [5, 333])
def test_histograms_from_chunks_equal_the_whole_block(chunk, stats_backend):
    g = torch.Generator().manual_seed(3)
    x = torch.cat([_tied_values(500, 1), torch.randn(1500, generator=g) * 1e-2])
    keys = magnitude_keys(x)
    whole = coarse_stats(keys, moments=2, backend=stats_backend)
    parts = coarse_stats(KeyChunks(x, chunk), moments=2, backend=stats_backend)
    for a, b in zip(
        (whole.counts, whole.s1, whole.s2_hi, whole.s2_lo),
        (parts.counts, parts.s1, parts.s2_hi, parts.s2_lo),
        strict=True,
    ):
        assert np.array_equal(a, b)
    buckets = sorted(set((keys >> 16).tolist()))
    # a narrow request (neighbouring buckets) and a wide one (far apart)
    for wanted in (buckets[len(buckets) // 2 : len(buckets) // 2 + 3], [buckets[0], buckets[-1]]):
        ref = {
            b: torch.bincount(keys[(keys >> 16) == b] & 0xFFFF, minlength=1 << 16) for b in wanted
        }
        for source in (keys, KeyChunks(x, chunk)):
            got = fine_histograms(source, wanted, stats_backend)
            assert sorted(got) == sorted(wanted)
            for b in wanted:
                assert np.array_equal(got[b].dense(), ref[b]), b


def _from_bits(bits: list[int]) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.int32).view(torch.float32)


@pytest.mark.parametrize("chunk", [16, 400, None])
def test_fine_histograms_of_heavy_buckets(chunk, stats_backend):
    """Buckets holding much of the data (exact zeros, one tied value) are binned whole.

    Edge keys of a bucket (its first and last fine bin, and the neighbours just
    outside) must land in the right histogram whichever way a bucket is counted.
    """
    g = torch.Generator().manual_seed(11)
    n = 4000
    x = torch.randn(n, generator=g) * 1e-2
    x[torch.rand(n, generator=g) < 0.6] = 0.0  # bucket 0: exact zeros
    x[torch.rand(n, generator=g) < 0.1] = 0.0625  # one heavy non-zero bucket
    mid = int(magnitude_keys(torch.tensor([0.0625]))[0]) >> 16
    edges = [1, 2, 0xFFFF, 0x10000, 0x10001]  # denormals around bucket 0's end
    for b in (mid, mid + 1):
        edges += [(b << 16) - 1, b << 16, (b << 16) + 1, (b << 16) + 0xFFFF]
    x[torch.randperm(n, generator=g)[: len(edges)]] = _from_bits(edges)
    keys = magnitude_keys(x)
    present = sorted(set((keys >> 16).tolist()))
    far = present[len(present) // 3]
    wide = sorted({0, far, mid, mid + 1, present[-1] + 300})
    narrow_around = [mid - 3, mid - 2, mid, mid + 1, mid + 2, mid + 5]  # heavy inside the span
    for wanted in ([0], [0, 1], [0, mid], [mid], [mid - 1, mid, mid + 1], wide, narrow_around):
        ref = {
            b: torch.bincount(keys[(keys >> 16) == b] & 0xFFFF, minlength=1 << 16) for b in wanted
        }
        source = keys if chunk is None else KeyChunks(x, chunk)
        got = fine_histograms(source, wanted, stats_backend)
        assert sorted(got) == sorted(wanted)
        for b in wanted:
            assert np.array_equal(got[b].dense(), ref[b]), (wanted, b)
    got = fine_histograms(keys, present, stats_backend)  # more buckets than are ever binned whole
    for b in present:
        assert np.array_equal(
            got[b].dense(), torch.bincount(keys[(keys >> 16) == b] & 0xFFFF, minlength=1 << 16)
        )


@pytest.mark.parametrize("moments", [0, 1, 2])
def test_coarse_stats_against_python_counts(moments, stats_backend):
    x = torch.cat(
        [
            _tied_values(300, 4),
            torch.randn(700, generator=torch.Generator().manual_seed(4)) * 1e-3,
            _from_bits([1, 0xFFFF, 0x10000, 0x7F7FFFFF]),  # denormals, the largest float
        ]
    )
    counts, s1, s2 = [0] * (1 << 15), [0] * (1 << 15), [0] * (1 << 15)
    for k in magnitude_keys(x).tolist():
        counts[k >> 16] += 1
        s1[k >> 16] += k & 0xFFFF
        s2[k >> 16] += (k & 0xFFFF) ** 2
    for source in (magnitude_keys(x), KeyChunks(x, 100)):
        got = coarse_stats(source, moments=moments, backend=stats_backend)
        assert got.counts.tolist() == counts
        assert got.s1.tolist() == (s1 if moments >= 1 else [0] * len(s1))
        want2 = s2 if moments >= 2 else [0] * len(s2)
        hi_lo = zip(got.s2_hi.tolist(), got.s2_lo.tolist(), strict=True)
        assert [(h << 32) + lo for h, lo in hi_lo] == want2
    assert (
        coarse_stats(torch.zeros(0, dtype=torch.int32), moments=moments, backend=stats_backend).n
        == 0
    )


def test_fine_histograms_of_nothing_are_empty(stats_backend):
    for source in (torch.zeros(0, dtype=torch.int32), KeyChunks(torch.zeros(0))):
        for wanted in ([0], [3, 5], [0, 20000]):
            got = fine_histograms(source, wanted, stats_backend)
            assert sorted(got) == wanted
            assert all(int(got[b].dense().sum()) == 0 for b in wanted)


def test_exact_abs_sum_is_fsum():
    g = torch.Generator().manual_seed(5)
    for x in (
        torch.randn(10_000, generator=g) * torch.rand(10_000, generator=g) ** 6,
        torch.tensor([0.0, -0.0, 1e-45, -1e-45, 3.0e38, -2.5, 1.17549435e-38]),
        torch.zeros(0),
    ):
        got = exact_abs_sum(x.to(torch.float32))
        assert got.abs_sum == math.fsum(abs(v) for v in x.to(torch.float32).double().tolist())
        assert got.count == x.numel()


def test_auto_workers_one_per_core_within_the_budget():
    cpus = available_cpus()
    assert RuntimeSpec(workers=3).local_workers() == 3
    assert RuntimeSpec(memory_budget=512 * 10**6).local_workers() == max(1, min(cpus, 4, 2))
    assert RuntimeSpec(memory_budget=100 * 10**6).local_workers() == 1
    assert RuntimeSpec(memory_budget=64 * 10**9).local_workers() == max(1, min(cpus, 4))


def test_without_the_c_library_the_torch_reference_counts_the_same(without_c):
    """No C library (a compiler that fails): the statistics run on torch, the
    same integers; a process told 'c' by its driver says so once, at WARNING."""
    import logging

    x = torch.randn(5000, generator=torch.Generator().manual_seed(8))
    keys = magnitude_keys(x).tolist()
    want = [0] * N_COARSE
    for k in keys:
        want[k >> 16] += k & 0xFFFF
    assert "false failed" in without_c
    for backend in ("auto", "c"):
        assert not kernels.enabled(x, backend) and not kernels.load()
        assert coarse_stats(KeyChunks(x), moments=2, backend=backend).s1.tolist() == want
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger(kernels.__name__).addHandler(handler)
    kernels._say_unavailable.cache_clear()
    try:
        kernels.enabled(x, "c")
        kernels.enabled(x, "c")
        kernels.enabled(x, "auto")  # (auto: the torch reference, unsaid)
    finally:
        logging.getLogger(kernels.__name__).removeHandler(handler)
        kernels._say_unavailable.cache_clear()
    assert [r.levelname for r in records] == ["WARNING"]
    assert "the torch reference runs, with the same bytes" in records[0].getMessage()


def test_side_moments_in_exact_pieces(monkeypatch):
    """The keys set aside are summed SMALL_SIDE at a time: the same integers as
    one exact sum per bucket."""
    g = np.random.default_rng(3)
    side = (g.integers(0, 1 << 31, 5000, dtype=np.int64)).astype(np.int32)
    monkeypatch.setattr(exact_mod, "SMALL_SIDE", 999)
    s1, s2 = exact_mod._side_moments(side, 2)
    want1 = np.zeros(N_COARSE, object)
    want2 = np.zeros(N_COARSE, object)
    for k in side.tolist():
        want1[k >> 16] += k & 0xFFFF
        want2[k >> 16] += (k & 0xFFFF) ** 2
    assert s1.tolist() == want1.tolist() and s2.tolist() == want2.tolist()


@needs_c
@pytest.mark.parametrize("seed,n", [(0, 997), (1, 997), (2, 5003)])
def test_cut_kernel_keeps_exactly_the_ranks_of_a_stable_sort(seed, n):
    """kernels.cut_block (the apply phase's fused pass) against a stable argsort:
    ranks [lo, hi) of (|x|, flat index) kept and times fl32(scale), +0.0 elsewhere,
    for cuts inside runs of ties, at the ends and at zero (5003: runs of ties
    that span the kernel's chunks of 2048)."""
    x = _tied_values(n, seed)
    n = x.numel()
    order = torch.sort(magnitude_keys(x), stable=True).indices
    keys = magnitude_keys(x)[order].tolist()

    def cut(rank: int) -> tuple[int, int]:  # (key, ties of that key below the rank)
        if rank >= n:
            return (-1, 0)
        return (keys[rank], rank - keys.index(keys[rank]))

    ranks = [0, 1, n // 3, n // 2, n - 1, n] + [keys.index(k) for k in sorted(set(keys))]
    for lo in ranks:
        for hi in [r for r in ranks if r >= lo]:
            for scale in (1.0, 1.3):
                kept = torch.zeros(n, dtype=torch.bool)
                kept[order[lo:hi]] = True
                ref = torch.where(kept, x * torch.tensor(scale, dtype=torch.float32), 0.0)
                t = x.clone()
                assert kernels.cut_block(t, cut(lo), cut(hi), scale) == hi - lo
                assert torch.equal(t.view(torch.int32), ref.view(torch.int32)), (lo, hi, scale)


@needs_c
@pytest.mark.parametrize("disjoint", ["mean", "sum"])
def test_ties_kernel_gives_the_bytes_of_the_torch_combiner(disjoint):
    """kernels.ties_merge against methods/ties.py's ties (torch ops, tested against the
    reference in test_merge_exact) on values full of ties, zeros and exactly
    cancelling votes, for both majority signs."""
    from tadmerge.methods import ties

    n = 4001
    base = _tied_values(n, 10)
    t1 = _tied_values(n, 11)
    ts = [t1, -t1, _tied_values(n, 12)]  # the first two cancel wherever the third is 0
    weights = [1.0, 1.0, 0.5] if disjoint == "mean" else [1.0, 1.0, -2.0]
    for majority in (1, -1):
        ref = ties.ties(base, [t.clone() for t in ts], weights, 0.7, disjoint, majority, True)
        got = [t.clone() for t in ts]
        sign_sum, cancel = kernels.ties_merge(
            got, weights, base, 0.7, disjoint == "mean", majority, True
        )
        assert torch.equal(got[0].view(torch.int32), ref.merged.view(torch.int32))
        assert (sign_sum, cancel) == (ref.sign_sum, ref.cancel) and cancel > 0
    assert kernels.ties_votes(ts, weights) == ties.ties_vote(ts, weights)


@needs_c
def test_emr_kernel_gives_the_bytes_and_sums_of_the_torch_combiner():
    """kernels.emr_merge against methods/emr.py's emr (torch ops, tested against the
    reference in test_merge_exact): τ_uni, masks and the exact rescaler sums, on
    values full of ties, zeros and totals that cancel to zero."""
    from tadmerge.engine.exact import exact_sum_by_exponent
    from tadmerge.methods import emr

    n = 4001
    t1 = _tied_values(n, 21)
    ts = [t1, -t1, _tied_values(n, 22) * 1e-30]  # cancelling totals; subnormal values
    ref = emr.emr([t.clone() for t in ts])
    got = [t.clone() for t in ts]
    planes = torch.empty((3, n), dtype=torch.bool)
    abs_t, abs_u = kernels.emr_merge(got, planes)
    assert torch.equal(got[0].view(torch.int32), ref.tau_uni.view(torch.int32))
    for k in range(3):
        assert torch.equal(planes[k], ref.masks[k])
        assert exact_sum_by_exponent(abs_t[k], n) == ref.abs_t[k]
        assert exact_sum_by_exponent(abs_u[k], n) == ref.abs_masked_uni[k]


@needs_c
@pytest.mark.parametrize("k", [1, 2, 5, 8, 9, 12])
def test_ties_and_emr_kernels_for_any_number_of_tasks(k):
    """The kernels take up to 8 tasks in one loop and more in groups of 8: any
    K gives the torch ties' and emr's bytes, counts and exact sums."""
    from tadmerge.engine.exact import exact_sum_by_exponent
    from tadmerge.methods import emr, ties

    n = 3001
    base = _tied_values(n, 30)
    ts = [_tied_values(n, 31 + i) * (1.0 + i / 8) for i in range(k)]
    if k > 1:
        ts[1] = -ts[0]  # votes that cancel wherever the others are zero
    weights = [1.0 + (i % 3) / 4 for i in range(k)]
    for disjoint, majority, count in (("mean", 1, True), ("mean", -1, False), ("sum", -1, True)):
        ref = ties.ties(base, [t.clone() for t in ts], weights, 0.7, disjoint, majority, count)
        got = [t.clone() for t in ts]
        sign_sum, cancel = kernels.ties_merge(
            got, weights, base, 0.7, disjoint == "mean", majority, count
        )
        assert torch.equal(got[0].view(torch.int32), ref.merged.view(torch.int32))
        assert sign_sum == ref.sign_sum and cancel == (ref.cancel if count else 0)
    assert kernels.ties_votes(ts, weights) == ties.ties_vote(ts, weights)
    ref = emr.emr([t.clone() for t in ts])
    got = [t.clone() for t in ts]
    planes = torch.empty((k, n), dtype=torch.bool)
    abs_t, abs_u = kernels.emr_merge(got, planes)
    assert torch.equal(got[0].view(torch.int32), ref.tau_uni.view(torch.int32))
    for i in range(k):
        assert torch.equal(planes[i], ref.masks[i])
        assert exact_sum_by_exponent(abs_t[i], n) == ref.abs_t[i]
        assert exact_sum_by_exponent(abs_u[i], n) == ref.abs_masked_uni[i]


@pytest.mark.parametrize("share", [0.0, 0.01, 0.06, 0.07, 1.0])
def test_histograms_of_keys_mostly_without_low_bits(share, stats_backend):
    """bf16 task vectors: most keys have no low 16 bits, so the kernels count
    buckets and set the few other keys aside (kernels.coarse_sparse) instead of
    binning every entry; above n / SIDE_SHARE such keys they bin as before.
    Either way the counts, moments and fine bins are the plain ones."""
    g = torch.Generator().manual_seed(int(share * 100))
    n = 3200
    x = (torch.randn(n, generator=g) * 0.05).bfloat16().float()  # low 16 bits zero
    x[torch.rand(n, generator=g) < 0.3] = 0.0
    bits = x.view(torch.int32).clone()
    lowbits = torch.randperm(n, generator=g)[: int(share * n)]
    bits[lowbits] |= torch.randint(1, 1 << 16, (lowbits.numel(),), generator=g, dtype=torch.int32)
    x = bits.view(torch.float32)
    keys = magnitude_keys(x)
    with_low = int(((keys & 0xFFFF) != 0).sum())
    assert with_low == int(share * n)
    counts, s1, s2 = [0] * (1 << 15), [0] * (1 << 15), [0] * (1 << 15)
    for k in keys.tolist():
        counts[k >> 16] += 1
        s1[k >> 16] += k & 0xFFFF
        s2[k >> 16] += (k & 0xFFFF) ** 2
    present = sorted(set((keys >> 16).tolist()))
    wanted = sorted({0, present[len(present) // 2], present[-1], present[-1] + 7})
    for source in (keys, KeyChunks(x, 100)):
        got = coarse_stats(source, moments=2, backend=stats_backend)
        assert got.counts.tolist() == counts and got.s1.tolist() == s1
        hi_lo = zip(got.s2_hi.tolist(), got.s2_lo.tolist(), strict=True)
        assert [(h << 32) + lo for h, lo in hi_lo] == s2
        hists = fine_histograms(source, wanted, stats_backend)
        for b in wanted:
            ref = torch.bincount(keys[(keys >> 16) == b] & 0xFFFF, minlength=1 << 16)
            assert np.array_equal(hists[b].dense(), ref), b
        if isinstance(source, KeyChunks) and stats_backend == "c":
            # the path taken: keys set aside while they are few enough
            assert bool(source.sparse) == (with_low <= n // kernels.SIDE_SHARE)
    fresh = KeyChunks(x)  # a fine histogram asked for first (a statistics round)
    hists = fine_histograms(fresh, wanted, stats_backend)
    for b in wanted:
        ref = torch.bincount(keys[(keys >> 16) == b] & 0xFFFF, minlength=1 << 16)
        assert np.array_equal(hists[b].dense(), ref), b
