"""Per-tensor, per-task figures of a merge (SPEC section 7), from unit records.

These feed merge_report.json and the drop-rate plots (report/plots.py).
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, NamedTuple

from ..planners.inventory import MERGE

if TYPE_CHECKING:
    from ..engine.exact import ExactSum
    from ..engine.selection import Selection


def tensor_report(plan, done: dict, resolved: dict, log_path: str | None = None):
    """(tensors section of the report, EMR section or {}).

    With groups of small whole tensors (GroupRecord: their figures are in the
    resume log at `log_path`), the section is a TensorSection, made entry by
    entry as it is read or written (run/outputs.write_report streams it), never
    held whole: a million tensors' entries cost ~1 KB each as dicts."""
    from ..cluster.worker import GroupRecord

    if any(isinstance(r, GroupRecord) for r in done.values()):
        assert log_path is not None and not plan.is_emr
        return TensorSection(plan, done, resolved, log_path), {}
    names = plan.config.task_names
    declared = _declared(plan)
    k_tasks = len(names)
    out: dict = {}
    emr_abs_t = [[0.0] * 0 for _ in range(k_tasks)]  # per task: list of per-tensor means
    emr_abs_uni = [[0.0] * 0 for _ in range(k_tasks)]
    for t in plan.tensors:
        recs = [done[u] for u in t.units] if t.kind == MERGE else []
        out[t.name] = tensor_entry(t, recs, resolved, declared, names, emr_abs_t, emr_abs_uni)
    emr: dict = {}
    if plan.is_emr:
        from ..methods.emr import rescalers

        emr = {"rescalers": dict(zip(names, rescalers(emr_abs_t, emr_abs_uni), strict=True))}
    return out, emr


def _declared(plan) -> set[str]:
    from .. import methods

    cfg = plan.config
    declared = set(methods.sparsifier(cfg.sparsify.method).report_fields)
    return declared | set(methods.combiner(cfg.merge.method).report_fields)


def tensor_entry(
    t, recs: list, resolved: dict, declared: set[str], names: list[str], emr_abs_t=None,
    emr_abs_uni=None,
) -> dict:  # fmt: skip
    """One tensor's entry of the report, from the records of its units."""
    entry: dict = {"kind": t.kind, "shape": list(t.shape), "n": t.numel, "dtype": t.dtype}
    if t.kind != MERGE:
        entry["reason"] = t.reason
        return entry
    entry["units"] = len(t.units)
    tasks: dict = {}
    for k in range(len(names)):
        sel = _selection_for(t, k, recs, resolved)
        kept = sum(r.tasks[k].kept for r in recs)
        fig: dict = {"n": t.numel, "kept": kept}
        whole = sel is not None and sel.n == t.numel
        if "q_low" in declared:
            fig["q_low"] = sel.q_low if whole else None
            fig["q_high"] = sel.q_high if whole else None
        fig["drop_rate"] = sel.drop_rate if whole else (1.0 - kept / t.numel if t.numel else 0.0)
        if "scale" in declared:
            fig["scale"] = sel.scale if whole else None
        if whole and sel.tau_sq is not None:  # the tensor's exact moments
            fig["norm"] = sel.tau_sq**0.5
            fig["norm_after"] = sel.t_sq**0.5
        else:  # the blocks' own sums (float32 passes)
            fig["norm"] = math.fsum(r.tasks[k].tau_sq for r in recs) ** 0.5
            fig["norm_after"] = math.fsum(r.tasks[k].t_sq for r in recs) ** 0.5
        if "mean_abs_t" in declared:
            a = _sum(r.emr_abs_t[k] for r in recs)
            b = _sum(r.emr_abs_uni[k] for r in recs)
            fig["mean_abs_t"] = a.abs_sum / t.numel
            fig["mean_abs_masked_uni"] = b.abs_sum / t.numel
            emr_abs_t[k].append(fig["mean_abs_t"])
            emr_abs_uni[k].append(fig["mean_abs_masked_uni"])
        tasks[names[k]] = fig
    entry["tasks"] = tasks
    return entry


class _Sel(NamedTuple):  # a member's selection, as task_figures packed it
    n: int
    q_low: float | None
    q_high: float | None
    drop_rate: float
    scale: float
    tau_sq: float | None
    t_sq: float | None


class _Task(NamedTuple):  # a member's TaskStats, as task_figures packed it
    kept: int
    tau_sq: float
    t_sq: float
    selection: _Sel | None


class _Member(NamedTuple):  # the record a member would have had as a unit of its own
    tasks: list


def member_record(figures: list) -> _Member:
    """A group member's record from its figures (cluster/worker.task_figures)."""
    return _Member([_Task(k, a, b, None if s is None else _Sel(*s)) for k, a, b, s in figures])


class TensorSection(Mapping):
    """The report's tensors of a plan with groups, made one entry at a time: a
    group's figures are read from its line of the resume log when one of its
    members is asked for (in order, once per group)."""

    def __init__(self, plan, done: dict, resolved: dict, log_path: str) -> None:
        self.plan = plan
        self.done = done
        self.resolved = resolved
        self.log_path = log_path
        self._declared = _declared(plan)
        self._group: tuple[int, list] | None = None  # (unit, its figures)

    def __len__(self) -> int:
        return len(self.plan.tensors)

    def __iter__(self) -> Iterator[str]:
        return (t.name for t in self.plan.tensors)

    def __getitem__(self, name: str) -> dict:
        names = getattr(self.plan.tensors, "names", None)
        if names is not None:
            i = bisect.bisect_left(names, name)
            if i < len(names) and names[i] == name:
                return self._entry(self.plan.tensors[i])
            raise KeyError(name)
        for t in self.plan.tensors:
            if t.name == name:
                return self._entry(t)
        raise KeyError(name)

    def items(self) -> Iterator[tuple[str, dict]]:  # type: ignore[override]
        return ((t.name, self._entry(t)) for t in self.plan.tensors)

    def values(self) -> Iterator[dict]:  # type: ignore[override]
        return (self._entry(t) for t in self.plan.tensors)

    def _entry(self, t) -> dict:
        from ..cluster.worker import GroupRecord

        names = self.plan.config.task_names
        recs: list = []
        if t.kind == MERGE:
            rec = self.done[t.units[0]]
            if isinstance(rec, GroupRecord):
                if self._group is None or self._group[0] != rec.unit:
                    from ..run.unit_log import read_group_figures

                    self._group = (rec.unit, read_group_figures(self.log_path, rec))
                recs = [member_record(self._group[1][t.index - rec.first])]
            else:
                recs = [self.done[u] for u in t.units]
        return tensor_entry(t, recs, self.resolved, self._declared, names)


class TensorsOnDisk(Mapping):
    """The tensors section of a published merge_report.json, read on first use
    (a merge of very many tensors returns this instead of holding them)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._doc: dict | None = None

    def _load(self) -> dict:
        if self._doc is None:
            with open(self.path) as f:
                self._doc = json.load(f)["tensors"]
        return self._doc

    def __len__(self) -> int:
        return len(self._load())

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __getitem__(self, name: str) -> dict:
        return self._load()[name]


def _selection_for(t, k: int, recs: list, resolved: dict) -> Selection | None:
    if len(recs) == 1 and recs[0].tasks[k].selection is not None:
        return recs[0].tasks[k].selection
    ctx = resolved.get(t.units[0]) or {}
    sels = ctx.get("selections")
    return sels[k] if sels else None


def _sum(items) -> ExactSum | None:
    total = None
    for s in items:
        if s is None:
            return None
        total = s if total is None else total + s
    return total
