"""Merge one row block of one tensor: τ_k → Φ → combine.

This is the unit of work every executor runs (in-process or on a Ray worker).
It is a pure function of the input blocks and a small resolved context: the
group statistics that cannot be known from the block alone (cuts of a tensor
split across blocks, global-scope rates, the TIES majority sign of a split
tensor) are passed in; when the block is the whole tensor and the scope is
per tensor, they are computed here from the block itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from . import combine as C
from .exact import coarse_stats
from .histogram import RankIndex
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


class NonFiniteTaskVector(ValueError):
    """τ_k of this block holds NaN or Inf (the worker names the files)."""

    def __init__(self, task: int):
        super().__init__(task)
        self.task = task


@dataclass
class TaskStats:
    """What one block tells the report about one task (SPEC section 7)."""

    kept: int = 0
    selection: Selection | None = None  # when the block resolved the whole tensor
    tau_sq: float = 0.0  # Σ τ² of the block, float64 (report only)
    t_sq: float = 0.0  # Σ t² of the block, float64 (report only)


def _sq(x: torch.Tensor) -> float:
    """Σx² for the report (float32 accumulation: one fast pass, not exact).

    A non-finite result means NaN/Inf in x, or squares beyond float32's range:
    the latter is told apart with isfinite (and then summed in float64).
    """
    if not x.numel():
        return 0.0
    v = float(torch.linalg.vector_norm(x)) ** 2
    if not math.isfinite(v) and bool(torch.isfinite(x).all()):
        v = float(torch.linalg.vector_norm(x, dtype=torch.float64)) ** 2
    return v


@dataclass
class BlockResult:
    merged: torch.Tensor | None  # float32, None for EMR
    emr: C.EmrBlock | None
    tasks: list[TaskStats] = field(default_factory=list)
    ties: tuple[int, int, int] | None = None  # TIES: (sign sum, cancellations, majority used)


def sparsify_task(
    tau: torch.Tensor, k: int, spec: MergeSpec, ctx: BlockContext
) -> tuple[torch.Tensor, TaskStats]:
    sp = spec.sparsify
    if sp.method == "none":
        return tau, TaskStats(kept=tau.numel())
    if sp.method in MAGNITUDE_METHODS:
        keys = magnitude_keys(tau)
        given = ctx.selections[k] if ctx.selections else None
        if given is None:
            if not ctx.whole:
                raise RuntimeError(f"{ctx.tensor}: split block without resolved selection")
            index = RankIndex(coarse_stats(keys, moments=sp.moments))
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
        return t, TaskStats(kept=kept, selection=given if given.n == tau.numel() else None)
    u = uniform_stream(
        spec.seed, k, ctx.tensor, ctx.row_start, ctx.row_end, ctx.rng_rows, ctx.row_numel
    )
    if sp.method == "random":
        t, kept = dare_block(tau, u, sp)
    else:
        t, kept = della_block(tau, magnitude_keys(tau), u, ctx.della_row, sp)
    return t, TaskStats(kept=kept)


def merge_block(
    base: torch.Tensor,
    models: list[torch.Tensor],
    spec: MergeSpec,
    ctx: BlockContext,
    check_finite: bool = True,
) -> BlockResult:
    """Merge one block. `base` and `models` are flat float32 tensors of equal size.

    `models` are consumed: each becomes τ_k, then t_k, in place (the working set
    stays at K+1 blocks plus a few temporaries). Raises NonFiniteTaskVector when
    a τ_k holds NaN/Inf (unless check_finite=False).
    """
    sparsify_none = spec.sparsify.method == "none"
    if spec.method == "average" and sparsify_none:
        stats = []
        for k, m in enumerate(models):
            tau_sq = _sq(m - base)
            if check_finite and not math.isfinite(tau_sq):
                raise NonFiniteTaskVector(k)
            stats.append(TaskStats(kept=base.numel(), tau_sq=tau_sq, t_sq=tau_sq))
        return BlockResult(C.average(models, list(spec.weights)), None, stats)
    ts, stats = [], []
    for k, m in enumerate(models):
        tau = m.sub_(base)
        tau_sq = _sq(tau)
        if check_finite and not math.isfinite(tau_sq):
            raise NonFiniteTaskVector(k)
        t, st = sparsify_task(tau, k, spec, ctx)
        st.tau_sq = tau_sq
        st.t_sq = tau_sq if t is tau else _sq(t)
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
        # a split tensor's majority sign is only known once every block voted: use
        # the resolved one, or +1 provisionally (the driver reruns the few blocks
        # whose exact cancellations need the other sign)
        majority = ctx.majority if ctx.majority is not None or ctx.whole else 1
        tb = C.ties(base, ts, w, spec.scale, spec.disjoint, majority, not ctx.whole)
        return BlockResult(tb.merged, None, stats, (tb.sign_sum, tb.cancel, tb.majority))
    else:
        raise ValueError(f"unknown merge method {spec.method}")
    return BlockResult(merged, None, stats)
