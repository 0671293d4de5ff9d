"""Magnitude selections with task arithmetic or averaging, from raw bf16 inputs.

merge_block widens every input block to float32 (a pass through memory per
input), writes τ_k over it (another), counts its keys, scans for the cut's
ties, applies the cut and combines: each pass reads or writes 4 bytes per entry
and task. For bf16 checkpoints, the usual LLM case, τ_k is cheap to make again
from the raw 16-bit patterns, in registers: here the K+1 raw blocks are the
only block-sized memory, and each entry of τ_k is made three times (counting,
the tie scan, the cut and combine) without ever being stored
(kernels.coarse_sparse_raw, tie_end_raw, cut_combine_raw: the C kernels,
native.py; where they are unavailable merge_block merges these blocks). The
float32 operations are merge_block's in the same order, so the bytes are the
same (tests/test_engine_raw.py holds the two together).

No torch: the blocks are numpy arrays of bf16 patterns (uint16), and the
statistics are numpy (exact.py, histogram.py), so a merge whose units all take
this path, or stream (stream.py), never imports it.

This takes bf16 task vectors whose keys are sparse (kernels.coarse_sparse: ~1%
of a bf16 difference's keys have low bits), which is what makes the statistics
one counting pass with no τ to re-read. When a block's keys are not sparse,
merge_raw_sparse returns None and the caller merges it the usual way.
"""

from __future__ import annotations

import math

import numpy as np

from . import kernels
from .keys import SparseKeys
from .selection import own_norms, own_selection
from .spec import MAGNITUDE_METHODS, BlockContext, MergeSpec, TaskStats

RAW_DTYPE = "BF16"  # the inputs the raw kernels read (safetensors' name)


def takes(spec: MergeSpec, in_dtypes: list[str], out_dtype: str, device: str) -> bool:
    """Whether merge_raw_sparse can merge blocks of this merge (it may still hand
    a block back); dtypes by their safetensors names. The kernels need finite
    values: the caller checks."""
    return (
        device == "cpu"
        and spec.sparsify.method in MAGNITUDE_METHODS
        and spec.compiled_combiner is not None
        and all(d == RAW_DTYPE for d in in_dtypes)
        and out_dtype in ("BF16", "F32")
    )


def applies(ctx: BlockContext) -> bool:
    """Whether the selections ctx gives a block can be applied here: each must be
    its tensor's (not a global one) and carry the tensor's norms (l2 rescale),
    since no block sums its own. Known before the block is read."""
    numel = math.prod(ctx.shape)
    return all(s is None or (s.tau_sq is not None and s.n == numel) for s in ctx.selections or ())


def merge_raw_sparse(
    base: np.ndarray,
    models: list[np.ndarray],
    out: np.ndarray,
    spec: MergeSpec,
    ctx: BlockContext,
) -> list[TaskStats] | None:
    """Merge one block of raw bf16 inputs (uint16 arrays of their patterns) into
    `out` (uint16 for bf16, or float32).

    The block resolves its own selections when it is the whole tensor (scope
    tensor), else it applies the ones in ctx, which must carry their tensor's
    norms (Selection.tau_sq: l2 rescale) since no block sums its own here
    (the report takes them from the selection, report/figures.py).
    Returns None, having written nothing that counts, when merge_block must do
    it: keys not sparse, a resolved selection without norms, or a NaN result.
    Raises NonFiniteTaskVector when a task vector holds NaN/Inf.
    """
    if not applies(ctx):
        return None
    n = base.size
    sp = spec.sparsify
    cuts = []
    stats = []
    for k, model in enumerate(models):
        given = ctx.selection(k)
        if given is None:
            got = kernels.coarse_sparse_raw(base, model)
            if got is None:
                return None
            sel, index = own_selection(SparseKeys(n, *got), k, sp.for_task(k), ctx, 2, True)
            quotas = (sel.lo.quota, sel.hi.quota)
            st = TaskStats(selection=sel)
            st.tau_sq, st.t_sq = own_norms(index, sel)
        else:
            sel, quotas = given, ctx.quotas[k]
            # the report takes the tensor's norms from the selection
            st = TaskStats(selection=given if given.n == n else None)
        lo_end = kernels.tie_end_raw(base, model, sel.lo.key, quotas[0])
        hi_end = kernels.tie_end_raw(base, model, sel.hi.key, quotas[1])
        cuts.append((sel.lo.key, lo_end, sel.hi.key, hi_end, sel.scale))
        stats.append(st)
    kept = kernels.cut_combine_raw(
        base, models, cuts, list(spec.weights), spec.scale, spec.compiled_combiner == "average", out
    )
    if kept is None:
        return None
    for st, c in zip(stats, kept, strict=True):
        st.kept = c
    return stats
