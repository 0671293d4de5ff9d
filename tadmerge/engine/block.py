"""Merge one row block of one tensor: τ_k → Φ → combine.

This is the unit of work every executor runs (in-process or on a Ray worker).
It is a pure function of the input blocks and a small resolved context: the
group statistics that cannot be known from the block alone (cuts of a tensor
split across blocks, global-scope rates, the TIES majority sign of a split
tensor) are passed in; when the block is the whole tensor and the scope is
per tensor, they are computed here from the block itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import combine as C
from .exact import ExactSum, exact_sums
from .histogram import RankIndex, coarse_stats
from .keys import magnitude_keys
from .sparsify import (
    MAGNITUDE_METHODS,
    Selection,
    SparsifySpec,
    apply_selection,
    dare_block,
    della_block,
    resolve_selection,
    run_locally,
    uniform_stream,
)


@dataclass(frozen=True)
class MergeSpec:
    sparsify: SparsifySpec
    method: str  # average | task_arithmetic | ties | emr
    scale: float = 1.0
    disjoint: str = "mean"
    weights: tuple[float, ...] = ()
    seed: int = 0


@dataclass
class BlockContext:
    """Where the block sits and what the group statistics already decided."""

    tensor: str
    shape: tuple[int, ...]
    row_start: int
    row_end: int
    rng_rows: int
    whole: bool
    # per task, a Selection resolved over the whole tensor or the whole task vector
    selections: list[Selection | None] | None = None
    # per task, the block's quotas of ties below the lo and hi cuts
    quotas: list[tuple[int, int]] | None = None
    # per task, TADrop drop rates decided globally (scope: global)
    rates: list[float] | None = None
    majority: int | None = None

    @property
    def row_numel(self) -> int:
        n = 1
        for s in self.shape[1:]:
            n *= s
        return n

    @property
    def della_row(self) -> int:
        """DELLA ranks within rows; 0-d and 1-D tensors are one row."""
        if len(self.shape) <= 1:
            return max(1, self.shape[0] if self.shape else 1)
        return self.row_numel


@dataclass
class TaskStats:
    kept: int = 0
    selection: Selection | None = None  # when the block resolved the whole tensor
    tau: ExactSum | None = None  # Σ over the block, when not known from a selection
    t: ExactSum | None = None


@dataclass
class BlockResult:
    merged: torch.Tensor | None  # float32, None for EMR
    emr: C.EmrBlock | None
    tasks: list[TaskStats] = field(default_factory=list)


def sparsify_task(
    tau: torch.Tensor, k: int, spec: MergeSpec, ctx: BlockContext
) -> tuple[torch.Tensor, TaskStats]:
    sp = spec.sparsify
    if sp.method == "none":
        return tau, TaskStats(kept=tau.numel(), tau=exact_sums(tau, need_abs=False))
    if sp.method in MAGNITUDE_METHODS:
        keys = magnitude_keys(tau)
        given = ctx.selections[k] if ctx.selections else None
        if given is None:
            if not ctx.whole:
                raise RuntimeError(f"{ctx.tensor}: split block without resolved selection")
            index = RankIndex(coarse_stats(keys, with_abs=sp.rescale == "l1"))
            rate = ctx.rates[k] if ctx.rates else None
            sel = run_locally(resolve_selection(index, sp, rate), keys, index)
            t, kept = apply_selection(
                tau, keys, (sel.lo.key, sel.lo.quota), (sel.hi.key, sel.hi.quota), sel.scale
            )
            return t, TaskStats(kept=kept, selection=sel)
        lo_q, hi_q = ctx.quotas[k]
        t, kept = apply_selection(
            tau, keys, (given.lo.key, lo_q), (given.hi.key, hi_q), given.scale
        )
        stats = TaskStats(kept=kept)
        if ctx.whole and given.n == tau.numel():
            stats.selection = given
        else:
            stats.tau = exact_sums(tau, need_abs=False)
            stats.t = exact_sums(t, need_abs=False)
        return t, stats
    u = uniform_stream(
        spec.seed, k, ctx.tensor, ctx.row_start, ctx.row_end, ctx.rng_rows, ctx.row_numel
    )
    if sp.method == "random":
        t, kept = dare_block(tau, u, sp)
    else:
        t, kept = della_block(tau, magnitude_keys(tau), u, ctx.della_row, sp)
    return t, TaskStats(
        kept=kept, tau=exact_sums(tau, need_abs=False), t=exact_sums(t, need_abs=False)
    )


def merge_block(
    base: torch.Tensor, models: list[torch.Tensor], spec: MergeSpec, ctx: BlockContext
) -> BlockResult:
    """Merge one block. `base` and `models` are flat float32 tensors of equal size."""
    sparsify_none = spec.sparsify.method == "none"
    if spec.method == "average" and sparsify_none:
        merged = C.average(models, list(spec.weights))
        return BlockResult(merged, None, [TaskStats(kept=base.numel()) for _ in models])
    ts, stats = [], []
    for k, m in enumerate(models):
        t, st = sparsify_task(m - base, k, spec, ctx)
        ts.append(t)
        stats.append(st)
    w = list(spec.weights)
    if spec.method == "emr":
        return BlockResult(None, C.emr(ts), stats)
    if spec.method == "average":
        merged = C.average_of_deltas(base, ts, w)
    elif spec.method == "task_arithmetic":
        merged = C.task_arithmetic(base, ts, w, spec.scale)
    elif spec.method == "ties":
        merged = C.ties(base, ts, w, spec.scale, spec.disjoint, ctx.majority)
    else:
        raise ValueError(f"unknown merge method {spec.method}")
    return BlockResult(merged, None, stats)


def sparsified_sign_sum(
    base: torch.Tensor, models: list[torch.Tensor], spec: MergeSpec, ctx: BlockContext
) -> int:
    """The block's Σ sign(Σ_k w_k t_k): a stats round for TIES on split tensors."""
    ts = [sparsify_task(m - base, k, spec, ctx)[0] for k, m in enumerate(models)]
    return C.ties_sign_sum(ts, list(spec.weights))
