"""The rounds of a combiner's whole-tensor statistics (methods/registry.py
Combiner.statistics) over the units of its split tensors: every tensor's
generator advances one request at a time, and the pending requests of a batch
of tensors are answered together, one map per kind of round:

- ScoreRequest: a coarse round of the derived score's histograms (the first
  time), then a fine round for the buckets asked for; the generator is sent the
  tensor's RankIndex;
- CutRequest: a fine round for the cut's buckets and, only where a cut falls
  inside a run of equal scores spread over several units, a tie-count round
  (each unit's share of the quota, in unit order); every later request of the
  tensor is answered on the cut t_k;
- SumsRequest: a round of exact sums (engine/sums.py), added and rounded once.
  Segments inside a row ("last") take none: the tensor's blocks compute their
  own, and its generator is dropped here;
- CountRequest: a round of the combiner's integer counts, added.

Each unit is given its sparsifier's resolved context (cluster/stats.py runs
those rounds first), so that it makes its t_k as the merge will. Everything
reduced adds exactly, so the result is the same for any split and worker
count. The result, per unit: resolved[unit]["tensor_stats"] = {"cut": the
unit's cut or None, "values": what the generator returned}.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass

from .. import methods
from ..engine.histogram import RankIndex
from ..engine.signed import SignedRankIndex
from ..engine.spec import CountRequest, CutRequest, ScoreRequest, SumsRequest, UnitRequest
from ..engine.sums import local
from ..planners.inventory import MERGE
from ..planners.plan import Plan, TensorPlan
from .stats import GROUP_BYTES, MapFn, inside_runs, tie_shares

SUMS_SEGMENT_BYTES = 16 * 64 * 6  # a segment's exact sums: hi + lo, ~64 bins, ~6 sums


@dataclass(eq=False)
class _Tensor:
    """One split tensor's generator, its pending request and what it resolved."""

    tp: TensorPlan
    gen: Generator
    request: object = None
    index: RankIndex | None = None
    cuts: dict[int, list[int]] | None = None
    result: object = None
    done: bool = False

    def advance(self, value: object = None, first: bool = False) -> None:
        try:
            self.request = next(self.gen) if first else self.gen.send(value)
        except StopIteration as stop:
            self.done, self.result = True, stop.value


def run_tensor_stats(plan: Plan, map_units: MapFn, resolved: dict) -> None:
    """Add each split tensor's resolved whole-tensor statistics to `resolved`."""
    from .worker import merge_spec

    combiner = methods.combiner(plan.config.merge.method)
    if combiner.statistics is None:
        return
    todo: list[_Tensor] = []
    for tp in plan.tensors:
        if tp.kind != MERGE or not tp.split:
            continue
        # (each tensor's own values: worker.merge_spec resolves them per tensor)
        t = _Tensor(tp, combiner.statistics(merge_spec(plan, tp), tp.shape, tp.name))
        t.advance(first=True)
        if isinstance(t.request, SumsRequest) and local(t.request.layout, tp.shape):
            t.gen.close()  # segments inside a row: each block makes its own
            continue
        todo.append(t)
    # the driver holds each tensor's histograms and sums: in batches that fit a
    # quarter of the budget
    limit = plan.config.runtime.memory_budget // 4
    while todo:
        batch, held = [], 0
        while todo and (not batch or held + _bytes(todo[0].tp, combiner) <= limit):
            held += _bytes(todo[0].tp, combiner)
            batch.append(todo.pop(0))
        while any(not t.done for t in batch):
            _round(batch, map_units, resolved)
        for t in batch:
            data = t.result.to_json() if hasattr(t.result, "to_json") else t.result
            for u in t.tp.units:
                cut = t.cuts[u] if t.cuts else None
                resolved.setdefault(u, {})["tensor_stats"] = {"cut": cut, "values": data}


def _bytes(tp: TensorPlan, combiner) -> int:
    segments = max(1, math.prod(tp.shape[1:])) if len(tp.shape) > 1 else 1
    return SUMS_SEGMENT_BYTES * segments + (GROUP_BYTES if combiner.score else 0)


def _round(batch: list[_Tensor], map_units: MapFn, resolved: dict) -> None:
    """Answer every pending request of the batch once, and advance each generator."""
    pending = [t for t in batch if not t.done]

    def ask(label: str, asks: dict[_Tensor, object], reduce) -> None:
        owner = {u: t for t in asks for u in t.tp.units}
        items = []
        for u, t in owner.items():
            ctx = {k: v for k, v in resolved.get(u, {}).items() if k != "tensor_stats"}
            cut = tuple(t.cuts[u]) if t.cuts else None
            items.append((u, UnitRequest(asks[t], ctx or None, cut)))  # type: ignore[arg-type]
        if items:
            map_units(label, items, lambda u, value: reduce(owner[u], u, value))

    scores = [t for t in pending if not isinstance(t.request, SumsRequest | CountRequest)]
    coarse = {
        t: ScoreRequest(getattr(t.request, "signed", False)) for t in scores if t.index is None
    }
    got: dict[_Tensor, object] = {}  # coarse histograms, then sums or counts: they add

    def add(t: _Tensor, u: int, value) -> None:
        got[t] = got[t] + value if t in got else value

    ask("tensor-coarse", coarse, add)
    for t in coarse:
        t.index = (SignedRankIndex if coarse[t].signed else RankIndex)(got.pop(t))
    fine = {}
    for t in scores:
        r = t.request
        need = set(getattr(r, "buckets", ())) - set(t.index.fine)
        need |= t.index.missing([r.lo, r.hi]) if isinstance(r, CutRequest) else set()
        if need:
            signed = isinstance(t.index, SignedRankIndex)
            fine[t] = ScoreRequest(signed, tuple(sorted(need)))

    def add_fine(t: _Tensor, u: int, value) -> None:
        for b in fine[t].buckets:
            t.index.add_fine(b, value[b])

    ask("tensor-fine", fine, add_fine)
    cuts = [t for t in scores if isinstance(t.request, CutRequest)]
    _cut(cuts, ask)
    sums = {t: t.request for t in pending if isinstance(t.request, SumsRequest | CountRequest)}
    ask("tensor-sums", sums, add)
    for t in pending:
        if t in sums:
            t.advance(got[t].values() if isinstance(t.request, SumsRequest) else got[t])
        else:
            t.advance(None if t in cuts else t.index)


def _cut(batch: list[_Tensor], ask) -> None:
    """Each unit's cut of its tensor's score order: [lo_key, lo_quota, hi_key,
    hi_quota], its share of the ties at each cut key in unit order."""
    cuts = {t: (t.index.cut(t.request.lo), t.index.cut(t.request.hi)) for t in batch}
    inside = {t: inside_runs(cuts[t], t.index) for t in batch}
    counts: dict[int, dict[int, int]] = {}  # a run spread over units: their counts of the key
    keys = {t: ScoreRequest(keys=tuple(sorted({c.key for c in r}))) for t, r in inside.items() if r}
    ask("tensor-ties", keys, lambda t, u, value: counts.update({u: value}))
    for t in batch:
        (lo, hi), units = cuts[t], t.tp.units
        a, b = (tie_shares(c, inside[t], units, lambda u, key: counts[u][key]) for c in (lo, hi))
        t.cuts = {u: [lo.key, x, hi.key, y] for u, x, y in zip(units, a, b, strict=True)}
        t.index = None  # (the requests after it see the cut t_k)
