"""A combiner's whole-tensor statistics (methods/registry.py TensorStats), the
block side: resolved from the block itself when it is the whole tensor, or
answered for one unit of a split tensor (cluster/tensor_stats.py drives the
rounds), and applied chunk by chunk.

Exact for any split, like the sparsifiers' selections:
- the derived score's rank cut comes from the same mergeable histograms of
  float32 keys (histogram.py), over the score instead of |τ|: ascending score,
  ties by flat index, one cut for every task; a block's share of the ties at a
  cut key follows the blocks' order, and within a block the flat order;
- the sums are Python integers (counts, exact scaled moments) that add.
The resolved context of a tensor is plain data: {"cut": [lo_key, lo_quota,
hi_key, hi_quota] or None (the block's quotas), "values": finish(...)}.
"""

from __future__ import annotations

from collections.abc import Generator

import torch

from .. import methods
from .exact import coarse_stats
from .histogram import Cut, RankIndex, fine_histograms
from .keys import KeyChunks, magnitude_keys
from .selection import run_locally
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


def local(base: torch.Tensor, ts: list[torch.Tensor], spec: MergeSpec) -> dict:
    """The context of a block that is the whole tensor, from the block itself.
    Applies the cut to `ts` (in place)."""
    decl = declaration(spec)
    cut = None
    if uses_score(decl, spec):
        score = decl.score(ts, spec)
        keys = KeyChunks(score)
        index = RankIndex(coarse_stats(keys, moments=0))
        lo, hi = run_locally(resolve_cut(index, decl, spec), keys, index)
        cut = [lo.key, lo.quota, hi.key, hi.quota]
        masked(ts, Cutter(cut).keep(score))
        del score, keys
    values = None
    if decl.sums is not None:
        values = decl.finish(decl.sums(base, ts, spec), base.numel(), spec)
    return {"cut": None, "values": values}  # (the cut is applied already)


def answer(
    base: torch.Tensor, ts: list[torch.Tensor], spec: MergeSpec, request: TensorStatsRequest
):
    """One unit's share of a round: `ts` are its sparsified task vectors."""
    decl = declaration(spec)
    if request.kind == "sums":
        if uses_score(decl, spec):
            masked(ts, Cutter(request.cut).keep(decl.score(ts, spec)))
        return decl.sums(base, ts, spec)
    keys = KeyChunks(decl.score(ts, spec))
    if request.kind == "coarse":
        return coarse_stats(keys, moments=0)
    if request.kind == "fine":
        return fine_histograms(keys, list(request.buckets))
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
