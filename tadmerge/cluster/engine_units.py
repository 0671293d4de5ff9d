"""The units a worker merges with the torch engine, and the statistics rounds.

cluster/worker.py dispatches to these when a unit cannot stream
(engine/stream.py) or take the raw bf16 path (engine/raw.py): they are a
module of their own so that a merge whose units all do never imports torch.
"""

from __future__ import annotations

import os

import torch

from ..emr.store import MaskStore, array_key
from ..engine.block import BlockResult, NonFiniteTaskVector, merge_block
from ..engine.exact import coarse_stats
from ..engine.histogram import KeysAside, fine_histograms
from ..engine.keys import KeyChunks, count_keys
from ..engine.spec import (
    CoarseRequest,
    FineRequest,
    StatsRequest,
    TieCountRequest,
    UnitRequest,
)
from ..io.block_io import read_rows
from ..io.safetensors_format import torch_dtype
from ..planners.plan import Plan, TensorPlan, Unit
from .buffers import POOL
from .dispatch import Dispatch
from .worker import (
    MASKS_DIR,
    UnitRecord,
    block_context,
    merge_spec,
    nonfinite_input,
    nonfinite_record,
    write_out,
)


def read_unit(plan: Plan, unit: Unit, device: torch.device) -> list[torch.Tensor]:
    """Float32 blocks of base and models for one unit.

    On a GPU each raw block is read into a reused page-locked buffer, copied
    asynchronously into a reused device buffer and widened there: the reads of
    the next sources overlap the copies of the first.
    """
    tp = plan.tensors[unit.tensor]
    blocks = []
    n = (unit.row_end - unit.row_start) * tp.row_numel
    if device.type != "cpu":
        for i, src in enumerate(tp.sources):
            host = POOL.pinned(f"raw{i}", n * src.itemsize)
            raw = read_rows(src, unit.row_start, unit.row_end, host)
            on_device = POOL.device(f"raw{i}", n, raw.dtype, device)
            on_device.copy_(raw, non_blocking=True)
            blocks.append(POOL.device(f"block{i}", n, torch.float32, device).copy_(on_device))
        event = torch.cuda.Event() if device.type == "cuda" else None
        if event is not None:
            event.record()
            POOL.copied(event)  # the next unit's reads wait for these copies
        return blocks
    for i, src in enumerate(tp.sources):
        raw = read_rows(
            src, unit.row_start, unit.row_end, POOL.get("raw", n * src.itemsize, torch.uint8)
        )
        blocks.append(POOL.get(f"block{i}", n, torch.float32).copy_(raw))
    return blocks


def unit_stats(plan: Plan, unit_id: int, request: StatsRequest, dispatch: Dispatch):
    """One unit's share of a statistics round (see cluster/stats.py), on the
    dispatch's device (resolved: cluster/worker.py) and kernels backend."""
    backend = dispatch.kernels
    unit = plan.units[unit_id]
    blocks = read_unit(plan, unit, torch.device(dispatch.device))
    base, models = blocks[0], blocks[1:]
    if isinstance(request, UnitRequest):  # a combiner's (cluster/tensor_stats.py)
        from ..engine import tensor_stats

        spec = merge_spec(plan, plan.tensors[unit.tensor])
        ctx = block_context(plan, unit, request.resolved, backend)
        return tensor_stats.answer(base, models, spec, ctx, request)
    if isinstance(request, CoarseRequest):
        # per task (coarse histogram, KeysAside or None): the keys set aside only
        # when asked (tensor-scope groups, whose fine round they save)
        out = []
        for k, m in enumerate(models):
            keys = KeyChunks(m.sub_(base))
            st = coarse_stats(keys, moments=request.moments, backend=backend)
            if st.nonfinite and not plan.config.inputs.allow_nonfinite:
                # (m holds τ_k now: nonfinite_input tells a non-finite base from the model)
                bad_base, bad = (int((~torch.isfinite(b)).sum()) for b in (base, m))
                raise nonfinite_input(plan, unit, k, bad_base, bad)
            out.append((st, KeysAside.of(keys) if request.keys_aside else None))
        return out
    if isinstance(request, FineRequest):
        return {
            k: fine_histograms(KeyChunks(models[k].sub_(base)), buckets, backend)
            for k, buckets in request.buckets.items()
        }
    if isinstance(request, TieCountRequest):
        return {k: count_keys(KeyChunks(models[k].sub_(base)), w) for k, w in request.keys.items()}
    raise TypeError(f"unknown statistics request {request!r}")


def merge_unit(
    plan: Plan, staging: str, unit: Unit, resolved: dict | None, dispatch: Dispatch
) -> UnitRecord:
    """Merge one unit (a row block of one tensor, or a group's member) with the
    torch engine (merge_block) and write its bytes at the planned offsets, on
    the dispatch's device (resolved: cluster/worker.py) and kernels backend."""
    unit_id = unit.id
    tp = plan.tensors[unit.tensor]
    spec = merge_spec(plan, tp)
    check_finite = not plan.config.inputs.allow_nonfinite
    try:
        blocks = read_unit(plan, unit, torch.device(dispatch.device))
        ctx = block_context(plan, unit, resolved, dispatch.kernels)
        res: BlockResult = merge_block(blocks[0], blocks[1:], spec, ctx, check_finite)
    except NonFiniteTaskVector:
        # (re-read: the blocks were consumed in place)
        bad = [
            int((~torch.isfinite(read_rows(src, unit.row_start, unit.row_end).float())).sum())
            for src in tp.sources
        ]
        return nonfinite_record(unit_id, bad)
    del blocks
    if res.emr is not None:
        written = _write_tensor_rows(plan, staging, tp, unit, res.emr.tau_uni)
        b0, b1, crc = MaskStore(os.path.join(staging, MASKS_DIR)).write(
            tp.index, tp.shape, tp.rng_rows, unit.row_start, unit.row_end, res.emr.masks
        )
        masks = (f"{MASKS_DIR}/{array_key(tp.index)}", b0, b1, crc)
        return UnitRecord(
            unit_id, res.tasks, res.emr.abs_t, res.emr.abs_masked_uni, out=[written, masks]
        )
    written = _write_tensor_rows(plan, staging, tp, unit, res.merged)
    return UnitRecord(unit_id, res.tasks, ties=res.ties, out=[written])


def _write_tensor_rows(plan: Plan, staging: str, tp: TensorPlan, unit: Unit, values) -> tuple:
    assert tp.out_dtype is not None
    dtype = torch_dtype(tp.out_dtype)
    if values.device.type == "cpu":
        out = POOL.get("out", values.numel(), dtype).copy_(values.view(-1))
    else:
        out = values.to(dtype).cpu()
    return write_out(plan, staging, unit, out)
