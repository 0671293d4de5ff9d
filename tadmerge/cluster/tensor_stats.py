"""The statistics rounds of a combiner's whole-tensor statistics (sce's variance
cut and weights, ramplus_tl's counts: methods/registry.py TensorStats), for
tensors split over several units. They run after the sparsifier's rounds
(cluster/stats.py), whose resolved context each unit is given so that it makes
its t_k as the merge will.

Per batch of split tensors: a coarse round of the derived score's histograms,
fine rounds until every cut (engine/tensor_stats.resolve_cut) or value (the
declaration's `value`: arcee_fusion's threshold) is resolved, a tie-count round
only where a cut falls inside a run of equal scores spread over several units
(each unit's share of the quota, in unit order), then, where the method has
sums, one round of exact integer sums after the cut. Everything reduced adds exactly, so the
result is the same for any split and worker count. The result, per unit:
resolved[unit]["tensor_stats"] = {"cut": the unit's cut or None, "values": ...}.
"""

from __future__ import annotations

from collections.abc import Generator

from ..engine.exact import CoarseStats
from ..engine.histogram import RankIndex
from ..engine.signed import SignedRankIndex
from ..engine.spec import TensorStatsRequest
from ..planners.inventory import MERGE
from ..planners.plan import Plan
from .stats import GROUP_BYTES, MapFn


def needs_tensor_stats(plan: Plan) -> bool:
    from .. import methods

    decl = methods.combiner(plan.config.merge.method).tensor_stats
    return decl is not None and any(t.split and t.kind == MERGE for t in plan.tensors)


def run_tensor_stats(plan: Plan, map_units: MapFn, resolved: dict) -> None:
    """Add each split tensor's resolved whole-tensor statistics to `resolved`."""
    from ..engine import tensor_stats as TS
    from .worker import merge_spec

    if not needs_tensor_stats(plan):
        return
    decl = TS.declaration(merge_spec(plan))
    # the split tensors by the spec each is merged with (its per-tensor values
    # resolved, worker.merge_spec): one spec per batch, and usually one for all
    by_spec: dict = {}
    for t in plan.tensors:
        if t.kind == MERGE and t.split:
            by_spec.setdefault(merge_spec(plan, t), []).append(t)
    for spec, split in by_spec.items():
        _run_batches(plan, map_units, resolved, decl, spec, split)


def _run_batches(plan: Plan, map_units: MapFn, resolved: dict, decl, spec, split: list) -> None:
    """run_tensor_stats for split tensors merged with one spec."""
    from ..engine import tensor_stats as TS

    per_batch = max(1, (plan.config.runtime.memory_budget // 4) // GROUP_BYTES)

    def request(u: int, kind: str, **kw) -> tuple[int, TensorStatsRequest]:
        ctx = resolved.get(u)
        ctx = {k: v for k, v in ctx.items() if k != "tensor_stats"} if ctx else None
        return u, TensorStatsRequest(kind, resolved=ctx, **kw)

    for i in range(0, len(split), per_batch):
        batch = split[i : i + per_batch]
        owner = {u: t.index for t in batch for u in t.units}
        cuts: dict[int, list[int] | None] = {u: None for u in owner}
        valued: dict[int, dict] = {t.index: {} for t in batch}
        if TS.uses_score(decl, spec) and decl.value is not None:
            _, got = _resolve(
                batch, owner, lambda ix: decl.value(ix, spec), map_units, request, decl.signed
            )
            valued.update(got)
        elif TS.uses_score(decl, spec):
            cuts.update(_resolve_cuts(batch, owner, decl, spec, map_units, request))
        if decl.sums is not None:
            totals: dict[int, list[int]] = {}

            def add_sums(u: int, value, totals=totals, owner=owner) -> None:
                t = owner[u]
                if t in totals:
                    value = [a + b for a, b in zip(totals[t], value, strict=True)]
                totals[t] = value

            items = [
                request(u, "sums", cut=None if cuts[u] is None else tuple(cuts[u])) for u in owner
            ]
            map_units("tensor-sums", items, add_sums)
            for t in batch:
                valued[t.index].update(decl.finish(totals[t.index], t.numel, spec))
        for t in batch:
            for u in t.units:
                resolved.setdefault(u, {})["tensor_stats"] = {
                    "cut": cuts[u],
                    "values": valued[t.index],
                }


def _resolve(batch, owner, make_gen, map_units: MapFn, request, signed: bool = False):
    """The coarse round of each tensor's score, then fine rounds until every
    generator `make_gen(index)` has returned: (index, result) by tensor."""
    coarse: dict[int, CoarseStats] = {}

    def add_coarse(u: int, value) -> None:
        t = owner[u]
        coarse[t] = value if t not in coarse else coarse[t] + value

    map_units("tensor-coarse", [request(u, "coarse") for u in owner], add_coarse)
    kind = SignedRankIndex if signed else RankIndex
    index = {t.index: kind(coarse.pop(t.index)) for t in batch}
    gens: dict[int, Generator] = {t.index: make_gen(index[t.index]) for t in batch}
    pending: dict[int, set[int]] = {}
    result: dict[int, object] = {}

    def advance(t: int, first: bool = False) -> None:
        try:
            pending[t] = next(gens[t]) if first else gens[t].send(None)
        except StopIteration as stop:
            pending.pop(t, None)
            result[t] = stop.value

    for t in gens:
        advance(t, first=True)
    while pending:
        asked = {t: sorted(b) for t, b in pending.items()}

        def add_fine(u: int, value, asked=asked) -> None:
            for b in asked[owner[u]]:
                index[owner[u]].add_fine(b, value[b])

        items = [
            request(u, "fine", buckets=tuple(asked[t])) for u, t in owner.items() if t in asked
        ]
        map_units("tensor-fine", items, add_fine)
        for t in asked:
            advance(t)
    return index, result


def _resolve_cuts(batch, owner, decl, spec, map_units: MapFn, request) -> dict:
    """Each unit's cut of its tensor's score order: [lo_key, lo_quota, hi_key, hi_quota]."""
    from ..engine.tensor_stats import resolve_cut

    index, result = _resolve(
        batch, owner, lambda ix: resolve_cut(ix, decl, spec), map_units, request, decl.signed
    )
    # a cut inside a run of equal scores spread over units: each unit's count of the key
    partial = {
        t: [c for c in result[t] if not c.everything and 0 < c.quota < index[t].count_at(c.key)]
        for t in result
    }
    counts: dict[int, dict[int, int]] = {}
    items = [
        request(u, "ties", keys=tuple(sorted({c.key for c in partial[t]})))
        for u, t in owner.items()
        if partial[t]
    ]
    if items:
        map_units("tensor-ties", items, lambda u, value: counts.__setitem__(u, value))
    out: dict[int, list[int]] = {}
    for tp in batch:
        lo, hi = result[tp.index]
        before = {id(lo): 0, id(hi): 0}
        for u in tp.units:
            shares = []
            for c in (lo, hi):
                if c.everything or c.quota == 0:
                    shares.append(0)
                elif c not in partial[tp.index]:
                    shares.append(c.quota)  # every entry of the key is below the cut
                else:
                    here = counts[u][c.key]
                    shares.append(max(0, min(c.quota - before[id(c)], here)))
                    before[id(c)] += here
            out[u] = [lo.key, shares[0], hi.key, shares[1]]
    return out
