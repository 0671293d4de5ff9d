"""The units a worker merges with the torch engine, and the statistics rounds.

cluster/worker.py dispatches to these; they are a module of their own so that
a merge whose units all stream (engine/stream.py: numpy) never imports torch.
"""

from __future__ import annotations

import os

import torch

from ..emr.store import MaskStore
from ..engine import kernels
from ..engine.block import BlockContext, BlockResult, MergeSpec, NonFiniteTaskVector, merge_block
from ..engine.exact import coarse_stats
from ..engine.histogram import KeysAside, fine_histograms
from ..engine.keys import KeyChunks, SparseKeys
from ..engine.raw import RAW_DTYPE, applies, merge_raw_sparse, takes
from ..errors import InputError, InputProblem
from ..io.block_io import read_rows
from ..io.safetensors_format import torch_dtype
from ..planners.plan import Plan, TensorPlan, Unit
from .buffers import POOL
from .worker import MASKS_DIR, UnitRecord, merge_spec, resolve_device, write_out


def torch_device(name: str) -> torch.device:
    return torch.device(resolve_device(name))


def read_unit(
    plan: Plan, unit: Unit, device: torch.device
) -> tuple[TensorPlan, list[torch.Tensor]]:
    """Float32 blocks of base and models for one unit."""
    tp = plan.tensors[unit.tensor]
    blocks = []
    n = (unit.row_end - unit.row_start) * tp.row_numel
    for i, src in enumerate(tp.sources):
        if device.type != "cpu":
            raw = read_rows(src, unit.row_start, unit.row_end)
            blocks.append(raw.to(device=device, dtype=torch.float32))
            continue
        raw = read_rows(
            src, unit.row_start, unit.row_end, POOL.get("raw", n * src.itemsize, torch.uint8)
        )
        blocks.append(POOL.get(f"block{i}", n, torch.float32).copy_(raw))
    return tp, blocks


def nonfinite_error(plan: Plan, unit: Unit, task: int, blocks: list[torch.Tensor]) -> InputError:
    """Name the input file whose block holds NaN/Inf, found through τ_task.

    blocks[task + 1] may already hold τ_task (merge_block works in place): a
    non-finite base is reported as such, otherwise the model is the culprit.
    """
    tp = plan.tensors[unit.tensor]
    rows = f"rows {unit.row_start}..{unit.row_end}"
    hint = "(set inputs.allow_nonfinite: true to merge anyway)"
    bad_base = int((~torch.isfinite(blocks[0])).sum())
    if bad_base:
        return InputError(
            InputProblem(
                tp.sources[0].file, tp.name, f"{bad_base} NaN/Inf value(s) in {rows} {hint}"
            )
        )
    bad = int((~torch.isfinite(blocks[task + 1])).sum())
    return InputError(
        InputProblem(
            tp.sources[task + 1].file,
            tp.name,
            f"{bad} NaN/Inf value(s) in {rows} (or values whose difference from the base "
            f"overflows float32) {hint}",
        )
    )


def block_context(plan: Plan, unit: Unit, resolved: dict | None) -> BlockContext:
    tp = plan.tensors[unit.tensor]
    ctx = BlockContext(
        tensor=tp.name,
        shape=tp.shape,
        row_start=unit.row_start,
        row_end=unit.row_end,
        rng_rows=tp.rng_rows,
        whole=not tp.split,
    )
    if resolved:
        ctx.selections = resolved.get("selections")
        ctx.quotas = resolved.get("quotas")
        ctx.rates = resolved.get("rates")
        ctx.majority = resolved.get("majority")
    return ctx


def unit_stats(plan: Plan, unit_id: int, request: tuple, device_name: str = "cpu"):
    """One unit's share of a statistics round (see cluster/stats.py)."""
    device = torch_device(device_name)
    unit = plan.units[unit_id]
    if request[0] == "coarse" and _raw_inputs(plan.tensors[unit.tensor], device, request[1]):
        got = _raw_coarse(plan, unit, request)
        if got is not None:
            return got
    _, blocks = read_unit(plan, unit, device)
    base, models = blocks[0], blocks[1:]
    kind = request[0]
    if kind == "coarse":
        # per task (coarse histogram, KeysAside or None): the keys set aside only
        # when asked (request[2]: tensor-scope groups, whose fine round they save)
        out = []
        for k, m in enumerate(models):
            keys = KeyChunks(m.sub_(base))
            st = coarse_stats(keys, moments=request[1])
            if st.nonfinite and not plan.config.inputs.allow_nonfinite:
                raise nonfinite_error(plan, unit, k, blocks)
            out.append((st, KeysAside.of(keys) if len(request) > 2 and request[2] else None))
        return out
    if kind == "fine":
        wanted: dict[int, list[int]] = request[1]
        return {
            k: fine_histograms(KeyChunks(models[k].sub_(base)), buckets)
            for k, buckets in wanted.items()
        }
    if kind == "ties":
        out = {}
        for k, keys_wanted in request[1].items():
            keys = KeyChunks(models[k].sub_(base))
            counts = dict.fromkeys(keys_wanted, 0)
            for chunk in keys:
                for key in keys_wanted:
                    counts[key] += int(torch.count_nonzero(chunk == key))
            out[k] = counts
        return out
    raise ValueError(f"unknown stats request {kind}")


def _raw_inputs(tp: TensorPlan, device: torch.device, moments: int = 2) -> bool:
    """Whether a unit's task vectors can be counted from its raw bf16 inputs
    (kernels.coarse_sparse_raw) with no float32 block made. Counts alone do not
    load the kernels (as in exact.coarse_stats)."""
    return (
        device.type == "cpu"
        and all(src.dtype == RAW_DTYPE for src in tp.sources)
        and kernels.enabled(torch.empty(0), load_now=moments > 0)
    )


def _read_raw(plan: Plan, unit: Unit) -> list[torch.Tensor]:
    """The unit's raw input blocks, in the buffers of read_unit's float32 blocks
    (half their size for bf16): a unit handed back to read_unit holds no more."""
    tp = plan.tensors[unit.tensor]
    n = (unit.row_end - unit.row_start) * tp.row_numel
    return [
        read_rows(
            src, unit.row_start, unit.row_end, POOL.get(f"block{i}", n * src.itemsize, torch.uint8)
        )
        for i, src in enumerate(tp.sources)
    ]


def _raw_coarse(plan: Plan, unit: Unit, request: tuple) -> list | None:
    """A coarse request answered from the raw bf16 blocks; None when a task
    vector's keys are not sparse (read_unit's path answers it then)."""
    raws = _read_raw(plan, unit)
    n = raws[0].numel()
    out = []
    for k, model in enumerate(raws[1:]):
        got = kernels.coarse_sparse_raw(raws[0], model)
        if got is None:
            return None
        keys = SparseKeys(n, torch.from_numpy(got[0]), torch.from_numpy(got[1]))
        st = coarse_stats(keys, moments=request[1])
        if st.nonfinite and not plan.config.inputs.allow_nonfinite:
            raise nonfinite_error(plan, unit, k, raws)
        out.append((st, KeysAside.of(keys) if len(request) > 2 and request[2] else None))
    return out


def merge_unit(
    plan: Plan, staging: str, unit_id: int, resolved: dict | None, device_name: str
) -> UnitRecord:
    """Merge one unit with the torch engine (merge_block, or the raw bf16 path)
    and write its bytes at the planned offsets."""
    device = torch_device(device_name)
    unit = plan.units[unit_id]
    tp = plan.tensors[unit.tensor]
    spec = merge_spec(plan)
    check_finite = not plan.config.inputs.allow_nonfinite
    try:
        if (
            check_finite
            and takes(spec, [s.dtype for s in tp.sources], tp.out_dtype or "", device)
            and kernels.enabled(torch.empty(0))
        ):
            rec = _raw_unit(plan, staging, unit, tp, spec, resolved)
            if rec is not None:
                return rec
        _, blocks = read_unit(plan, unit, device)
        ctx = block_context(plan, unit, resolved)
        res: BlockResult = merge_block(blocks[0], blocks[1:], spec, ctx, check_finite)
    except NonFiniteTaskVector:
        # report every input of this unit with NaN/Inf (re-read: the blocks were
        # consumed in place); the driver sums the counts per file and tensor
        counts = []
        for i, src in enumerate(tp.sources):
            raw = read_rows(src, unit.row_start, unit.row_end)
            bad = int((~torch.isfinite(raw.to(torch.float32))).sum())
            if bad:
                counts.append((i, bad))
        if not counts:  # finite inputs whose difference overflows float32
            counts.append((-1, 1))
        return UnitRecord(unit_id, [], nonfinite=counts)
    del blocks
    if res.emr is not None:
        _write_tensor_rows(plan, staging, tp, unit, res.emr.tau_uni)
        MaskStore(os.path.join(staging, MASKS_DIR)).write(
            tp.index, tp.shape, tp.rng_rows, unit.row_start, unit.row_end, res.emr.masks
        )
        return UnitRecord(unit_id, res.tasks, res.emr.abs_t, res.emr.abs_masked_uni)
    _write_tensor_rows(plan, staging, tp, unit, res.merged)
    return UnitRecord(unit_id, res.tasks, ties=res.ties)


def _raw_unit(
    plan: Plan, staging: str, unit: Unit, tp: TensorPlan, spec: MergeSpec, resolved: dict | None
) -> UnitRecord | None:
    """A magnitude selection with task arithmetic or averaging, from the raw bf16
    blocks (engine/raw.py); None when merge_block must merge this unit (decided
    before reading where the resolved selections already tell)."""
    ctx = block_context(plan, unit, resolved)
    if not applies(ctx):
        return None
    raws = _read_raw(plan, unit)
    assert tp.out_dtype is not None
    out = POOL.get("out", raws[0].numel(), torch_dtype(tp.out_dtype))
    tasks = merge_raw_sparse(raws[0], raws[1:], out, spec, ctx)
    if tasks is None:
        return None
    write_out(plan, staging, unit, out)
    return UnitRecord(unit.id, tasks)


def _write_tensor_rows(plan: Plan, staging: str, tp: TensorPlan, unit: Unit, values) -> None:
    assert tp.out_dtype is not None
    dtype = torch_dtype(tp.out_dtype)
    if values.device.type == "cpu":
        out = POOL.get("out", values.numel(), dtype).copy_(values.view(-1))
    else:
        out = values.to(dtype).cpu()
    write_out(plan, staging, unit, out)
