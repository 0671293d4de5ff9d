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
from typing import TYPE_CHECKING

import torch

from .. import methods
from . import kernels
from .keys import KeyChunks, magnitude_keys
from .selection import own_norms, own_selection
from .sparsify import (
    BlockCuts,
    apply_keep,
    uniform_into,
)
from .spec import (  # noqa: F401  (re-exported)
    MAGNITUDE_METHODS,
    BlockContext,
    MergeSpec,
    NonFiniteTaskVector,
    SparsifySpec,
    TaskStats,
)

if TYPE_CHECKING:
    from ..methods.emr import EmrBlock


def square_sum(x: torch.Tensor, backend: str) -> float:
    """Σx² for the report, accumulated in float64 (SPEC: norms in float64);
    non-finite only where x holds NaN/Inf. On a CPU with the C kernels (the
    merge's `backend`) one pass; else chunk by chunk, since torch would widen a
    whole input to float64 first. The two sum in other orders: the report's
    last digits may differ between backends, never the bytes."""
    flat = x.reshape(-1)
    if flat.numel() and flat.dtype == torch.float32 and kernels.enabled(flat, backend):
        return kernels.square_sum(flat.contiguous())
    return sum(
        float(torch.linalg.vector_norm(flat[a : a + NORM_CHUNK], dtype=torch.float64)) ** 2
        for a in range(0, flat.numel(), NORM_CHUNK)
    )


NORM_CHUNK = 1 << 16  # entries widened to float64 at a time (square_sum's torch path)


def weights_stats(
    base: torch.Tensor, models: list[torch.Tensor], check_finite: bool, backend: str
) -> list[TaskStats]:
    """The report's figures of a merge of the weights themselves (a combiner's
    merge_weights: no sparsifier, t_k = τ_k, every entry kept): Σ τ_k² in
    float64, τ_k made a chunk at a time (no block-sized temporary). Raises
    NonFiniteTaskVector where a τ_k holds NaN/Inf."""
    n = base.numel()
    stats = []
    for k, m in enumerate(models):
        tau_sq = sum(square_sum(m[a:b] - base[a:b], backend) for a, b in _chunks(n, base.device))
        if check_finite and not math.isfinite(tau_sq):
            raise NonFiniteTaskVector(k)
        stats.append(TaskStats(kept=n, tau_sq=tau_sq, t_sq=tau_sq))
    return stats


@dataclass
class BlockResult:
    merged: torch.Tensor | None  # float32, None for EMR
    emr: EmrBlock | None
    tasks: list[TaskStats] = field(default_factory=list)
    ties: tuple[int, int, int] | None = None  # TIES: (sign sum, cancellations, majority used)


# Elements per chunk of the apply phase on a CPU: the K task-vector slices and the
# combiner's temporaries of one chunk stay in cache, where one pass costs a
# fraction of a pass through memory. (On a GPU the whole block is one chunk.)
CHUNK_ELEMENTS = 1 << 18
# On a GPU, chunks large enough to fill the device, small enough that their
# temporaries stay a fixed overhead beside the unit's blocks (planners/plan.py).
GPU_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class Draws:
    """One task's random stream over one block (DARE: sparsify.uniform_into)."""

    seed: int
    task: int
    ctx: BlockContext

    def take(self, start: int, n: int, device: torch.device) -> torch.Tensor:
        """The draws of the block's entries [start, start + n), made on `device`."""
        c = self.ctx
        out = torch.empty(n, dtype=torch.float32, device=device)
        first = c.row_start * c.row_numel + start
        uniform_into(out, self.seed, self.task, c.tensor, first, c.rng_rows, c.row_numel, c.backend)
        return out


@dataclass
class TaskPlan:
    """How one task's τ is turned into t, chunk by chunk, once its selection is known."""

    stats: TaskStats
    cuts: BlockCuts | None = None
    # DARE: the draws' stream, made chunk by chunk on the chunk's device as it is
    # sparsified (no block-sized buffer of draws)
    draws: Draws | None = None
    # t was made whole-block and its stats are complete (no selection; DELLA ranks
    # rows; a selection applied by the fused kernel)
    done: bool = False
    # the task's own sparsify values (SparsifySpec.for_task), for the chunks
    sparsify: SparsifySpec | None = None


def plan_task(
    tau: torch.Tensor,
    k: int,
    spec: MergeSpec,
    ctx: BlockContext,
    fused: bool = False,
) -> TaskPlan:
    """Phase one for one task: the block's own statistics, whole-block passes only.

    `fused`: apply a magnitude selection here, whole-block, with the CPU kernel
    (kernels.cut_block) instead of chunk by chunk with torch ops: same bytes.
    """
    sp = spec.sparsify.for_task(k)
    if sp.method == "none":
        return TaskPlan(TaskStats(kept=tau.numel()), done=True)
    if sp.method in MAGNITUDE_METHODS:
        keys = KeyChunks(tau)
        given = ctx.selection(k)
        if given is None:
            # fused (the kernels): Σ τ² comes along (the report's norms; nearly free
            # for a bf16 block, whose moments come from the few keys set aside),
            # and finite values are required
            moments = 2 if fused else sp.moments
            sel, index = own_selection(keys, k, sp, ctx, moments, check_finite=fused)
            quotas = (sel.lo.quota, sel.hi.quota)
            stats = TaskStats(selection=sel)
        else:
            sel, quotas = given, ctx.quotas[k]
            stats = TaskStats(selection=given if given.n == tau.numel() else None)
        cuts = BlockCuts(sel.lo.key, quotas[0], sel.hi.key, quotas[1], sel.scale)
        if fused:
            lo, hi = (cuts.lo_key, cuts.lo_left), (cuts.hi_key, cuts.hi_left)
            stats.kept = kernels.cut_block(tau, lo, hi, cuts.scale)
            if given is None:
                stats.tau_sq, stats.t_sq = own_norms(index, sel)
            else:
                stats.t_sq = square_sum(tau, ctx.backend)
            return TaskPlan(stats, done=True)
        return TaskPlan(stats, cuts)
    method = methods.sparsifier(sp.method)
    if not method.whole_rows:
        return TaskPlan(TaskStats(), draws=Draws(spec.seed, k, ctx), sparsify=sp)
    u = Draws(spec.seed, k, ctx).take(0, tau.numel(), tau.device)
    t, kept = method.block(tau, u, sp, ctx.della_row, backend=ctx.backend)
    tau.copy_(t)
    return TaskPlan(TaskStats(kept=kept, t_sq=square_sum(tau, ctx.backend)), done=True)


def sparsify_chunk(tp: TaskPlan, tau: torch.Tensor, start: int, spec: MergeSpec) -> None:
    """Phase two for one task on τ[start:start+len]: t in place, kept counted.

    Called once per chunk, chunks in flat order (the cuts' tie quotas run down).
    """
    if tp.done:
        return
    if tp.cuts is not None:  # chunks come in flat order, each once
        _, kept = apply_keep(tau, tp.cuts.keep(magnitude_keys(tau)), tp.cuts.scale)
    else:
        sp = tp.sparsify or spec.sparsify
        assert tp.draws is not None
        u = tp.draws.take(start, tau.numel(), tau.device)
        _, kept = methods.sparsifier(sp.method).block(tau, u, sp, 0)
    tp.stats.kept += kept


def _chunks(n: int, device: torch.device) -> list[tuple[int, int]]:
    step = CHUNK_ELEMENTS if device.type == "cpu" else GPU_CHUNK_ELEMENTS
    return [(a, min(n, a + step)) for a in range(0, n, max(1, step))]


def merge_block(
    base: torch.Tensor,
    models: list[torch.Tensor],
    spec: MergeSpec,
    ctx: BlockContext,
    check_finite: bool = True,
) -> BlockResult:
    """Merge one block. `base` and `models` are flat float32 tensors of equal size.

    `models` are consumed: each becomes τ_k, then t_k, in place, and the merged
    block is written over models[0] (the working set stays at K+1 blocks plus a
    few chunk-sized temporaries). Phase one makes each τ_k and its statistics
    with whole-block passes; phase two is the combiner's (methods/): it
    sparsifies and combines chunk by chunk (CHUNK_ELEMENTS). Raises
    NonFiniteTaskVector when a τ_k holds NaN/Inf (unless check_finite=False).
    """
    combiner = methods.combiner(spec.method)
    sparsify_none = spec.sparsify.method == "none"
    if combiner.merge_block is None or (sparsify_none and combiner.merge_weights is not None):
        return combiner.merge_weights(base, models, spec, check_finite, ctx)
    plans = []
    # a magnitude selection is applied by the fused cut kernel (CPU, the C
    # kernels: one pass where the torch ops make ten per chunk); non-finite
    # values (allow_nonfinite) keep the torch ops, as in TIES and EMR
    magnitude = spec.sparsify.method in MAGNITUDE_METHODS
    fused = magnitude and check_finite and kernels.enabled(base, ctx.backend)
    for k, m in enumerate(models):
        tau = m.sub_(base)
        if fused and ctx.selection(k) is None:
            plans.append(plan_task(tau, k, spec, ctx, fused))  # its own norms and check there
            continue
        tau_sq = square_sum(tau, ctx.backend)
        if check_finite and not math.isfinite(tau_sq):
            raise NonFiniteTaskVector(k)
        tp = plan_task(tau, k, spec, ctx, fused)
        tp.stats.tau_sq = tau_sq
        if sparsify_none:
            tp.stats.t_sq = tau_sq
        plans.append(tp)
    taus = models

    def sparsify(a: int, b: int) -> list[torch.Tensor]:
        """t_k[a:b] of every task (made in place once, chunks in flat order)."""
        ts = []
        for tp, tau in zip(plans, taus, strict=True):
            t = tau[a:b]
            if not tp.done:
                sparsify_chunk(tp, t, a, spec)
                tp.stats.t_sq += square_sum(t, ctx.backend)
            ts.append(t)
        return ts

    chunks = _chunks(base.numel(), base.device)
    return combiner.merge_block(base, taus, plans, spec, ctx, sparsify, chunks, check_finite)


def combine_chunks(base, taus, plans, sparsify, chunks, combine) -> BlockResult:
    """An element-wise combiner's block: `combine(base_chunk, t_chunks)` chunk by
    chunk, the result over the first task's block."""
    for a, b in chunks:
        store(taus[0][a:b], combine(base[a:b], sparsify(a, b)))
    return BlockResult(taus[0], None, [tp.stats for tp in plans])


def store(dest: torch.Tensor, merged: torch.Tensor) -> None:
    """The combiners work in place on the first task's slice; copy when one did not."""
    if merged.data_ptr() != dest.data_ptr():
        dest.copy_(merged)
