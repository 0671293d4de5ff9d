"""A combiner's whole-tensor statistics (methods/registry.py Combiner.statistics),
the block side: its generator of requests driven on the block itself when the
block holds what they ask about (`resolve`: the whole tensor, or sums inside a
row), one unit's answer to a round over a split tensor's units (`answer`;
cluster/tensor_stats.py drives those), and a resolved cut applied chunk by
chunk (`masked`).

Exact for any split, like the sparsifiers' selections:
- ScoreRequest: the mergeable histograms (histogram.py) of the derived score's
  keys, magnitude keys or, for a signed score, the 32-bit order keys of
  signed.py; the generator reads exact order statistics from them;
- CutRequest: ascending score, ties by flat index, one cut for every task; a
  block's share of the ties at a cut key follows the blocks' order, and within a
  block the flat order;
- SumsRequest: exact sums of products (sums.py), rounded once;
- CountRequest: the combiner's integer counts (Combiner.counts), added.
"""

from __future__ import annotations

import torch

from .. import methods
from .exact import coarse_stats
from .histogram import RankIndex, fine_histograms
from .keys import KeyChunks, count_keys, magnitude_keys
from .signed import SignedRankIndex, signed_coarse, signed_fine
from .sparsify import BlockCuts
from .spec import BlockContext, CountRequest, CutRequest, MergeSpec, SumsRequest, UnitRequest
from .sums import block_sums, local


def score_index(score: torch.Tensor, signed: bool, backend: str) -> RankIndex:
    """The rank index of a score's coarse histogram (signed or magnitude keys)."""
    if signed:
        return SignedRankIndex(signed_coarse(score, backend))
    return RankIndex(coarse_stats(KeyChunks(score), moments=0, backend=backend))


def score_fine(score: torch.Tensor, signed: bool, buckets: list[int], backend: str) -> dict:
    """The fine histograms of a score's coarse buckets (signed or magnitude keys)."""
    if signed:
        return signed_fine(score, buckets, backend)
    return fine_histograms(KeyChunks(score), buckets, backend)


def masked(ts: list[torch.Tensor], cuts: BlockCuts | None, score: torch.Tensor) -> None:
    """Drops from every t_k, in place (+0.0), the entries a cut drops by the
    score's magnitude keys: chunks in flat order, the cut's tie quotas run down."""
    if cuts is not None:
        keep = cuts.keep(magnitude_keys(score))
        for t in ts:
            t.view(torch.int32).bitwise_and_(keep)


def resolve(
    base: torch.Tensor,
    vs: list[torch.Tensor],
    spec: MergeSpec,
    ctx: BlockContext,
    score: torch.Tensor | None = None,
) -> dict:
    """The block's statistics {"cut", "values"}: the driver's (a split tensor), or
    what the combiner's generator returns answered from the block itself, the
    same numbers as the rounds over units give. `vs` are the block's t_k (a
    CutRequest cuts them in place), or the models' weights for a combiner with
    no merge_block; `score`: the block's derived score, where the caller has it."""
    if ctx.tensor_stats is not None:
        return ctx.tensor_stats
    combiner = methods.combiner(spec.method)
    made = combiner.merge_block is not None
    gen = combiner.statistics(spec, ctx.shape, ctx.tensor)
    index: RankIndex | None = None
    try:
        request = next(gen)
        while True:
            answer = None
            if isinstance(request, SumsRequest | CountRequest):
                in_rows = isinstance(request, SumsRequest) and local(request.layout, ctx.shape)
                if not (ctx.whole or in_rows):
                    raise RuntimeError(f"{ctx.tensor}: split block without its statistics")
                if isinstance(request, CountRequest):
                    answer = combiner.counts(vs, spec, ctx.backend)
                else:
                    answer = block_sums(base, vs, request, ctx.shape, made, ctx.backend).values()
            else:
                if score is None:
                    score = combiner.score(base, vs, spec, ctx.shape)
                if index is None:
                    index = score_index(score, getattr(request, "signed", False), ctx.backend)
                wanted = (request.lo, request.hi) if isinstance(request, CutRequest) else ()
                need = set(getattr(request, "buckets", ())) - set(index.fine)
                need |= index.missing(list(wanted))
                if need:
                    signed = isinstance(index, SignedRankIndex)
                    for b, h in score_fine(score, signed, sorted(need), ctx.backend).items():
                        index.add_fine(b, h)
                answer = index
                if isinstance(request, CutRequest):
                    lo, hi = index.cut(request.lo), index.cut(request.hi)
                    masked(vs, BlockCuts(lo.key, lo.quota, hi.key, hi.quota), score)
                    score = index = answer = None  # (the requests after it see the cut t_k)
            request = gen.send(answer)
    except StopIteration as stop:
        return {"cut": None, "values": stop.value}


def answer(
    base: torch.Tensor,
    models: list[torch.Tensor],
    spec: MergeSpec,
    ctx: BlockContext,
    ask: UnitRequest,
):
    """One unit's share of a round (whole rows of its tensor): `models` are its
    weights, made into its t_k as the merge makes them and cut, unless the
    request is of the weights."""
    request = ask.request
    if isinstance(request, SumsRequest) and request.vectors == "weights":
        return block_sums(base, models, request, ctx.shape, backend=ctx.backend)
    score_of = methods.combiner(spec.method).score
    ts = sparsified(base, models, spec, ctx)
    if ask.cut is not None:
        masked(ts, BlockCuts(*ask.cut), score_of(base, ts, spec, ctx.shape))
    if isinstance(request, SumsRequest):
        return block_sums(base, ts, request, ctx.shape, True, ctx.backend)
    if isinstance(request, CountRequest):
        return methods.combiner(spec.method).counts(ts, spec, ctx.backend)
    score = score_of(base, ts, spec, ctx.shape)
    if request.keys:  # (cuts are of unsigned scores: magnitude keys)
        return count_keys(KeyChunks(score), request.keys)
    if request.buckets:
        return score_fine(score, request.signed, list(request.buckets), ctx.backend)
    return score_index(score, request.signed, ctx.backend).stats


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
