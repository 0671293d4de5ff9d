"""Merges streamed from the raw inputs: those that need nothing but the block
itself, and the sums combiners (slerp, nuslerp, multislerp, karcher,
model_stock: methods/_sums.py) whose block is a linear combination of the
weights or task vectors with one coefficient per tensor.

Task arithmetic and averaging without a sparsifier make each output entry from
the same entry of the K+1 inputs. The C stream kernel (kernels.stream_raw)
reads the inputs in their own dtypes (bf16: half the bytes), widens,
subtracts, squares, combines and narrows each cache-sized chunk to the output
dtype while it is in cache: one pass per task, where merge_block widens every
input to a float32 block first. The arithmetic is merge_block's
(linear.merge_weights: combine.task_arithmetic / combine.average), in the same
order, and the rounding to the output dtype is torch's, so the bytes are the
same (tests/test_engine_stream.py). Its report norms are float64 sums, as
merge_block's, added in another order: the last digits of the report's figures
may differ between the two, the bytes do not.

No torch: the blocks are numpy arrays (bf16: uint16 arrays of the bit
patterns), so a merge made of these alone never imports torch, whose import
can cost more than such a merge's reading and writing.

A sums combiner's block (merge_raw_sums) takes its tensor's Combination from
the driver (a split tensor: the rounds over units ask unit_sums) or from its
statistics generator answered here on the raw inputs (a whole tensor:
sums.array_sums, the integers of sums.block_sums). The combination
Σ_j fl32(c_j)·v_j (+ θ0 for task vectors) is the stream kernel's averaging
with the divisor 1 (weights) or task arithmetic with λ = 1 (task vectors):
multiplying or dividing by 1 is exact, so the bytes are sums.apply's.

Where the C kernels are unavailable (or the dispatch says torch), these blocks
are merged by merge_block instead (cluster/worker.py); so is a block whose
result holds a NaN (inputs.allow_nonfinite), whose NaN bits are torch's, and a
sums combiner's block with a coefficient per vector (row_wise, filter_wise),
NaN/Inf or a vector that takes no part.
"""

from __future__ import annotations

import math

import numpy as np

from .. import methods
from ..methods import _sums
from . import kernels
from .spec import BlockContext, MergeSpec, NonFiniteTaskVector, SumsRequest, TaskStats, UnitRequest
from .sums import Combination, ExactSums, array_sums, layout_of

# the safetensors dtypes a block may stream in, as numpy arrays of these
# (BF16: the bit patterns): kernels.STREAM_DTYPES
NP_DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype(np.uint16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
}


def streams(spec: MergeSpec, device: str, dtypes: list[str], backend: str) -> bool:
    """Whether a block of this merge is first offered to merge_raw (task
    arithmetic, averaging) or merge_raw_sums (a sums combiner): on a CPU with
    the C kernels (the merge's `backend` takes them: kernels.enabled), inputs
    and output in NP_DTYPES, no sparsifier."""
    return (
        device == "cpu"
        and spec.sparsify.method == "none"
        and (spec.compiled_combiner is not None or _sums.combines(methods.combiner(spec.method)))
        and all(d in NP_DTYPES for d in dtypes)
        and kernels.enabled(None, backend)
    )


def merge_raw(
    base: np.ndarray,
    models: list[np.ndarray],
    out: np.ndarray,
    spec: MergeSpec,
    check_finite: bool = True,
) -> list[TaskStats] | None:
    """Merge one block from the inputs' own values into `out` (the output dtype).

    `base`, `models` and `out` are flat arrays of equal length in NP_DTYPES'
    types; the inputs are not modified. Raises NonFiniteTaskVector as
    merge_block does (unless check_finite=False). Returns None, `out` then
    garbage, when a result is NaN: merge_block merges such a block.
    """
    average = spec.compiled_combiner == "average"
    sq, nan = kernels.stream_raw(base, models, list(spec.weights), spec.scale, average, out)
    return _task_stats(sq, nan, base.size, check_finite)


def _task_stats(sq: list[float], nan: int, n: int, check_finite: bool) -> list[TaskStats] | None:
    """A streamed block's figures from the stream kernel's Σ τ_k² and NaN count:
    NonFiniteTaskVector where a τ_k is not finite, None where a result is NaN."""
    for k, s in enumerate(sq):
        if check_finite and not math.isfinite(s):
            raise NonFiniteTaskVector(k)
    if nan:
        return None
    return [TaskStats(kept=n, tau_sq=s, t_sq=s) for s in sq]


def merge_raw_sums(
    raws: list[np.ndarray],
    out: np.ndarray,
    spec: MergeSpec,
    ctx: BlockContext,
    check_finite: bool,
) -> list[TaskStats] | None:
    """Merge one block of a sums combiner from its raw inputs (base first) into
    `out`. None, `out` then garbage, where merge_block must merge it; raises
    NonFiniteTaskVector as merge_block does."""
    given = ctx.tensor_stats
    comb = given["values"] if given is not None else _resolve(raws, spec, ctx)
    if isinstance(comb, dict):
        comb = Combination.from_json(comb)
    if comb is None or layout_of(comb.layout, ctx.shape) != "tensor":
        return None
    if any(c is None for c in comb.coef[1:]):
        return None
    base, models = raws[0], raws[1:]
    weights = [c[0] for c in comb.coef[1:]]
    if comb.vectors == "tasks":
        if comb.coef[0] is not None:
            return None
        sq, nan = kernels.stream_raw(base, models, weights, 1.0, False, out)
    elif comb.coef[0] is None:
        sq, nan = kernels.stream_raw(base, models, weights, 1.0, True, out, divisor=1.0)
    else:  # the base is a vector too (slerp): its τ² in the report is dropped
        weights = [comb.coef[0][0], *weights]
        sq, nan = kernels.stream_raw(base, [base, *models], weights, 1.0, True, out, divisor=1.0)
        sq = sq[1:]
    return _task_stats(sq, nan, base.size, check_finite)


def _resolve(raws: list[np.ndarray], spec: MergeSpec, ctx: BlockContext) -> Combination | None:
    """The combiner's generator answered on the block (the whole tensor): its
    Combination, or None where it asks what array_sums does not make or an
    answer meets NaN/Inf."""
    if not ctx.whole:
        return None  # (sums inside a row: per-vector coefficients, merge_block's)
    gen = methods.combiner(spec.method).statistics(spec, ctx.shape, ctx.tensor)
    try:
        request = next(gen)
        while True:
            got = _array_sums(raws, request, ctx.shape, merging=True)
            if got is None:
                gen.close()
                return None
            request = gen.send(got.values())
    except StopIteration as stop:
        return stop.value


def unit_sums(raws: list[np.ndarray], ctx: BlockContext, ask: UnitRequest) -> ExactSums | None:
    """One unit's share of a split tensor's round (tensor_stats.answer's), from
    its raw inputs; None where the torch engine must answer."""
    if ask.cut is not None:
        return None
    return _array_sums(raws, ask.request, ctx.shape)


def _array_sums(
    raws: list[np.ndarray], request, shape: tuple[int, ...], merging: bool = False
) -> ExactSums | None:
    """array_sums of a request it takes, None where an input is not finite (or,
    `merging` a block, the combination will not be applied here)."""
    if not isinstance(request, SumsRequest):
        return None
    if merging and layout_of(request.layout, shape) != "tensor":
        return None  # (a coefficient per vector: merge_block applies it)
    got = array_sums(raws[0], raws[1:], request, shape)
    return None if got.nonfinite else got
