"""Exact magnitude selections, resolved from mergeable histograms.

The magnitude sparsifiers (tadrop, magnitude, breadcrumbs) all keep the
positions [lo, hi) of one total order: |τ| ascending, ties broken by flat
index (lowest index first). `resolve_selection` finds lo and hi for one group
(a tensor, or a whole task vector) from its histograms: a generator that
yields the coarse buckets whose fine histograms it still needs. The in-memory
path answers those requests from the block at hand (`run_locally`); the
distributed stats stage answers them with one map/reduce round per request,
batched over every tensor and task.

Plain Python and numpy: the raw bf16 path (engine/raw.py) and the driver's
statistics stage resolve selections without importing torch; applying them to
tensors is sparsify.py's.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .. import methods
from .exact import ABS_SCALE_BITS, SQ_SCALE_BITS, coarse_stats
from .histogram import Cut, RankIndex, fine_histograms, scaled_to_float
from .keys import KeyChunks
from .spec import BlockContext, NonFiniteTaskVector, SparsifySpec

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Selection:
    """A resolved magnitude selection for one (tensor, task): keep ranks [lo, hi)."""

    n: int
    lo: Cut
    hi: Cut
    scale: float  # float64 multiplier of kept entries (applied as float32)
    drop_rate: float  # d for TADrop; the dropped fraction otherwise
    q_low: float | None
    q_high: float | None
    # the report's norms of the whole group, from its exact moments (l2 rescale
    # only: the other selections do not gather Σ τ²): ‖τ‖² and ‖t‖² taken as
    # fl32(scale)²·Σ kept τ² (each product's rounding aside). Blocks of a split
    # tensor need not sum their own (engine/raw.py does not).
    tau_sq: float | None = None
    t_sq: float | None = None

    @property
    def kept(self) -> int:
        return self.hi.rank - self.lo.rank


PREDICTED_BUCKETS = 32  # fetch the cut's candidate buckets with the quantiles' if few


def tadrop_rate(
    index: RankIndex, spec: SparsifySpec, predict_cut: bool = False
) -> Generator[set[int], None, tuple]:
    """d = min(Q_a / (Q_b + eps), max_drop) over one group. Yields bucket requests.

    With predict_cut, the buckets that can hold the cut rank floor(d·n), bounded
    from the coarse histogram alone, are requested in the same round when there
    are few of them: the whole selection then costs one fine round, not two.
    """
    ra, rb = index.quantile_ranks(spec.low_q), index.quantile_ranks(spec.high_q)
    need = index.missing(ra + rb)
    if need and predict_cut and index.n:
        qa_lo = index.bucket_bounds(index.bucket_of(ra[0]))[0]
        qa_hi = index.bucket_bounds(index.bucket_of(ra[-1]))[1]
        qb_lo = index.bucket_bounds(index.bucket_of(rb[0]))[0]
        qb_hi = index.bucket_bounds(index.bucket_of(rb[-1]))[1]
        d_lo = min(qa_lo / (qb_hi + spec.eps), spec.max_drop)
        d_hi = min(qa_hi / (qb_lo + spec.eps), spec.max_drop)
        r_lo = min(index.n - 1, math.floor(d_lo * index.n))
        r_hi = min(index.n - 1, math.floor(d_hi * index.n))
        if math.isfinite(d_hi) and r_hi >= r_lo:
            candidates = index.nonempty_buckets(r_lo, r_hi)
            if len(candidates) <= PREDICTED_BUCKETS:
                need |= set(candidates) - set(index.fine)
    if need:
        yield need
    qa = index.quantile(spec.low_q)
    qb = index.quantile(spec.high_q)
    d = min(qa / (qb + spec.eps), spec.max_drop)
    return d, qa, qb


def resolve_selection(
    index: RankIndex, spec: SparsifySpec, rate: float | None = None
) -> Generator[set[int], None, Selection]:
    """Resolve the keep range of one (tensor, task) from its histograms.

    `rate` is the TADrop drop rate when it comes from elsewhere (scope: global):
    then only the per-tensor cut is resolved here.
    """
    n = index.n
    q_low = q_high = None
    method = methods.sparsifier(spec.method)
    if method.keep_range is None:
        raise ValueError(f"{spec.method} is not a magnitude sparsifier")
    if method.drop_rate is not None and rate is None:
        rate, q_low, q_high = yield from method.drop_rate(index, spec)
    lo_rank, hi_rank = method.keep_range(n, spec, rate)
    need = index.missing([lo_rank, hi_rank])
    if need:
        yield need
    lo, hi = index.cut(lo_rank), index.cut(hi_rank)
    dropped = n - (hi_rank - lo_rank)
    drop_rate = rate if method.drop_rate is not None else (dropped / n if n else 0.0)
    norms: tuple[float, float] | tuple[None, None] = (None, None)
    if spec.rescale == "l2":
        tau_sq = scaled_to_float(index.total_moment(2), SQ_SCALE_BITS)
        kept_sq = scaled_to_float(index.moment_from(lo, 2) - index.moment_from(hi, 2))
        scale = tau_sq**0.5 / (kept_sq**0.5 + spec.eps)
        norms = (tau_sq, float(np.float32(scale)) ** 2 * kept_sq)
    elif spec.rescale == "l1":
        total_abs = scaled_to_float(index.total_moment(1), ABS_SCALE_BITS)
        kept_abs = scaled_to_float(
            index.moment_from(lo, 1) - index.moment_from(hi, 1), ABS_SCALE_BITS
        )
        scale = total_abs / (kept_abs + spec.eps)
    elif spec.rescale == "inverse_keep":
        scale = 1.0 / (1.0 - drop_rate) if drop_rate < 1.0 else 0.0
    else:
        scale = 1.0
    return Selection(n, lo, hi, scale, drop_rate, q_low, q_high, *norms)


def run_locally(
    gen: Generator[set[int], None, object],
    keys: torch.Tensor | KeyChunks,
    index: RankIndex,
    backend: str = "auto",
):
    """Drive a resolver generator with fine histograms computed from `keys`
    (on the kernels `backend`: the merge's, kernels.enabled)."""
    try:
        need = next(gen)
        while True:
            for b, h in fine_histograms(keys, sorted(need), backend).items():
                index.add_fine(b, h)
            need = gen.send(None)
    except StopIteration as stop:
        return stop.value


def own_selection(
    keys, k: int, sp: SparsifySpec, ctx: BlockContext, moments: int, check_finite: bool
) -> tuple[Selection, RankIndex]:
    """Task k's selection resolved from a whole block's own keys (KeyChunks or
    SparseKeys: scope tensor, the block is the tensor), with the block's rank
    index (own_norms reads the report's norms from it). Raises
    NonFiniteTaskVector where the keys count NaN/Inf and `check_finite`."""
    if not ctx.whole:
        raise RuntimeError(f"{ctx.tensor}: split block without resolved selection")
    index = RankIndex(coarse_stats(keys, moments=moments, backend=ctx.backend))
    if check_finite and index.stats.nonfinite:
        raise NonFiniteTaskVector(k)
    rate = ctx.rates[k] if ctx.rates else None
    return run_locally(resolve_selection(index, sp, rate), keys, index, ctx.backend), index


def own_norms(index: RankIndex, sel: Selection) -> tuple[float, float]:
    """The report's Σ τ² and Σ t² of a block that resolved its own selection,
    from its exact moments (index built with moments=2): no passes over τ and t
    (Σ t² = fl32(scale)² Σ kept τ², up to the rounding of each product).
    An l2 selection carries the same two figures already (resolve_selection
    makes them by this formula): they are taken as they are."""
    if sel.tau_sq is not None and sel.t_sq is not None:
        return sel.tau_sq, sel.t_sq
    kept_sq = index.moment_from(sel.lo, 2) - index.moment_from(sel.hi, 2)
    t_sq = float(np.float32(sel.scale)) ** 2 * scaled_to_float(kept_sq)
    return scaled_to_float(index.total_moment(2)), t_sq
