"""A combiner's whole-tensor statistics (methods/registry.py TensorStats), the
block side: resolved from the block itself when it is the whole tensor, or
answered for one unit of a split tensor (cluster/tensor_stats.py drives the
rounds), and applied chunk by chunk.

Exact for any split, like the sparsifiers' selections:
- the derived score's rank cut comes from the same mergeable histograms of
  float32 keys (histogram.py), over the score instead of |τ|: ascending score,
  ties by flat index, one cut for every task; a block's share of the ties at a
  cut key follows the blocks' order, and within a block the flat order;
- a signed score (arcee_fusion's importance) has 32-bit order keys and their
  histograms (signed.py); its `value` generator reads exact order statistics
  (quantiles) instead of cutting;
- the sums are Python integers (counts, exact scaled moments) that add.
The resolved context of a tensor is plain data: {"cut": [lo_key, lo_quota,
hi_key, hi_quota] or None (the block's quotas), "values": finish(...) and
value(...)}.
"""

from __future__ import annotations

from collections.abc import Generator

import torch

from .. import methods
from .exact import coarse_stats
from .histogram import Cut, RankIndex, fine_histograms
from .keys import KeyChunks, magnitude_keys
from .selection import run_locally
from .signed import SignedRankIndex, signed_coarse, signed_fine
from .sparsify import below_bits, ties_below
from .spec import BlockContext, MergeSpec, TensorStatsRequest


def declaration(spec: MergeSpec):
    return methods.combiner(spec.method).tensor_stats


def uses_score(decl, spec: MergeSpec) -> bool:
    return decl is not None and decl.score is not None and decl.uses_score(spec)


def resolve_cut(index: RankIndex, decl, spec: MergeSpec) -> Generator[set[int], None, tuple]:
    """(lo Cut, hi Cut) of the kept ranks of the score order, from its histograms."""
    lo, hi = yield from decl.keep(index, spec)
    need = index.missing([lo, hi])
    if need:
        yield need
    return index.cut(lo), index.cut(hi)


def score_index(decl, score: torch.Tensor, backend: str) -> RankIndex:
    """The rank index of a score's coarse histogram (signed or magnitude keys)."""
    if decl.signed:
        return SignedRankIndex(signed_coarse(score))
    return RankIndex(coarse_stats(KeyChunks(score), moments=0, backend=backend))


def score_fine(decl, score: torch.Tensor, buckets: list[int], backend: str) -> dict:
    """The fine histograms of a score's coarse buckets (signed or magnitude keys)."""
    if decl.signed:
        return signed_fine(score, buckets)
    return fine_histograms(KeyChunks(score), buckets, backend)


def values_of(score: torch.Tensor, decl, spec: MergeSpec, backend: str) -> dict:
    """`value`'s plain values of a score that is the whole tensor's."""
    index = score_index(decl, score, backend)
    gen = decl.value(index, spec)
    try:
        need = next(gen)
        while True:
            for b, h in score_fine(decl, score, sorted(need), backend).items():
                index.add_fine(b, h)
            need = gen.send(None)
    except StopIteration as stop:
        return stop.value


def zero_count(index: RankIndex) -> Generator[set[int], None, int]:
    """How many scores are exactly +0.0 (key 0): the fine histogram of bucket 0."""
    if index.n == 0 or int(index.stats.counts[0]) == 0:
        return 0
    if 0 not in index.fine:
        yield {0}
    return index.count_at(0)


class Cutter:
    """A resolved cut applied chunk by chunk in flat order (the tie quotas run down)."""

    def __init__(self, cut: list[int] | None):
        self.cut = None if cut is None else list(cut)

    def keep(self, score: torch.Tensor) -> torch.Tensor | None:
        """int32 mask of one chunk's kept entries (-1 kept, 0 dropped), or None (all)."""
        if self.cut is None:
            return None
        lo_key, lo_left, hi_key, hi_left = self.cut
        keys = magnitude_keys(score)
        lo_end, self.cut[1] = ties_below(keys, lo_key, lo_left)
        hi_end, self.cut[3] = ties_below(keys, hi_key, hi_left)
        keep = below_bits(keys, lo_key, lo_end).bitwise_not_()
        if hi_key >= 0:
            keep.bitwise_and_(below_bits(keys, hi_key, hi_end))
        return keep


def masked(ts: list[torch.Tensor], keep: torch.Tensor | None) -> list[torch.Tensor]:
    """t_k with the dropped entries set to +0.0, in place."""
    if keep is not None:
        for t in ts:
            t.view(torch.int32).bitwise_and_(keep)
    return ts


def local(
    base: torch.Tensor,
    ts: list[torch.Tensor],
    spec: MergeSpec,
    shape: tuple[int, ...] | None = None,
    *,
    backend: str,
) -> dict:
    """The context of a block that is the whole tensor (of `shape`; None: flat),
    from the block itself. Applies the cut to `ts` (in place)."""
    decl = declaration(spec)
    cut = None
    shape = (base.numel(),) if shape is None else shape
    if uses_score(decl, spec) and decl.value is not None:
        values = values_of(decl.score(base, ts, spec, shape), decl, spec, backend)
        if decl.sums is not None:
            values.update(decl.finish(decl.sums(base, ts, spec, backend), base.numel(), spec))
        return {"cut": None, "values": values}
    if uses_score(decl, spec):
        score = decl.score(base, ts, spec, shape)
        keys = KeyChunks(score)
        index = RankIndex(coarse_stats(keys, moments=0, backend=backend))
        lo, hi = run_locally(resolve_cut(index, decl, spec), keys, index, backend)
        cut = [lo.key, lo.quota, hi.key, hi.quota]
        masked(ts, Cutter(cut).keep(score))
        del score, keys
    values = None
    if decl.sums is not None:
        values = decl.finish(decl.sums(base, ts, spec, backend), base.numel(), spec)
    return {"cut": None, "values": values}  # (the cut is applied already)


def answer(
    base: torch.Tensor,
    ts: list[torch.Tensor],
    spec: MergeSpec,
    request: TensorStatsRequest,
    shape: tuple[int, ...] | None = None,
    *,
    backend: str,
):
    """One unit's share of a round: `ts` are its sparsified task vectors (whole
    rows of a tensor of `shape`; None: flat)."""
    decl = declaration(spec)
    shape = (base.numel(),) if shape is None else shape
    if request.kind == "sums":
        if uses_score(decl, spec) and decl.value is None:
            masked(ts, Cutter(request.cut).keep(decl.score(base, ts, spec, shape)))
        return decl.sums(base, ts, spec, backend)
    score = decl.score(base, ts, spec, shape)
    if request.kind == "coarse":
        return score_index(decl, score, backend).stats
    if request.kind == "fine":
        return score_fine(decl, score, list(request.buckets), backend)
    keys = KeyChunks(score)
    if request.kind == "ties":
        return {key: sum(int(torch.count_nonzero(c == key)) for c in keys) for key in request.keys}
    raise ValueError(f"unknown tensor statistics request {request.kind!r}")


def sparsified(
    base: torch.Tensor, models: list[torch.Tensor], spec: MergeSpec, ctx: BlockContext
) -> list[torch.Tensor]:
    """t_k of a block, in place of `models`, as merge_block makes them (the
    sparsifier's resolved selections in `ctx`)."""
    from .block import _chunks, plan_task, sparsify_chunk

    ts = []
    for k, m in enumerate(models):
        tau = m.sub_(base)
        tp = plan_task(tau, k, spec, ctx)
        for a, b in _chunks(tau.numel(), tau.device):
            sparsify_chunk(tp, tau[a:b], a, spec)
        ts.append(tau)
    return ts


def unit_cut(lo: Cut, hi: Cut, shares: tuple[int, int]) -> list[int]:
    return [lo.key, shares[0], hi.key, shares[1]]
