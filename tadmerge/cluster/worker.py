"""What a worker does with one unit: read its blocks, compute, write in place.

These functions are the same for every executor. They take the plan (plain
data) and paths, read inputs by path and byte range, and write output bytes at
offsets fixed by the plan; only small results (histograms, sums, counts) are
returned, which is all that travels back to the driver.
"""

from __future__ import annotations

import glob
import os
from array import array
from dataclasses import dataclass, replace

import numpy as np

from ..engine import kernels
from ..engine.exact import coarse_stats
from ..engine.histogram import KeysAside
from ..engine.keys import SparseKeys
from ..engine.raw import RAW_DTYPE, applies, merge_raw_sparse, takes
from ..engine.spec import (
    BlockContext,
    CoarseRequest,
    MergeSpec,
    NonFiniteTaskVector,
    StatsRequest,
    UnitRequest,
)
from ..engine.stream import NP_DTYPES, merge_raw, merge_raw_sums, streams, unit_sums
from ..errors import ConfigError, InputError, InputProblem
from ..io.block_io import map_bytes, read_bytes, write_at_crc
from ..io.safetensors_format import DTYPE_SIZE
from ..planners.inventory import COPY, EXCLUDE, MERGE
from ..planners.plan import Plan, TensorPlan, Unit
from .buffers import POOL
from .dispatch import Dispatch

MASKS_DIR = "masks.zarr"
TASKS_DIR = "tasks"


def merge_spec(plan: Plan, tensor: TensorPlan | None = None) -> MergeSpec:
    """The merge's spec; given a tensor, the spec that tensor is merged with: its
    per-tensor values resolved from its name and the plan's layer count
    (MergeSpec.for_tensor), which every stage and executor asks here."""
    cfg = plan.config
    spec = MergeSpec(
        sparsify=cfg.sparsify,
        method=cfg.merge.method,
        scale=cfg.merge.get("scale", 1.0),
        disjoint=cfg.merge.get("disjoint", "mean"),
        params=cfg.merge.params,
        weights=tuple(m.weight for m in cfg.models),
        seed=cfg.seed,
        layers=plan.layers,
    )
    return spec if tensor is None else spec.for_tensor(tensor.name)


# device nodes of a GPU that torch.cuda may drive (NVIDIA, ROCm, WSL2)
GPU_NODES = ("/dev/nvidiactl", "/dev/nvidia[0-9]*", "/dev/kfd", "/dev/dxg")


def resolve_device(name: str) -> str:
    """`runtime.device` as 'cpu' or 'cuda'. 'auto' on a machine with no GPU
    device node is 'cpu' without asking torch (whose import a streamed merge
    saves); elsewhere torch.cuda decides."""
    if name == "cpu" or (name == "auto" and not any(glob.glob(p) for p in GPU_NODES)):
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if name == "cuda":
        raise ConfigError("runtime.device: cuda requested but no CUDA device is available")
    return "cpu"


def torch_free(plan: Plan, device: str, backend: str) -> bool:
    """Whether every unit of the plan is copied, streamed (engine/stream.py,
    sums combiners included) or merged from its raw bf16 blocks (engine/raw.py;
    both may still hand a unit back to the torch engine), so that no worker
    should need torch: the C kernels are loaded and the backend is not torch
    (kernels.enabled).
    Decided per distinct combination of dtypes (a plan's tensor table has them),
    or per tensor where its values vary per tensor (MergeSpec.for_tensor)."""
    spec = merge_spec(plan)
    if spec.per_tensor:
        return all(
            _streams(s, t, device, backend) or _raw(plan, s, t, device, backend)
            for t in plan.tensors
            if t.kind == MERGE and (s := spec.for_tensor(t.name)) is not None
        )
    return all(
        streams(spec, device, [*dtypes, out or ""], backend)
        or _raw_dtypes(plan, spec, list(dtypes), out, device, backend)
        for dtypes, out in plan.tensors.dtype_combos(MERGE)
    )


def _streams(spec: MergeSpec, tp: TensorPlan, device: str, backend: str) -> bool:
    """Whether a tensor's units stream (engine/stream.py: the C kernel)."""
    dtypes = [s.dtype for s in tp.sources] + [tp.out_dtype or ""]
    return streams(spec, device, dtypes, backend)


def _raw(plan: Plan, spec: MergeSpec, tp: TensorPlan, device: str, backend: str) -> bool:
    """Whether a tensor's units try the raw bf16 path first (engine/raw.py)."""
    return _raw_dtypes(plan, spec, [s.dtype for s in tp.sources], tp.out_dtype, device, backend)


def _raw_dtypes(
    plan: Plan, spec: MergeSpec, dtypes: list[str], out: str | None, device: str, backend: str
) -> bool:
    return (
        not plan.config.inputs.allow_nonfinite
        and takes(spec, dtypes, out or "", device)
        and kernels.enabled(None, backend)
    )


def nonfinite_input(plan: Plan, unit: Unit, task: int, bad_base: int, bad: int) -> InputError:
    """The input file whose block holds NaN/Inf, given the counts in the base's
    block and in task `task`'s: a non-finite base is reported as such,
    otherwise the model is the culprit."""
    tp = plan.tensors[unit.tensor]
    rows = f"rows {unit.row_start}..{unit.row_end}"
    hint = "(set inputs.allow_nonfinite: true to merge anyway)"
    if bad_base:
        return InputError(
            InputProblem(
                tp.sources[0].file, tp.name, f"{bad_base} NaN/Inf value(s) in {rows} {hint}"
            )
        )
    return InputError(
        InputProblem(
            tp.sources[task + 1].file,
            tp.name,
            f"{bad} NaN/Inf value(s) in {rows} (or values whose difference from the base "
            f"overflows float32) {hint}",
        )
    )


def block_context(plan: Plan, unit: Unit, resolved: dict | None, backend: str) -> BlockContext:
    """A unit's BlockContext: where it sits, what the driver resolved for it, and
    the merge's kernels backend (its dispatch's)."""
    tp = plan.tensors[unit.tensor]
    ctx = BlockContext(
        tensor=tp.name,
        shape=tp.shape,
        row_start=unit.row_start,
        row_end=unit.row_end,
        rng_rows=tp.rng_rows,
        whole=not tp.split,
        backend=backend,
    )
    if resolved:
        ctx.selections = resolved.get("selections")
        ctx.quotas = resolved.get("quotas")
        ctx.rates = resolved.get("rates")
        ctx.majority = resolved.get("majority")
        ctx.tensor_stats = resolved.get("tensor_stats")
    return ctx


# ------------------------------------------------------------------------------------
# statistics rounds
# ------------------------------------------------------------------------------------


def start_kernels(dispatch: Dispatch) -> None:
    """Begin loading the C kernels where the dispatch takes them (the driver
    loaded them when it decided: a Ray actor loads them here, in the
    background, while it reads its first blocks). Nothing is set: the backend
    travels with each call (run_unit, unit_stats)."""
    if resolve_device(dispatch.device) == "cpu":
        kernels.preload(dispatch.kernels)


# ------------------------------------------------------------------------------------
# the apply stage
# ------------------------------------------------------------------------------------


@dataclass
class UnitRecord:
    """What a finished unit reports (kept for the report and for --resume)."""

    unit: int
    tasks: list  # per task: engine.block.TaskStats
    emr_abs_t: list | None = None
    emr_abs_uni: list | None = None
    ties: tuple[int, int, int] | None = None  # (sign sum, cancellations, majority used)
    nonfinite: list | None = None  # [(source index, count)]: the unit was not written
    # NaN/Inf in the merged output (an overflow of the output dtype): not written
    nonfinite_out: int = 0
    # what it wrote, for --resume to check (run/unit_log.py): (file relative to the
    # staging directory, start, end, zlib.crc32) per byte range; for EMR masks
    # ("masks.zarr/<array>", first block, end block, crc32 of the packed bits of every task)
    out: list | None = None


def run_unit(
    plan: Plan, staging: str, unit_id: int, resolved: dict | None, dispatch: Dispatch
) -> UnitRecord | GroupRecord:
    """Merge (or copy) one unit and write its bytes at the planned offsets, on
    the device and kernels backend the driver decided (`dispatch`). A group of
    small whole tensors merges each member on its own, as the unit of one
    tensor would be: the same bytes, one record."""
    unit = plan.units[unit_id]
    if unit.grouped:
        return _run_group(plan, staging, unit, resolved, dispatch)
    return _run_one(plan, staging, unit, resolved, dispatch)


def _run_one(
    plan: Plan, staging: str, unit: Unit, resolved: dict | None, dispatch: Dispatch
) -> UnitRecord:
    tp = plan.tensors[unit.tensor]
    if tp.kind != MERGE:
        return _copy_unit(plan, staging, unit, tp)
    spec = merge_spec(plan, tp)
    device = resolve_device(dispatch.device)
    backend = dispatch.kernels
    ctx = block_context(plan, unit, resolved, backend)
    try:
        if _streams(spec, tp, device, backend):
            rec = _stream_unit(plan, staging, unit, spec, ctx)
            if rec is not None:
                return rec
        if _raw(plan, spec, tp, device, backend):
            rec = _raw_unit(plan, staging, unit, spec, ctx)
            if rec is not None:
                return rec
        from .engine_units import merge_unit

        return merge_unit(plan, staging, unit, resolved, replace(dispatch, device=device))
    except NonFiniteOutput as e:  # (write_out wrote nothing)
        return UnitRecord(unit.id, [], nonfinite_out=e.count)


@dataclass
class GroupRecord:
    """What a finished group of small whole tensors reports, packed: per member
    the crc32 of the one output range it wrote (the range is the plan's:
    unit_output_range of the member) and its figures for the report
    (`task_figures`, or None for a copy). The driver logs it (run/unit_log.py),
    then drops the figures (`where` says where the log holds them)."""

    unit: int
    first: int  # its first member tensor
    crcs: array  # uint32 per member
    figures: list | None  # per member: None, or per task task_figures(...)
    # members that met NaN/Inf: [(tensor, [(source index, count)])], [(tensor, count)]
    nonfinite: list | None = None
    nonfinite_out: list | None = None
    where: tuple[int, int] | None = None  # (offset, length) of its line in the log
    files: tuple[str, ...] = ()  # the output files it wrote (made durable before logging)


def task_figures(st) -> list:
    """A member's TaskStats as the report uses them: [kept, tau_sq, t_sq, selection
    or None], a selection as [n, q_low, q_high, drop_rate, scale, tau_sq, t_sq]."""
    sel = st.selection
    packed = None
    if sel is not None:
        packed = [sel.n, sel.q_low, sel.q_high, sel.drop_rate, sel.scale, sel.tau_sq, sel.t_sq]
    return [st.kept, st.tau_sq, st.t_sq, packed]


def _run_group(
    plan: Plan, staging: str, unit: Unit, resolved: dict | None, dispatch: Dispatch
) -> GroupRecord:
    crcs = array("I")
    files: set[str] = set()
    figures: list = []
    bad_in: list = []
    bad_out: list = []
    for member in plan.members(unit):
        rec = _run_one(plan, staging, member, resolved, dispatch)
        if rec.nonfinite or rec.nonfinite_out:
            if rec.nonfinite:
                bad_in.append((member.tensor, rec.nonfinite))
            else:
                bad_out.append((member.tensor, rec.nonfinite_out))
            crcs.append(0)
            figures.append(None)
            continue
        assert rec.out is not None and len(rec.out) == 1, "a member writes one range"
        files.add(rec.out[0][0])
        crcs.append(rec.out[0][3])
        figures.append([task_figures(t) for t in rec.tasks] if rec.tasks else None)
    return GroupRecord(
        unit.id, unit.tensor, crcs, figures, bad_in or None, bad_out or None,
        files=tuple(sorted(files)),
    )  # fmt: skip


def unit_stats(plan: Plan, unit_id: int, request: StatsRequest, dispatch: Dispatch):
    """One unit's share of a statistics round (see cluster/stats.py), on the
    device and kernels backend the driver decided (`dispatch`)."""
    unit = plan.units[unit_id]
    tp = plan.tensors[unit.tensor]
    device = resolve_device(dispatch.device)
    if isinstance(request, CoarseRequest) and _raw_inputs(tp, device, dispatch.kernels):
        got = _raw_coarse(plan, unit, request, dispatch.kernels)
        if got is not None:
            return got
    if isinstance(request, UnitRequest):
        spec = merge_spec(plan, tp)
        if _streams(spec, tp, device, dispatch.kernels):
            ctx = block_context(plan, unit, request.resolved, dispatch.kernels)
            got = unit_sums(_read_raw(plan, unit), ctx, request)
            if got is not None:
                return got
    from . import engine_units

    return engine_units.unit_stats(plan, unit_id, request, replace(dispatch, device=device))


def _raw_inputs(tp: TensorPlan, device: str, backend: str) -> bool:
    """Whether a unit's task vectors can be counted from its raw bf16 inputs
    (kernels.coarse_sparse_raw) with no float32 block made."""
    return (
        device == "cpu"
        and all(src.dtype == RAW_DTYPE for src in tp.sources)
        and kernels.enabled(None, backend)
    )


def _read_raw(plan: Plan, unit: Unit) -> list[np.ndarray]:
    """The unit's raw input blocks as numpy arrays of their own dtype (bf16: its
    uint16 patterns): maps of the page cache where they pay (block_io.map_bytes),
    else read into the buffers of the torch engine's float32 blocks (at most
    their size): a unit handed back to it holds no more."""
    tp = plan.tensors[unit.tensor]
    n = (unit.row_end - unit.row_start) * tp.row_numel
    blocks = []
    for i, src in enumerate(tp.sources):
        raw = map_bytes(src, unit.row_start, unit.row_end)
        if raw is None:
            buf = POOL.bytes(f"block{i}", n * src.itemsize)
            raw = read_bytes(src, unit.row_start, unit.row_end, buf)
        blocks.append(raw.view(NP_DTYPES[src.dtype]))
    return blocks


def _raw_coarse(plan: Plan, unit: Unit, request: CoarseRequest, backend: str) -> list | None:
    """A coarse request answered from the raw bf16 blocks; None when a task
    vector's keys are not sparse (the torch engine answers it then)."""
    raws = _read_raw(plan, unit)
    n = raws[0].size
    out = []
    for k, model in enumerate(raws[1:]):
        got = kernels.coarse_sparse_raw(raws[0], model)
        if got is None:
            return None
        keys = SparseKeys(n, got[0], got[1])
        st = coarse_stats(keys, moments=request.moments, backend=backend)
        if st.nonfinite and not plan.config.inputs.allow_nonfinite:
            raise nonfinite_input(plan, unit, k, _nonfinite(raws[0]), _nonfinite(model))
        out.append((st, KeysAside.of(keys) if request.keys_aside else None))
    return out


def _raw_unit(
    plan: Plan, staging: str, unit: Unit, spec: MergeSpec, ctx: BlockContext
) -> UnitRecord | None:
    """A magnitude selection with task arithmetic or averaging, from the raw bf16
    blocks (engine/raw.py); None when the torch engine must merge this unit
    (decided before reading where the resolved selections already tell)."""
    if not applies(ctx):
        return None
    return _compiled_unit(plan, staging, unit, lambda raws, out: merge_raw_sparse(
        raws[0], raws[1:], out, spec, ctx
    ))  # fmt: skip


def _row_offset(tp: TensorPlan, row: int, dtype: str) -> int:
    return row * tp.row_numel * DTYPE_SIZE[dtype]


def _stream_unit(
    plan: Plan, staging: str, unit: Unit, spec: MergeSpec, ctx: BlockContext
) -> UnitRecord | None:
    """A streamed merge (engine/stream.py): the inputs stay in their own dtype and
    the output is made in the output dtype, chunk by chunk. None when the torch
    engine must merge this unit (a NaN result; for a sums combiner, what
    merge_raw_sums hands back)."""
    check_finite = not plan.config.inputs.allow_nonfinite
    if spec.compiled_combiner is not None:
        return _compiled_unit(plan, staging, unit, lambda raws, out: merge_raw(
            raws[0], raws[1:], out, spec, check_finite
        ))  # fmt: skip
    return _compiled_unit(plan, staging, unit, lambda raws, out: merge_raw_sums(
        raws, out, spec, ctx, check_finite
    ))  # fmt: skip


def _compiled_unit(plan: Plan, staging: str, unit: Unit, merge) -> UnitRecord | None:
    """Read the unit's raw blocks, `merge(raws, out)` them into the output dtype
    (a compiled path: per-task stats, or None to hand the unit on to the torch
    engine) and write the rows."""
    raws = _read_raw(plan, unit)
    dtype = plan.tensors[unit.tensor].out_dtype
    assert dtype is not None
    out = POOL.bytes("out", raws[0].size * DTYPE_SIZE[dtype]).view(NP_DTYPES[dtype])
    try:
        tasks = merge(raws, out)
    except NonFiniteTaskVector:
        return nonfinite_record(unit.id, [_nonfinite(r) for r in raws])
    if tasks is None:
        return None
    return UnitRecord(unit.id, tasks, out=[write_out(plan, staging, unit, out)])


def _nonfinite(raw: np.ndarray) -> int:
    """NaN/Inf entries of a NP_DTYPES block as the merge reads it, in float32 (bf16:
    exponent bits all 1; float64: also the finite values beyond float32's range,
    Inf once rounded), as the torch engine counts them (engine_units)."""
    if raw.dtype == np.uint16:
        return int(np.count_nonzero((raw & 0x7F80) == 0x7F80))
    if raw.dtype == np.float64:  # (an error path: the copy costs nothing that matters)
        with np.errstate(over="ignore"):
            raw = raw.astype(np.float32)
    return int(np.count_nonzero(~np.isfinite(raw)))


def nonfinite_record(unit_id: int, bad: list[int]) -> UnitRecord:
    """A unit with NaN/Inf in a task vector, not written: the NaN/Inf count of
    each input (the driver sums them per file and tensor), or (-1, 1) when the
    inputs are finite and their difference overflows float32."""
    counts = [(i, b) for i, b in enumerate(bad) if b] or [(-1, 1)]
    return UnitRecord(unit_id, [], nonfinite=counts)


def unit_output_range(plan: Plan, unit: Unit) -> tuple[str, int, int] | None:
    """The bytes of the output shards that a unit writes: (file, start, end), or
    None when its tensor is not in them (excluded tensors of an EMR merge)."""
    tp = plan.tensors[unit.tensor]
    where = plan.shard_of(tp.name)
    if where is None:
        return None
    filename, offset = where
    dtype = tp.out_dtype if tp.kind == MERGE else tp.dtype  # copies keep the base's bytes
    assert dtype is not None
    start = offset + _row_offset(tp, unit.row_start, dtype)
    return filename, start, offset + _row_offset(tp, unit.row_end, dtype)


class NonFiniteOutput(Exception):
    """A unit's merged rows hold NaN/Inf (write_out wrote nothing)."""

    def __init__(self, count: int):
        super().__init__(count)
        self.count = count


# per output dtype: the integer views of its bit patterns (unsigned, signed) and
# the pattern from which, sign bit cleared, a value is NaN/Inf (exponent all ones)
_NONFINITE_FROM: dict[str, tuple[type, type, int]] = {
    "BF16": (np.uint16, np.int16, 0x7F80),
    "F16": (np.uint16, np.int16, 0x7C00),
    "F32": (np.uint32, np.int32, 0x7F800000),
    "F64": (np.uint64, np.int64, 0x7FF0000000000000),
    "F8_E4M3": (np.uint8, np.int8, 0x7F),  # no Inf; NaN is S.1111.111
    "F8_E5M2": (np.uint8, np.int8, 0x7C),
}
_FINITE_CHUNK = 1 << 17  # elements: the two reductions of a chunk share its reading


def nonfinite_out(out, dtype: str) -> int:
    """NaN/Inf entries of a unit's output rows (a numpy array or a CPU tensor, in
    the output dtype `dtype`): 0 in the usual case, found by two integer max
    reductions per cache-sized chunk over the bit patterns and no temporary
    (negative NaN/Inf are the largest unsigned patterns, positive ones the
    largest signed): cheap enough for every output, each chunk read from
    memory once. Counted exactly only when some are there."""
    if not isinstance(out, np.ndarray):
        import torch  # (a tensor comes from the torch engine: loaded)

        out = out.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    raw = np.ascontiguousarray(out).reshape(-1).view(np.uint8)
    if dtype in ("F8_E4M3FNUZ", "F8_E5M2FNUZ"):  # their one NaN: 0x80; no Inf
        return int(np.count_nonzero(raw == 0x80))
    if dtype not in _NONFINITE_FROM:
        return 0
    utype, stype, lim = _NONFINITE_FROM[dtype]
    u = raw.view(utype)
    s = u.view(stype)
    magnitude = int(np.iinfo(stype).max)  # all bits but the sign
    for i in range(0, u.size, _FINITE_CHUNK):
        j = i + _FINITE_CHUNK
        if int(u[i:j].max()) > magnitude + lim or int(s[i:j].max()) >= lim:
            return int(np.count_nonzero((u & utype(magnitude)) >= lim))
    return 0


def write_out(plan: Plan, staging: str, unit: Unit, out) -> tuple[str, int, int, int]:
    """Write a unit's output rows (already in the output dtype) at their offset;
    returns the range written and its checksum (UnitRecord.out).

    Every merged byte goes through here (the streamed, raw bf16 and torch
    engine paths), so here NaN/Inf made by the merge itself (an overflow of
    the output dtype: a large merge.scale or weight, a narrower output.dtype)
    is refused like a non-finite input: NonFiniteOutput, nothing written,
    unless inputs.allow_nonfinite.
    """
    where = unit_output_range(plan, unit)
    assert where is not None
    if not plan.config.inputs.allow_nonfinite:
        tp = plan.tensors[unit.tensor]
        assert tp.out_dtype is not None
        bad = nonfinite_out(out, tp.out_dtype)
        if bad:
            raise NonFiniteOutput(bad)
    return write_checked(staging, where[0], where[1], out)


def write_checked(staging: str, rel: str, offset: int, data) -> tuple[str, int, int, int]:
    """write_at, returning (rel, start, end, crc32) of the bytes written: the
    checksum is taken from the buffer itself, just before it is written."""
    n, crc = write_at_crc(os.path.join(staging, rel), offset, data)
    return rel, offset, offset + n, crc


def _copy_unit(plan: Plan, staging: str, unit: Unit, tp: TensorPlan) -> UnitRecord:
    """Non-float and excluded tensors: copy base bytes (checking non-float ones agree)."""
    raws = [read_bytes(src, unit.row_start, unit.row_end) for src in tp.sources]
    if tp.kind == COPY and tp.numel:
        for src, raw, model in zip(tp.sources[1:], raws[1:], plan.config.models, strict=True):
            if not np.array_equal(raw, raws[0]):
                raise InputError(
                    InputProblem(
                        src.file,
                        tp.name,
                        f"non-floating tensor differs from the base in model '{model.name}' "
                        "(it cannot be merged; exclude it or make the inputs agree)",
                    )
                )
    written = []
    where = unit_output_range(plan, unit)
    if where is not None:
        written.append(write_checked(staging, where[0], where[1], raws[0]))
    if tp.kind == EXCLUDE and plan.task_shards:
        for m, raw, src in zip(plan.config.models, raws[1:], tp.sources[1:], strict=True):
            for shard in plan.task_shards[m.name]:
                if tp.name in shard.data_offsets:
                    written.append(
                        write_checked(
                            staging,
                            f"{TASKS_DIR}/{m.name}/{shard.filename}",
                            shard.tensor_offset(tp.name)
                            + _row_offset(tp, unit.row_start, src.dtype),  # (its own dtype)
                            raw,
                        )
                    )
    return UnitRecord(unit.id, [], out=written)
