"""Merges that need nothing but the block itself, streamed from the raw inputs.

Task arithmetic and averaging without a sparsifier make each output entry from
the same entry of the K+1 inputs. The C stream kernel (kernels.stream_raw)
reads the inputs in their own dtypes (bf16: half the bytes), widens,
subtracts, squares, combines and narrows each cache-sized chunk to the output
dtype while it is in cache: one pass per task, where merge_block widens every
input to a float32 block first. The arithmetic is merge_block's
(linear.merge_weights: combine.task_arithmetic / combine.average), in the same
order, and the rounding to the output dtype is torch's, so the bytes are the
same (tests/test_engine_stream.py). Its report norms are float64 sums where
merge_block's are float32 ones: the last digits of the report's figures differ
between the two, the bytes do not.

No torch: the blocks are numpy arrays (bf16: uint16 arrays of the bit
patterns), so a merge made of these alone never imports torch (~2 s on a
2-core VM: more than reading and writing a 271M-parameter merge of three
fine-tunes from a warm page cache).

Where the C kernels are unavailable (or the dispatch says torch), these blocks
are merged by merge_block instead (cluster/worker.py); so is a block whose
result holds a NaN (inputs.allow_nonfinite), whose NaN bits are torch's.
"""

from __future__ import annotations

import math

import numpy as np

from . import kernels
from .spec import MergeSpec, NonFiniteTaskVector, TaskStats

# the safetensors dtypes a block may stream in, as numpy arrays of these
# (BF16: the bit patterns): kernels.STREAM_DTYPES
NP_DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype(np.uint16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
}


def streams(spec: MergeSpec, device: str, dtypes: list[str], backend: str) -> bool:
    """Whether a block of this merge is merged by merge_raw: on a CPU with the C
    kernels (the merge's `backend` takes them: kernels.enabled), inputs and
    output in NP_DTYPES, no sparsifier."""
    return (
        device == "cpu"
        and spec.sparsify.method == "none"
        and spec.compiled_combiner is not None
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
    for k, s in enumerate(sq):
        if check_finite and not math.isfinite(s):
            raise NonFiniteTaskVector(k)
    if nan:
        return None
    return [TaskStats(kept=base.size, tau_sq=s, t_sq=s) for s in sq]
