"""The statistics stage: exact group statistics as rounds of map and reduce.

Needed only when a magnitude selection spans more than one unit: a tensor split
into several row blocks (tensor scope), or the whole task vector (scope:
global). Each round maps a request over units (an executor runs it anywhere)
and reduces small results by addition:

1. coarse: per unit and task, the coarse histogram (with exact moments when
   the rescale needs them) and, for a split tensor, the block's keys with low
   bits set when they are few (histogram.KeysAside: bf16 task vectors);
2. fine (until every resolver is done; usually once): the fine histograms of
   the buckets that the resolvers (engine/selection.py generators) ask for. A
   group whose every unit set its keys aside takes none: the driver makes its
   fine histograms from those keys and the counts;
3. ties: a cut that falls inside a run of equal |τ| spread over several
   blocks gives each block its share of the ties in flat-index order, from each
   block's count of the cut key. The driver keeps every block's fine
   histograms from round 2 (sparse: a few hundred bins per bucket for bf16
   task vectors), which hold those counts, so this round runs only when they
   did not fit PER_UNIT_SHARE of the memory budget.

The driver's memory is bounded: nothing is kept per unit, and split tensors are
resolved in batches whose histograms fit a quarter of the memory budget. The
TIES majority sign of a split tensor needs no round at all: blocks are merged
with a provisional sign and report their votes, and the driver reruns only the
blocks whose exactly-cancelling votes needed the other sign (run/stages.py).

A combiner's whole-tensor statistics of its split tensors (score cuts and
quantiles, exact sums: methods/registry.py Combiner.statistics) come after
these rounds, given their result: cluster/tensor_stats.py.

The result is a small per-unit context handed to engine.block.merge_block; it
is saved in the staging directory for --resume.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import asdict

from ..engine.exact import CoarseStats
from ..engine.histogram import Cut, KeysAside, RankIndex, SparseFine
from ..engine.keys import COARSE_SHIFT
from ..engine.selection import PREDICTED_BUCKETS, Selection, resolve_selection, tadrop_rate
from ..engine.spec import CoarseRequest, FineRequest, StatsRequest, TieCountRequest
from ..planners.inventory import MERGE
from ..planners.plan import Plan

# An executor's map: (label, [(unit_id, request)], on_result(unit_id, result))
MapFn = Callable[[str, list[tuple[int, StatsRequest]], Callable[[int, object], None]], None]
GROUP_BYTES = (4 + 2 * (PREDICTED_BUCKETS + 4)) * 2**18  # coarse arrays + fine histograms
PER_UNIT_SHARE = 16  # per-unit fine histograms kept for the tie counts: budget / 16
SPARSE_BIN_BYTES = 16  # one bin of a SparseFine: int64 bin + int64 count


def run_stats_stage(plan: Plan, map_units: MapFn) -> dict:
    """Resolve every group statistic; returns {unit_id: resolved context}."""
    cfg = plan.config
    sp = cfg.sparsify
    k_tasks = len(cfg.models)
    merge_tensors = [t for t in plan.tensors if t.kind == MERGE]
    split = [t for t in merge_tensors if t.split]
    resolved: dict = {}
    if not plan.needs_stats():
        return resolved
    rates = None
    global_sel: dict[int, Selection] = {}
    quotas: dict[tuple, dict[int, tuple[int, int]]] = {}
    if plan.global_scope:
        all_units = [u for t in merge_tensors for u in t.units]
        groups = {("g", k): all_units for k in range(k_tasks)}
        results = _resolve(plan, groups, map_units, global_rate=sp.method == "tadrop")
        if sp.method == "tadrop":
            rates = [results[("g", k)][0] for k in range(k_tasks)]
        else:
            global_sel = {k: results[("g", k)] for k in range(k_tasks)}
            quotas.update({g: results[("quota", g)] for g in groups})
        resolved["_global"] = {
            "groups": {str(k): _group_summary(results[("g", k)]) for k in range(k_tasks)}
        }

    tensor_sel: dict[tuple[int, int], Selection] = {}
    if split and plan.magnitude_stats and (sp.scope == "tensor" or sp.method == "tadrop"):
        per_batch = max(1, (cfg.runtime.memory_budget // 4) // (GROUP_BYTES * k_tasks))
        for i in range(0, len(split), per_batch):
            batch = split[i : i + per_batch]
            groups = {("t", t.index, k): list(t.units) for t in batch for k in range(k_tasks)}
            results = _resolve(plan, groups, map_units, rates=rates, aside=True)
            for g in groups:
                tensor_sel[(g[1], g[2])] = results[g]
                quotas[g] = results[("quota", g)]

    for t in merge_tensors:
        for u in t.units:
            ctx: dict = {}
            if rates is not None:
                ctx["rates"] = rates
            sels: list[Selection | None] = [None] * k_tasks
            qs: list[tuple[int, int]] = [(0, 0)] * k_tasks
            for k in range(k_tasks):
                if (t.index, k) in tensor_sel:
                    sels[k] = tensor_sel[(t.index, k)]
                    qs[k] = quotas[("t", t.index, k)][u]
                elif k in global_sel:
                    sels[k] = global_sel[k]
                    qs[k] = quotas[("g", k)][u]
            if any(s is not None for s in sels):
                ctx["selections"] = sels
                ctx["quotas"] = qs
            if ctx:
                resolved[u] = ctx
    # a combiner's whole-tensor statistics, given the sparsifier's (cluster/tensor_stats.py)
    from .tensor_stats import run_tensor_stats

    run_tensor_stats(plan, map_units, resolved)
    return resolved


def _group_summary(val: object) -> dict:
    if isinstance(val, Selection):
        return {"n": val.n, "drop_rate": val.drop_rate, "kept": val.kept, "scale": val.scale}
    d, qa, qb = val  # type: ignore[misc]
    return {"drop_rate": d, "q_low": qa, "q_high": qb}


def _resolve(
    plan: Plan,
    groups: dict[tuple, list[int]],
    map_units: MapFn,
    *,
    global_rate: bool = False,
    rates: list[float] | None = None,
    aside: bool = False,
) -> dict:
    """Resolve the given groups: coarse round, fine rounds, then tie counts.

    `aside`: the units also return their keys set aside (histogram.KeysAside,
    bf16 task vectors), from which the driver makes the fine histograms of the
    groups whose every unit had them: no fine round for those. They are kept
    while they fit PER_UNIT_SHARE of the memory budget, like PerUnitFine.
    """
    sp = plan.config.sparsify
    unit_groups: dict[int, list[tuple]] = {}
    for g, units in groups.items():
        for u in units:
            unit_groups.setdefault(u, []).append(g)

    coarse: dict[tuple, CoarseStats] = {}
    asides = AsideKeys(groups if aside else {}, plan.config.runtime.memory_budget // PER_UNIT_SHARE)

    def add_coarse(unit_id: int, value: object) -> None:
        for g in unit_groups[unit_id]:
            st, keys_aside = value[g[-1]]  # type: ignore[index]
            coarse[g] = coarse[g] + st if g in coarse else st
            asides.add(g, unit_id, keys_aside)

    items = [(u, CoarseRequest(sp.moments, aside)) for u in sorted(unit_groups)]
    map_units("coarse", items, add_coarse)
    index = {g: RankIndex(coarse.pop(g)) for g in groups}

    gens: dict[tuple, Generator] = {}
    for g in groups:
        task_sp = _group_sparsify(plan, g).for_task(g[-1])
        if global_rate:
            gens[g] = tadrop_rate(index[g], task_sp)
        else:
            rate = rates[g[-1]] if rates is not None else None
            gens[g] = resolve_selection(index[g], task_sp, rate)
    results: dict = {}
    pending: dict[tuple, set[int]] = {}
    # each unit's own fine histograms, for the tie counts: {(group, bucket): {unit: hist}}
    per_unit = PerUnitFine(plan.config.runtime.memory_budget // PER_UNIT_SHARE)

    def advance(g: tuple, first: bool = False) -> None:
        try:
            pending[g] = next(gens[g]) if first else gens[g].send(None)
        except StopIteration as stop:
            pending.pop(g, None)
            results[g] = stop.value
            if not isinstance(stop.value, Selection):
                index.pop(g, None)  # a rate: the histograms are no longer needed

    for g in groups:
        advance(g, first=True)

    while pending:
        served = [g for g in pending if asides.complete(g)]
        for g in served:  # from the keys the units set aside: no round
            for b in pending[g]:
                for u in groups[g]:
                    hist = asides.fine(g, u, b)
                    index[g].add_fine(b, hist)
                    per_unit.add(g, b, u, hist)
        for g in served:
            advance(g)
        if served:
            continue
        wanted: dict[int, dict[int, set[int]]] = {}
        for g, buckets in pending.items():
            for u in groups[g]:
                wanted.setdefault(u, {}).setdefault(g[-1], set()).update(buckets)
        asked = {g: set(b) for g, b in pending.items()}

        def add_fine(unit_id: int, value: object, asked: dict = asked) -> None:
            for k, hists in value.items():  # type: ignore[union-attr]
                for g in unit_groups[unit_id]:
                    if g[-1] == k and g in asked:
                        for b in asked[g]:
                            index[g].add_fine(b, hists[b])
                            per_unit.add(g, b, unit_id, hists[b])

        items = [
            (u, FineRequest({k: sorted(b) for k, b in per_task.items()}))
            for u, per_task in sorted(wanted.items())
        ]
        map_units("fine", items, add_fine)
        for g in list(asked):
            advance(g)

    _tie_quotas(groups, index, results, map_units, per_unit)
    return results


def _group_sparsify(plan: Plan, g: tuple):
    """The sparsify spec of a group: a tensor's ("t", index, task) resolved for
    that tensor (cluster/worker.py merge_spec, as its blocks are given it); the
    whole task vector's ("g", task) the config's, whose values are one number
    for every tensor (config.py refuses per-tensor values with scope global)."""
    if g[0] == "t":
        from .worker import merge_spec

        return merge_spec(plan, plan.tensors[g[1]]).sparsify
    return plan.config.sparsify


class AsideKeys:
    """Each unit's KeysAside per group, while all of a group's units have them and
    they fit `limit` bytes: a group whose keys would not fit is dropped (its
    fine histograms then come from rounds), the others keep theirs."""

    def __init__(self, groups: dict[tuple, list[int]], limit: int):
        self.limit = limit
        self.bytes = 0
        self.units = {g: len(units) for g, units in groups.items()}
        self.keys: dict[tuple, dict[int, KeysAside] | None] = {g: {} for g in groups}

    def add(self, g: tuple, unit_id: int, keys: KeysAside | None) -> None:
        held = self.keys.get(g)
        if held is None:
            return
        # this unit's keys were not sparse, or would not fit: the group takes rounds
        if keys is None or self.bytes + keys.nbytes > self.limit:
            self.bytes -= sum(k.nbytes for k in held.values())
            self.keys[g] = None
            return
        self.bytes += keys.nbytes
        held[unit_id] = keys

    def complete(self, g: tuple) -> bool:
        held = self.keys.get(g)
        return held is not None and len(held) == self.units[g]

    def fine(self, g: tuple, unit_id: int, bucket: int) -> SparseFine:
        return self.keys[g][unit_id].fine(bucket)  # type: ignore[index]


class PerUnitFine:
    """Each unit's fine histograms of its groups' buckets, while they fit `limit` bytes.

    Past the limit all are dropped at once (and the tie round counts instead):
    a group's counts are only of use when every unit's histogram is there.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.bytes = 0
        self.dropped = False
        self.hists: dict[tuple, dict[int, SparseFine]] = {}

    def add(self, g: tuple, bucket: int, unit_id: int, hist: SparseFine) -> None:
        if self.dropped:
            return
        self.bytes += SPARSE_BIN_BYTES * hist.bins.size
        if self.bytes > self.limit:
            self.dropped = True
            self.hists.clear()
            return
        self.hists.setdefault((g, bucket), {})[unit_id] = hist

    def count(self, g: tuple, key: int, unit_id: int) -> int | None:
        """The unit's count of `key`, or None when its histogram was not kept."""
        hist = self.hists.get((g, key >> COARSE_SHIFT), {}).get(unit_id)
        return None if hist is None else hist.count_at(key & 0xFFFF)


def _tie_quotas(
    groups: dict, index: dict, results: dict, map_units: MapFn, per_unit: PerUnitFine
) -> None:
    """Each unit's share of the ties at every cut, in the group's unit order.

    A cut whose quota is 0 or all of its key's entries needs no counting; only a
    cut inside a run of ties needs each unit's count of that key: from the kept
    per-unit fine histograms, or else from a round that asks the units.
    """
    partial: dict[tuple, list[Cut]] = {}
    for g in groups:
        sel = results.get(g)
        if isinstance(sel, Selection) and (inside := inside_runs((sel.lo, sel.hi), index[g])):
            partial[g] = inside
    counts: dict[tuple[int, int, int], int] = {}  # (unit, task, key) -> count
    wanted: dict[int, dict[int, set[int]]] = {}
    for g, cuts in partial.items():
        for u in groups[g]:
            for c in cuts:
                here = per_unit.count(g, c.key, u)
                if here is None:
                    wanted.setdefault(u, {}).setdefault(g[-1], set()).add(c.key)
                else:
                    counts[(u, g[-1], c.key)] = here
    if wanted:

        def add_counts(unit_id: int, value: object) -> None:
            for k, per_key in value.items():  # type: ignore[union-attr]
                for key, n in per_key.items():
                    counts[(unit_id, k, key)] = n

        items = [
            (u, TieCountRequest({k: sorted(keys) for k, keys in per_task.items()}))
            for u, per_task in sorted(wanted.items())
        ]
        map_units("ties", items, add_counts)
    for g in groups:
        sel = results.get(g)
        if not isinstance(sel, Selection):
            continue
        count = lambda u, key, k=g[-1]: counts[(u, k, key)]  # noqa: E731
        lo, hi = (tie_shares(c, partial.get(g, []), groups[g], count) for c in (sel.lo, sel.hi))
        results[("quota", g)] = dict(zip(groups[g], zip(lo, hi, strict=True), strict=True))
        index.pop(g, None)


def inside_runs(cuts: tuple[Cut, ...], index: RankIndex) -> list[Cut]:
    """The cuts that fall inside a run of equal keys (which may be spread over units)."""
    return [c for c in cuts if not c.everything and 0 < c.quota < index.count_at(c.key)]


def tie_shares(cut: Cut, inside: list[Cut], units: list[int], count) -> list[int]:
    """Each unit's share of `cut`'s quota of ties, in unit order: all of it where
    the cut takes every entry of its key (below_cut slices at most what a unit
    has), else handed out over the units' counts of the key (`count(unit, key)`)."""
    if cut.everything or cut.quota == 0 or cut not in inside:
        return [0 if cut.everything else cut.quota] * len(units)
    shares, before = [], 0
    for u in units:
        here = count(u, cut.key)
        shares.append(max(0, min(cut.quota - before, here)))
        before += here
    return shares


# ------------------------------------------------------------------------------------
# persistence for --resume
# ------------------------------------------------------------------------------------


def resolved_to_json(resolved: dict) -> dict:
    out = {}
    for u, ctx in resolved.items():
        c = dict(ctx)
        if c.get("selections") is not None:
            c["selections"] = [None if s is None else asdict(s) for s in c["selections"]]
        if c.get("quotas") is not None:
            c["quotas"] = [list(q) for q in c["quotas"]]
        out[str(u)] = c
    return out


def resolved_from_json(doc: dict) -> dict:
    out: dict = {}
    for u, c in doc.items():
        c = dict(c)
        if c.get("selections") is not None:
            c["selections"] = [
                None
                if s is None
                else Selection(**{**s, "lo": Cut(**s["lo"]), "hi": Cut(**s["hi"])})
                for s in c["selections"]
            ]
        if c.get("quotas") is not None:
            c["quotas"] = [tuple(q) for q in c["quotas"]]
        out[u if u == "_global" else int(u)] = c
    return out
