"""The two stages that run units on the executor: statistics, then apply.

- statistics (`run_stats`): the map/reduce rounds of cluster/stats.py, each a
  `map_stats` over units, counted for the report (`reads`);
- apply (`run_apply`): every unit not already done, through `run_units`. Each
  finished unit is logged for --resume (run/state.py), and its output ranges
  handed to the streaming digests once final. A unit that met NaN/Inf in its
  inputs, or made NaN/Inf from finite inputs (an overflow of the output dtype),
  is not logged: all such units are reported as one InputError once the pass is
  over. Split TIES tensors ran with a provisional majority sign; the few blocks
  whose exactly cancelling votes needed the other sign are rerun here, and only
  then are their ranges final.
"""

from __future__ import annotations

import logging
import os
import time

from ..cluster.progress import Progress
from ..cluster.worker import GroupRecord, UnitRecord, unit_output_range
from ..errors import InputError, InputProblem
from ..io.digest import StreamingDigests
from ..io.model_files import REPORT_NAME
from ..planners.inventory import MERGE
from ..planners.plan import Plan
from .state import RunState

log = logging.getLogger("tadmerge")


def unit_bytes(plan: Plan, unit_id: int) -> int:
    """The input bytes a unit reads (a group: its members')."""
    unit = plan.units[unit_id]
    fast = plan.unit_source_bytes(unit)
    if fast is not None:
        return fast
    total = 0
    for u in plan.members(unit):
        tp = plan.tensors[u.tensor]
        rows = u.row_end - u.row_start
        total += sum(rows * tp.row_numel * e.itemsize for e in tp.sources)
    return total


def output_ranges(plan: Plan, unit_id: int) -> list[tuple[str, int, int]]:
    """The output shards' byte ranges a unit writes, adjacent ranges of a group's
    members joined: (file, start, end)."""
    out: list[tuple[str, int, int]] = []
    for u in plan.members(plan.units[unit_id]):
        where = unit_output_range(plan, u)
        if where is None:
            continue
        if out and out[-1][0] == where[0] and out[-1][2] == where[1]:
            out[-1] = (where[0], out[-1][1], where[2])
        else:
            out.append(where)
    return out


def run_stats(plan: Plan, executor, reads: dict) -> dict:
    """The statistics stage; `reads` counts its rounds and the input bytes they read."""
    if not plan.needs_stats():
        return {}
    t = time.monotonic()

    def counted_map(label: str, items: list, on_result) -> None:
        reads["stats_rounds"] += 1
        reads.setdefault("round_kinds", []).append(label)
        reads["stats_read_bytes"] += sum(unit_bytes(plan, u) for u, _ in items)
        t_round = time.monotonic()
        executor.map_stats(label, items, on_result)
        reads.setdefault("round_seconds", []).append(round(time.monotonic() - t_round, 3))

    from ..cluster.stats import run_stats_stage

    resolved = run_stats_stage(plan, counted_map)
    # one short line whatever the number of rounds: each round's kind and time are
    # in merge_report.json (reads.round_kinds, reads.round_seconds)
    log.info(
        "statistics stage done in %.1fs: %d round(s), read %.2f of the inputs again "
        "(per round: %s reads)",
        time.monotonic() - t,
        reads["stats_rounds"],
        reads["stats_read_bytes"] / max(1, plan.input_bytes),
        REPORT_NAME,
    )
    return resolved


def run_apply(
    plan: Plan,
    executor,
    state: RunState,
    resolved: dict,
    done: dict[int, UnitRecord],
    digests: StreamingDigests,
) -> None:
    """Run every unit not in `done` (the reused ones), adding its record to `done`."""
    # output ranges go to the digests once final: split TIES blocks only after
    # the reruns below, which may rewrite them
    held: set[int] = set()

    def final(unit_id: int, reruns_done: bool = False) -> None:
        tp = plan.tensors[plan.units[unit_id].tensor]
        if not reruns_done and plan.config.merge.method == "ties" and tp.split:
            held.add(unit_id)
        else:
            for where in output_ranges(plan, unit_id):
                digests.final(*where)

    for u in done:
        final(u)
    todo = [u.id for u in plan.units if u.id not in done]
    progress = Progress(
        "merge",
        len(plan.units),
        sum(unit_bytes(plan, u) for u in todo),
        plan.config.runtime.progress,
        reused=len(done),
    )
    nonfinite: dict[tuple[str, str], int] = {}
    overflow: dict[str, int] = {}  # output tensor -> NaN/Inf made by the merge

    def on_done(rec: UnitRecord | GroupRecord) -> None:
        if isinstance(rec, GroupRecord):
            if rec.nonfinite or rec.nonfinite_out:  # (not logged: the merge stops)
                group_nonfinite(plan, rec, nonfinite, overflow)
                return
            state.append(rec)
            rec.figures = None  # (logged: read back from the log for the report)
            done[rec.unit] = rec
            final(rec.unit)
            progress.update(rec.unit, unit_bytes(plan, rec.unit))
            return
        if rec.nonfinite:
            note_nonfinite(plan, rec, nonfinite)
            return
        if rec.nonfinite_out:
            name = plan.tensors[plan.units[rec.unit].tensor].name
            overflow[name] = overflow.get(name, 0) + rec.nonfinite_out
            return
        state.append(rec)
        done[rec.unit] = rec
        final(rec.unit)
        progress.update(rec.unit, unit_bytes(plan, rec.unit))

    try:
        executor.run_units(todo, resolved, on_done)
        if nonfinite or overflow:
            raise nonfinite_error(plan, nonfinite, overflow)
        redo = ties_reruns(plan, done, resolved)
        if redo:
            log.info("TIES: %d block(s) rerun with their tensor's majority sign", len(redo))
            executor.run_units(redo, resolved, on_done)
            if nonfinite or overflow:
                raise nonfinite_error(plan, nonfinite, overflow)
        for u in held:
            final(u, reruns_done=True)
        state.flush()
    finally:
        progress.close()


def ties_reruns(plan: Plan, done: dict[int, UnitRecord], resolved: dict) -> list[int]:
    """Blocks of split TIES tensors that used the wrong provisional majority sign.

    The majority only decides entries whose weighted votes cancel exactly while
    some task moved; blocks without such entries are already right. Fills in
    the final sign in `resolved` for the reruns (and for a later --resume).
    """
    if plan.config.merge.method != "ties":
        return []
    redo = []
    if not plan.any_split_merge():
        return []
    for t in plan.tensors:
        if not (t.split and t.kind == MERGE):
            continue
        votes = sum(done[u].ties[0] for u in t.units)
        majority = -1 if votes < 0 else 1
        for u in t.units:
            _, cancel, used = done[u].ties
            if cancel and used != majority:
                resolved.setdefault(u, {})["majority"] = majority
                redo.append(u)
    return redo


def group_nonfinite(
    plan: Plan, rec: GroupRecord, acc: dict[tuple[str, str], int], overflow: dict[str, int]
) -> None:
    """A group's members that met NaN/Inf, counted as their own units' would be."""
    for t, counts in rec.nonfinite or []:
        note_nonfinite(plan, UnitRecord(rec.unit, [], nonfinite=counts), acc, t)
    for t, n in rec.nonfinite_out or []:
        name = plan.tensors[t].name
        overflow[name] = overflow.get(name, 0) + n


def note_nonfinite(
    plan: Plan, rec: UnitRecord, acc: dict[tuple[str, str], int], tensor: int | None = None
) -> None:
    tp = plan.tensors[plan.units[rec.unit].tensor if tensor is None else tensor]
    for i, n in rec.nonfinite or []:
        file = tp.sources[i].file if i >= 0 else tp.sources[-1].file
        acc[(file, tp.name)] = acc.get((file, tp.name), 0) + n


def nonfinite_error(
    plan: Plan, inputs: dict[tuple[str, str], int], outputs: dict[str, int]
) -> InputError:
    """NaN/Inf in the inputs (per file and tensor), and NaN/Inf that the merge
    made from finite inputs (per output tensor): one error."""
    hint = "(set inputs.allow_nonfinite: true to merge anyway)"
    problems = [
        InputProblem(f, t, f"{n} NaN/Inf value(s) {hint}") for (f, t), n in sorted(inputs.items())
    ]
    for name, n in sorted(outputs.items()):
        tp = next(t for t in plan.tensors if t.name == name)  # (an error: once)
        where = plan.shard_of(name)
        file = os.path.join(plan.config.output.path, where[0] if where else "")
        problems.append(
            InputProblem(
                file,
                name,
                f"{n} NaN/Inf value(s) in the merged {tp.out_dtype} output: the merged values "
                f"overflow {tp.out_dtype} (likely merge.scale or a model's weight too large, "
                "or an output dtype narrower than the values) (set inputs.allow_nonfinite: "
                "true to publish anyway)",
            )
        )
    return InputError(problems)
