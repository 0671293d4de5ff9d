"""Merges that need nothing but the block itself, streamed from the raw inputs.

Task arithmetic and averaging without a sparsifier make each output entry from
the same entry of the K+1 inputs. merge_block would first widen every input
block to float32 (a pass through memory per input), make τ_k in place (another),
sum its squares (another) and combine chunk by chunk: 2.0-2.5 ns per element
and task on a 2-core Xeon, memory-bound. Here the inputs stay in their own
dtype (bf16: half the bytes) and each cache-sized chunk is widened, subtracted,
squared, combined and narrowed to the output dtype while it is in cache:
1.6-1.7 ns (benchmarks/kernel_costs.py). The arithmetic is
combine.task_arithmetic / combine.average's, in the same order, so the bytes
are the same (tests/test_engine_stream.py).
It is written out here rather than calling them on K chunk buffers: that
costs K+1 buffers in cache instead of three and measured ~30% slower.
"""

from __future__ import annotations

import math

import torch

from . import combine as C
from .block import MergeSpec, NonFiniteTaskVector, TaskStats, square_sum

# Elements per chunk: the chunk's few float32 temporaries stay in L2 (measured
# best among 2^14..2^18 on a 2 MB-L2 Xeon; larger chunks spill, smaller ones
# pay torch's per-op dispatch).
STREAM_CHUNK = 1 << 16


def streams(spec: MergeSpec, device: torch.device) -> bool:
    """Whether a block of this merge can be merged by merge_raw (CPU only: on a
    GPU the whole block is one chunk anyway)."""
    return (
        device.type == "cpu"
        and spec.sparsify.method == "none"
        and spec.method in ("task_arithmetic", "average")
    )


def merge_raw(
    base: torch.Tensor,
    models: list[torch.Tensor],
    out: torch.Tensor,
    spec: MergeSpec,
    check_finite: bool = True,
) -> list[TaskStats]:
    """Merge one block from the inputs' own values into `out` (the output dtype).

    `base` and `models` are flat CPU tensors of any floating dtypes, `out` a flat
    tensor of the same length; the inputs are not modified. Raises
    NonFiniteTaskVector as merge_block does (unless check_finite=False), in
    which case `out` holds part of the block and must not be written.
    """
    n = base.numel()
    k_count = len(models)
    weights = list(spec.weights)
    step = min(n, STREAM_CHUNK) or 1
    base_f = torch.empty(step, dtype=torch.float32)
    acc_f = torch.empty(step, dtype=torch.float32)
    tau_f = torch.empty(step, dtype=torch.float32)
    scale = C._f32(spec.scale, acc_f)
    total_w = C._f32(sum(weights), acc_f)
    sq = [0.0] * k_count
    average = spec.method == "average"
    for a in range(0, n, step):
        b = min(n, a + step)
        m = b - a
        bv, acc, tau = base_f[:m].copy_(base[a:b]), acc_f[:m], tau_f[:m]
        for k, model in enumerate(models):
            # τ_k for the report (and the finite check); task arithmetic sums it
            t = acc if k == 0 and not average else tau
            t.copy_(model[a:b]).sub_(bv)
            s = square_sum(t)
            if check_finite and not math.isfinite(s):
                raise NonFiniteTaskVector(k)
            sq[k] += s
            if average:  # averaging sums θ_k, not τ_k
                t.copy_(model[a:b])
                if k == 0:
                    acc.copy_(t)
                    t = acc
            C._scale_(t, weights[k])
            if t is not acc:
                acc.add_(t)
        if average:
            acc.div_(total_w)
        else:
            acc.mul_(scale).add_(bv)
        out[a:b].copy_(acc)
    return [TaskStats(kept=n, tau_sq=s, t_sq=s) for s in sq]
