"""The statistics stage: exact group statistics as rounds of map and reduce.

Needed only when a selection spans more than one unit: a tensor split into
several row blocks (tensor scope), or the whole task vector (scope: global),
Each round maps a request over
units (an executor runs it anywhere) and reduces small results by addition:

1. coarse: per unit and task, the coarse histogram with exact Σx² per bucket;
2. fine (repeated until every resolver is done): the fine histograms of the
   buckets that the resolvers (engine/sparsify.py generators) still ask for;
   per-unit fine counts at each final cut give every unit its share of ties;
The TIES majority sign of a split tensor needs no round: blocks are merged with
a provisional sign and report their votes; the driver reruns only the blocks
whose exactly-cancelling votes needed the other sign (cluster/driver.py).

The result is a small per-unit context that the apply stage hands to
engine.block.merge_block; it is saved in the staging directory for --resume.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import asdict

from ..engine.exact import CoarseStats
from ..engine.histogram import Cut, RankIndex, SparseFine
from ..engine.sparsify import Selection, resolve_selection, tadrop_rate
from ..planners.inventory import MERGE
from ..planners.plan import Plan

# An executor's map: (request kind label, [(unit_id, request)], on_result(unit_id, result))
MapFn = Callable[[str, list[tuple[int, tuple]], Callable[[int, object], None]], None]


def run_stats_stage(plan: Plan, map_units: MapFn) -> dict[int, dict]:
    """Resolve every group statistic; returns {unit_id: resolved context}."""
    cfg = plan.config
    sp = cfg.sparsify
    k_tasks = len(cfg.models)
    merge_tensors = [t for t in plan.tensors if t.kind == MERGE]
    split = [t for t in merge_tensors if t.split]
    resolved: dict[int, dict] = {}
    if not plan.needs_stats():
        return resolved

    groups: dict[tuple, list[int]] = {}  # group -> ordered unit ids
    if plan.global_scope:
        all_units = [u for t in merge_tensors for u in t.units]
        for k in range(k_tasks):
            groups[("g", k)] = all_units
    per_tensor_groups = plan.magnitude_stats and (sp.scope == "tensor" or sp.method == "tadrop")
    if per_tensor_groups:
        for t in split:
            for k in range(k_tasks):
                groups[("t", t.index, k)] = list(t.units)

    if groups:
        results = _resolve_groups(plan, groups, map_units)
        rates = None
        if plan.global_scope and sp.method == "tadrop":
            rates = [results[("g", k)][0] for k in range(k_tasks)]
        for t in merge_tensors:
            for u in t.units:
                ctx: dict = {}
                if rates is not None:
                    ctx["rates"] = rates
                sels: list[Selection | None] = [None] * k_tasks
                quotas: list[tuple[int, int]] = [(0, 0)] * k_tasks
                for k in range(k_tasks):
                    g = ("t", t.index, k) if ("t", t.index, k) in results else ("g", k)
                    val = results.get(g)
                    if isinstance(val, Selection):
                        sels[k] = val
                        quotas[k] = results[("quota", g)][u]
                if any(s is not None for s in sels):
                    ctx["selections"] = sels
                    ctx["quotas"] = quotas
                if ctx:
                    resolved[u] = ctx
        resolved["_global"] = {  # type: ignore[index]
            "groups": {
                str(k): _group_summary(results[("g", k)])
                for k in range(k_tasks)
                if ("g", k) in results
            }
        }

    return resolved


def _group_summary(val: object) -> dict:
    if isinstance(val, Selection):
        return {"n": val.n, "drop_rate": val.drop_rate, "kept": val.kept, "scale": val.scale}
    d, qa, qb = val  # type: ignore[misc]
    return {"drop_rate": d, "q_low": qa, "q_high": qb}


def _resolve_groups(plan: Plan, groups: dict[tuple, list[int]], map_units: MapFn) -> dict:
    sp = plan.config.sparsify
    unit_groups: dict[int, list[tuple]] = {}
    for g, units in groups.items():
        for u in units:
            unit_groups.setdefault(u, []).append(g)

    # round 1: coarse histograms
    coarse: dict[tuple, CoarseStats] = {}

    def add_coarse(unit_id: int, value: object) -> None:
        for g in unit_groups[unit_id]:
            k = g[-1]
            st = value[k]  # type: ignore[index]
            coarse[g] = coarse[g] + st if g in coarse else st

    items = [(u, ("coarse", sp.moments)) for u in sorted(unit_groups)]
    map_units("coarse", items, add_coarse)
    index = {g: RankIndex(coarse.pop(g)) for g in groups}

    # resolvers
    gens: dict[tuple, Generator] = {}
    results: dict = {}
    pending: dict[tuple, set[int]] = {}

    def start(g: tuple) -> None:
        if g[0] == "g" and sp.method == "tadrop":
            gens[g] = tadrop_rate(index[g], sp)
        elif g[0] == "t" and sp.scope == "global":
            return  # started once its task's global rate is known
        else:
            gens[g] = resolve_selection(index[g], sp)
        advance(g, first=True)

    def advance(g: tuple, first: bool = False) -> None:
        try:
            pending[g] = next(gens[g]) if first else gens[g].send(None)
        except StopIteration as stop:
            pending.pop(g, None)
            results[g] = stop.value
            if g[0] == "g" and sp.method == "tadrop":
                rate = stop.value[0]
                for h in groups:
                    if h[0] == "t" and h[-1] == g[1]:
                        gens[h] = resolve_selection(index[h], sp, rate)
                        advance(h, first=True)

    for g in groups:
        start(g)

    unit_fine: dict[tuple[int, int], dict[int, SparseFine]] = {}
    while pending:
        wanted: dict[int, dict[int, set[int]]] = {}
        for g, buckets in pending.items():
            for u in groups[g]:
                wanted.setdefault(u, {}).setdefault(g[-1], set()).update(buckets)
        asked = {g: set(b) for g, b in pending.items()}

        def add_fine(unit_id: int, value: object, asked: dict = asked) -> None:
            for k, hists in value.items():  # type: ignore[union-attr]
                unit_fine.setdefault((unit_id, k), {}).update(hists)
                for g in unit_groups[unit_id]:
                    if g[-1] != k or g not in asked:
                        continue
                    for b in asked[g]:
                        index[g].add_fine(b, hists[b])

        items = [
            (u, ("fine", {k: sorted(b) for k, b in per_task.items()}))
            for u, per_task in sorted(wanted.items())
        ]
        map_units("fine", items, add_fine)
        for g in list(asked):
            advance(g)

    # per-unit quotas of ties at each cut, in the group's unit order
    for g, val in list(results.items()):
        if not isinstance(val, Selection):
            continue
        k = g[-1]
        per_unit: dict[int, list[int]] = {u: [0, 0] for u in groups[g]}
        for side, cut in enumerate((val.lo, val.hi)):
            if cut.everything or cut.quota == 0:
                continue
            before = 0
            b, j = cut.key >> 16, cut.key & 0xFFFF
            for u in groups[g]:
                here = unit_fine[(u, k)][b].count_at(j)
                per_unit[u][side] = max(0, min(cut.quota - before, here))
                before += here
        results[("quota", g)] = {u: (q[0], q[1]) for u, q in per_unit.items()}
    return results


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
