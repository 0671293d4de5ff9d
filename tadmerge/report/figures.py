"""Per-tensor, per-task figures of a merge (SPEC section 7), from unit records.

These feed merge_report.json and the drop-rate plots (report/plots.py).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..planners.inventory import MERGE

if TYPE_CHECKING:
    from ..engine.exact import ExactSum
    from ..engine.selection import Selection


def tensor_report(plan, done: dict, resolved: dict) -> tuple[dict, dict]:
    """(tensors section of the report, EMR section or {})."""
    from .. import methods

    cfg = plan.config
    names = cfg.task_names
    declared = set(methods.sparsifier(cfg.sparsify.method).report_fields)
    declared |= set(methods.combiner(cfg.merge.method).report_fields)
    k_tasks = len(names)
    out: dict = {}
    emr_abs_t = [[0.0] * 0 for _ in range(k_tasks)]  # per task: list of per-tensor means
    emr_abs_uni = [[0.0] * 0 for _ in range(k_tasks)]
    for t in plan.tensors:
        entry: dict = {"kind": t.kind, "shape": list(t.shape), "n": t.numel, "dtype": t.dtype}
        if t.kind != MERGE:
            entry["reason"] = t.reason
            out[t.name] = entry
            continue
        entry["units"] = len(t.units)
        recs = [done[u] for u in t.units]
        tasks: dict = {}
        for k in range(k_tasks):
            sel = _selection_for(t, k, recs, resolved)
            kept = sum(r.tasks[k].kept for r in recs)
            fig: dict = {"n": t.numel, "kept": kept}
            whole = sel is not None and sel.n == t.numel
            if "q_low" in declared:
                fig["q_low"] = sel.q_low if whole else None
                fig["q_high"] = sel.q_high if whole else None
            fig["drop_rate"] = (
                sel.drop_rate if whole else (1.0 - kept / t.numel if t.numel else 0.0)
            )
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
        out[t.name] = entry
    emr: dict = {}
    if plan.is_emr:
        from ..methods.emr import rescalers

        emr = {"rescalers": dict(zip(names, rescalers(emr_abs_t, emr_abs_uni), strict=True))}
    return out, emr


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
