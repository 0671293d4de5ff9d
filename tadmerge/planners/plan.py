"""The plan: plain data that says exactly what every worker will do.

Units are row blocks of one tensor, sized so that one unit's working set fits
the memory budget of one worker, and aligned to canonical blocks of the tensor
(a function of its shape only) so that random streams and EMR mask chunks do not
depend on the budget. Output shards and every tensor's byte offset are fixed
here, before any data is read, so workers anywhere can write their bytes in
place. The fingerprint covers the config, the layout and the version of every
input file that was planned with (io/identity.py: inode, size, mtime, ctime and
the digest of its header; for a Hub snapshot, its revision, file name, size and
header digest): `--resume` reuses finished work only under the same fingerprint.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal

import numpy as np

from .. import __version__, methods
from ..config import MergeConfig, RuntimeSpec, format_size, size_is_binary
from ..engine.spec import MAGNITUDE_METHODS
from ..errors import ConfigError
from ..io.block_io import OutputTensor, ShardSpec, layout_shards
from ..io.checkpoint import Checkpoint
from ..io.entries import EntryTable, RowEntries, aligned
from ..io.identity import FileIdentity
from ..io.publish import check_output_outside_inputs
from ..io.safetensors_format import TensorEntry
from .inventory import EXCLUDE, MERGE, PASS, classify, open_inputs

CANONICAL_ELEMS = 1 << 20  # elements per canonical row block (RNG streams, mask chunks)
FIXED_OVERHEAD = 48 * 2**20  # chunk temporaries (engine CHUNK_ELEMENTS), histograms, slack
# on a GPU: up to 12 float32 temporaries of one chunk (engine GPU_CHUNK_ELEMENTS = 2**22)
GPU_FIXED_OVERHEAD = 12 * 4 * 2**22
# 64 MB: FIXED_OVERHEAD plus room for a unit. Decimal, so that '64MB' is enough (and '64MiB').
MIN_WORKER_BUDGET = 64 * 10**6
# Groups: in a plan of at least GROUP_MIN_TENSORS tensors, consecutive small whole
# tensors share one unit (up to GROUP_TENSORS of them and GROUP_BYTES of input),
# each merged on its own by the worker: one dispatch, one resume-log record and
# one report read per group instead of per tensor. Smaller plans (every ordinary
# checkpoint) keep one unit per tensor, so their plans, logs and reports are
# unchanged.
GROUP_MIN_TENSORS = 4096
GROUP_TENSORS = 4096
GROUP_BYTES = 8 * 2**20
GROUP_MEMBER_BYTES = 2**20  # a member's input bytes (all its sources) at most
_TORCH_NAME = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}


@dataclass(frozen=True, slots=True)
class Unit:
    id: int
    tensor: int  # index into Plan.tensors (a group's first member)
    row_start: int
    row_end: int
    # tensors in the unit: 1 for a row block of one tensor; more for a group of
    # small whole tensors (tensor .. tensor + count - 1), each merged on its own
    count: int = 1

    @property
    def grouped(self) -> bool:
        return self.count > 1


class UnitTable(Sequence):
    """The plan's units as four int64 columns (tensor, row_start, row_end, count);
    a Unit is made on access. A list of a million Unit objects cost ~165 bytes each."""

    __slots__ = ("_cols",)

    def __init__(self) -> None:
        self._cols = (array("q"), array("q"), array("q"), array("q"))

    def append(self, unit: Unit) -> None:
        assert unit.id == len(self._cols[0]), "units are appended in id order"
        t, a, b, c = self._cols
        t.append(unit.tensor)
        a.append(unit.row_start)
        b.append(unit.row_end)
        c.append(unit.count)

    def add_member(self) -> None:
        """One more tensor in the last unit (a group of small whole tensors)."""
        self._cols[3][-1] += 1

    def __len__(self) -> int:
        return len(self._cols[0])

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        t, a, b, c = self._cols
        if i < 0:
            i += len(t)
        return Unit(i, t[i], a[i], b[i], c[i])

    def __iter__(self):
        t, a, b, c = self._cols
        return (Unit(i, t[i], a[i], b[i], c[i]) for i in range(len(t)))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


@dataclass(slots=True)
class TensorPlan:
    index: int
    name: str
    shape: tuple[int, ...]
    dtype: str  # the base's dtype (a model's may be another float dtype: inventory.casts)
    kind: str  # merge | copy | exclude
    reason: str
    sources: Sequence[TensorEntry]  # base, then one per model (a tuple or RowEntries)
    out_dtype: str | None  # None: not written to the main output (EMR copy/exclude)
    rng_rows: int
    # ids of its units: consecutive, a range (a list per tensor costs a million lists)
    units: range | list[int] = field(default_factory=list)

    # the shape figures: `shape` is the base entry's (every input agrees on it),
    # taken from the shape rather than the entry, which a TensorTable makes anew
    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_numel(self) -> int:
        return math.prod(self.shape[1:]) if len(self.shape) > 1 else 1

    @property
    def split(self) -> bool:
        return len(self.units) > 1


class _Ints:
    """An int column (non-negative) of one byte per row, widened when a value needs it."""

    __slots__ = ("a",)
    _WIDER = {"B": "H", "H": "I", "I": "q"}

    def __init__(self) -> None:
        self.a = array("B")

    def append(self, value: int) -> None:
        while True:
            try:
                self.a.append(value)
                return
            except OverflowError:
                self.a = array(self._WIDER[self.a.typecode], self.a)

    def __getitem__(self, row: int) -> int:
        return self.a[row]

    def __len__(self) -> int:
        return len(self.a)

    def np(self) -> np.ndarray:
        """The column as a numpy array (a view)."""
        return np.frombuffer(self.a, dtype=self.a.typecode) if len(self.a) else np.zeros(0, int)


class _Codes:
    """A column of few distinct values: the values once, and an index per row."""

    __slots__ = ("ids", "index", "values")

    def __init__(self) -> None:
        self.values: list = []
        self.index: dict = {}
        self.ids = _Ints()

    def append(self, value) -> None:
        i = self.index.get(value)
        if i is None:
            i = self.index[value] = len(self.values)
            self.values.append(value)
        self.ids.append(i)

    def __getitem__(self, row: int):
        return self.values[self.ids[row]]


class TensorTable(Sequence):
    """The plan's tensors as columns; a TensorPlan is made on access.

    A TensorPlan object per tensor, with its shape tuple, sources and range of
    units, cost ~350 bytes: a million tiny tensors held ~350 MB in them alone.
    Here a tensor costs its name (shared with the inputs' EntryTables) and ~30
    bytes of columns; its sources are the row of the inputs' aligned
    EntryTables (io/entries.RowEntries), or kept as given where inputs are not
    aligned (layer stacking, vocabulary rows)."""

    __slots__ = (
        "names", "shape", "dtype", "kind", "reason", "out_dtype", "rng_rows", "unit_first",
        "unit_end", "columns", "sources", "_last",
    )  # fmt: skip

    def __init__(self, names: list[str], columns: tuple[EntryTable, ...] | None) -> None:
        self.names = names
        self.shape, self.dtype, self.kind = _Codes(), _Codes(), _Codes()
        self.reason, self.out_dtype = _Codes(), _Codes()
        self.rng_rows, self.unit_first, self.unit_end = _Ints(), _Ints(), _Ints()
        self.columns = columns
        self.sources: list[Sequence[TensorEntry]] | None = None if columns is not None else []
        self._last: tuple[int, TensorPlan | None] = (-1, None)

    def append(self, tp: TensorPlan) -> None:
        assert tp.index == len(self.rng_rows) and tp.name == self.names[tp.index]
        self.shape.append(tp.shape)
        self.dtype.append(tp.dtype)
        self.kind.append(tp.kind)
        self.reason.append(tp.reason)
        self.out_dtype.append(tp.out_dtype)
        self.rng_rows.append(tp.rng_rows)
        units = tp.units if isinstance(tp.units, range) else range(tp.units[0], tp.units[-1] + 1)
        self.unit_first.append(units.start)
        self.unit_end.append(units.stop)
        if self.sources is not None:
            self.sources.append(tp.sources)

    def __len__(self) -> int:
        return len(self.rng_rows)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        last = self._last  # (a unit's tensor is asked for several times in a row)
        if last[0] == i:
            return last[1]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        cols = self.columns
        tp = TensorPlan(
            index=i,
            name=self.names[i],
            shape=self.shape[i],
            dtype=self.dtype[i],
            kind=self.kind[i],
            reason=self.reason[i],
            sources=RowEntries(cols, i) if cols is not None else self.sources[i],  # type: ignore[index]
            out_dtype=self.out_dtype[i],
            rng_rows=self.rng_rows[i],
            units=range(self.unit_first[i], self.unit_end[i]),
        )
        self._last = (i, tp)
        return tp

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def input_bytes(self) -> int:
        """Bytes of every tensor's sources, from the columns where they are."""
        if self.columns is not None:
            return sum(sum(t.nbytes) for t in self.columns)
        return sum(e.nbytes for s in self.sources or () for e in s)

    def find(self, name: str) -> int:
        """The index of the tensor `name`, or -1 (names are sorted)."""
        i = bisect.bisect_left(self.names, name)
        return i if i < len(self.names) and self.names[i] == name else -1

    def source_bytes(self, lo: int, hi: int) -> int | None:
        """Bytes of the sources of tensors lo..hi-1, from the columns (None without)."""
        if self.columns is None:
            return None
        return sum(sum(t.nbytes[lo:hi]) for t in self.columns)

    def dtype_combos(self, kind: str) -> set[tuple[tuple[str, ...], str | None]]:
        """The distinct (source dtypes, output dtype) of the tensors of `kind`."""
        if kind not in self.kind.index:
            return set()
        kinds = self.kind.ids.np() == self.kind.index[kind]
        outs = self.out_dtype.ids.np()[kinds].astype(np.uint32)
        if self.columns is None:
            rows = np.flatnonzero(kinds).tolist()
            return {
                (tuple(e.dtype for e in self.sources[i]), self.out_dtype[i])  # type: ignore[index]
                for i in rows
            }
        from ..io.entries import _DTYPE_LIST

        codes = np.stack(
            [np.frombuffer(t.dtype, dtype=np.uint8)[kinds].astype(np.uint32) for t in self.columns]
            + [outs]
        )
        found = np.unique(codes, axis=1) if codes.shape[1] else codes
        return {
            (
                tuple(_DTYPE_LIST[c] for c in col[:-1]),
                self.out_dtype.values[col[-1]],
            )
            for col in found.T.tolist()
        }

    def any_split(self, kind: str) -> bool:
        """Whether a tensor of `kind` has several units."""
        kinds = self.kind.index
        if kind not in kinds:
            return False
        code = kinds[kind]
        first, end = self.unit_first.np().astype(np.int64), self.unit_end.np().astype(np.int64)
        return bool(((end - first > 1) & (self.kind.ids.np() == code)).any())


@dataclass
class Plan:
    config: MergeConfig
    inputs: list[Checkpoint]
    tensors: TensorTable
    units: Sequence[Unit]  # (a UnitTable)
    shards: list[ShardSpec]
    task_shards: dict[str, list[ShardSpec]]  # EMR: excluded tensors kept per task
    unit_budget: int
    fingerprint: str = ""
    # input file -> the version planned with (the one every TensorEntry carries)
    identities: dict[str, FileIdentity] = field(default_factory=dict)
    layers: int = 0  # transformer layers (methods.registry.layer_of): gradients' span

    # layer stacking (planners/slices.py): per output layer, (input index, source layer)
    layer_map: tuple[tuple[int, int], ...] | None = None

    @property
    def is_emr(self) -> bool:
        return self.config.merge.method == "emr"

    @property
    def magnitude_stats(self) -> bool:
        return self.config.sparsify.method in MAGNITUDE_METHODS

    @property
    def global_scope(self) -> bool:
        return self.magnitude_stats and self.config.sparsify.scope == "global"

    def shard_of(self, name: str) -> tuple[str, int] | None:
        for s in self.shards:
            if name in s.data_offsets:
                return s.filename, s.tensor_offset(name)
        return None

    @property
    def input_bytes(self) -> int:
        if isinstance(self.tensors, TensorTable):
            return self.tensors.input_bytes()
        return sum(e.nbytes for t in self.tensors for e in t.sources)

    def any_split_merge(self) -> bool:
        """Whether a merged tensor is split into row blocks (statistics rounds)."""
        if isinstance(self.tensors, TensorTable):
            return self.tensors.any_split(MERGE)
        return any(t.split and t.kind == MERGE for t in self.tensors)

    def find_tensor(self, name: str) -> TensorPlan | None:
        """The tensor `name` of the plan, or None."""
        if isinstance(self.tensors, TensorTable):
            i = self.tensors.find(name)
            return self.tensors[i] if i >= 0 else None
        return next((t for t in self.tensors if t.name == name), None)

    def unit_source_bytes(self, unit: Unit) -> int | None:
        """The input bytes of a group's members, from the columns (None otherwise)."""
        if unit.grouped and isinstance(self.tensors, TensorTable):
            return self.tensors.source_bytes(unit.tensor, unit.tensor + unit.count)
        return None

    def members(self, unit: Unit) -> list[Unit]:
        """The units of one tensor each that a unit is made of: itself, or a
        group's members (whole tensors), with the group's id."""
        if not unit.grouped:
            return [unit]
        out = []
        for t in range(unit.tensor, unit.tensor + unit.count):
            tp = self.tensors[t]
            out.append(Unit(unit.id, t, 0, tp.rows if tp.shape else 1))
        return out

    @property
    def output_bytes(self) -> int:
        return sum(s.file_size for s in self.shards)

    def needs_stats(self) -> bool:
        if self.global_scope:
            return True
        # a combiner's whole-tensor statistics (cluster/tensor_stats.py) need rounds too
        whole_tensor = methods.combiner(self.config.merge.method).statistics is not None
        return (self.magnitude_stats or whole_tensor) and self.any_split_merge()

    def summary(self) -> dict:
        kinds: dict[str, int] = {}
        for t in self.tensors:
            kinds[t.kind] = kinds.get(t.kind, 0) + 1
        return {
            "tensors": len(self.tensors),
            "by_kind": kinds,
            "units": len(self.units),
            "split_tensors": sum(1 for t in self.tensors if t.split),
            "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
            "shards": [s.filename for s in self.shards],
            "unit_budget": self.unit_budget,
            "stats_stage": self.needs_stats(),
        }


def bytes_per_element(k: int, itemsize: int, method: str = "ties", sparsify: str = "none") -> int:
    """Working set per element of a unit (engine/block.py), with a small margin.

    Always: K+1 float32 blocks (τ_k and t_k are made in place, and the merge is
    written over the first), one raw block being converted, the output cast.
    Each method adds what it holds whole-block (its `extra_bytes`, methods/):
    a magnitude sparsifier the keys of the fine histograms' buckets, DARE the
    draws of every task, DELLA its per-row ranking, EMR its K masks. Phase two
    works in chunks of fixed size (in FIXED_OVERHEAD).
    """
    n = 4 * (k + 1) + itemsize + max(itemsize, 4) + 4
    return n + methods.sparsifier(sparsify).extra_bytes(k) + methods.combiner(method).extra_bytes(k)


def canonical_rows(row_numel: int, block_elements: int = CANONICAL_ELEMS) -> int:
    return max(1, block_elements // max(1, row_numel))


def out_dtype_for(cfg: MergeConfig, kind: str, in_dtype: str) -> str | None:
    if cfg.merge.method == "emr":
        return _TORCH_NAME[cfg.emr.delta_dtype] if kind == MERGE else None
    if kind == MERGE and cfg.output.dtype != "auto":
        return _TORCH_NAME[cfg.output.dtype]
    return in_dtype


def check_worker_budget(rt: RuntimeSpec) -> int:
    """The memory budget of one worker; a ConfigError, in the units the budget was
    written in (MB or MiB), with the arithmetic spelled out, when it is under the
    minimum. Local workers share the budget; each Ray worker has all of it."""
    local = rt.executor == "local"
    workers = rt.local_workers() if local else 1
    per_worker = rt.memory_budget // workers
    if per_worker >= MIN_WORKER_BUDGET:
        return per_worker
    binary = size_is_binary(rt.memory_budget)
    budget = format_size(rt.memory_budget, binary)
    least = format_size(MIN_WORKER_BUDGET, binary, up=True)
    key = "runtime.memory_budget (--memory-budget)"
    if not local:
        raise ConfigError(
            f"{key}: {budget} per Ray worker is under the minimum of {least} per worker; "
            f"set it to at least {least}"
        )
    if workers == 1:
        raise ConfigError(
            f"{key}: {budget} is under the minimum of {least} for one worker; "
            f"set it to at least {least}"
        )
    number, unit = least.split(" ")
    total = f"{(Decimal(number) * workers).normalize():f} {unit}"
    fits = rt.memory_budget // MIN_WORKER_BUDGET
    fewer = f", or runtime.workers (--workers) to {fits}" if fits >= 1 else ""
    raise ConfigError(
        f"{key}: {budget} shared by {workers} local workers is "
        f"{format_size(per_worker, binary)} each, under the minimum of {least} per worker "
        f"({workers} workers × {least} = {total}); set it to at least {total}{fewer}"
    )


def make_plan(
    cfg: MergeConfig,
    *,
    inputs: list[Checkpoint] | None = None,
    device: str | None = None,
    fetch: bool = True,
) -> Plan:
    """Headers only: open, validate, classify, split into units, lay out shards.

    `device`: where units will run, as the driver's dispatch decided (default:
    runtime.device). On a GPU, units also fit `runtime.gpu_memory_budget` (or
    the memory budget, applied to the GPU's memory). `fetch=False`: hub inputs
    stay header-only (no weights downloaded): a plan to print or compare, not to run."""
    layer_map = None
    if cfg.slices:  # layer stacking: each output tensor's sources (planners/slices.py)
        from . import slices

        if inputs is None:
            stack = cfg.merge.method == "passthrough"
            inputs = slices.open_slice_inputs(cfg) if stack else open_inputs(cfg, fetch=fetch)
        check_output_outside_inputs(cfg.output.path, [c.root for c in inputs])
        lay = slices.layout(cfg, inputs)
        stacked: dict | None = lay.tensors
        layer_map = lay.layer_map
        kinds = {n: (kind, reason) for n, (kind, reason, _) in stacked.items()}
    else:
        inputs = inputs if inputs is not None else open_inputs(cfg, fetch=fetch)
        check_output_outside_inputs(cfg.output.path, [c.root for c in inputs])
        stacked = None
        kinds = classify(cfg, inputs)
    k = len(cfg.models)
    per_worker = check_worker_budget(cfg.runtime)
    unit_budget = per_worker - FIXED_OVERHEAD
    if (device or cfg.runtime.device) == "cuda" or cfg.runtime.gpu_memory_budget is not None:
        gpu = cfg.runtime.gpu_memory_budget or cfg.runtime.memory_budget
        least = GPU_FIXED_OVERHEAD + MIN_WORKER_BUDGET - FIXED_OVERHEAD
        if gpu < least:
            binary = size_is_binary(gpu)
            raise ConfigError(
                f"runtime.gpu_memory_budget: {format_size(gpu, binary)} of GPU memory per "
                f"worker is under the minimum of {format_size(least, binary, up=True)}"
            )
        unit_budget = min(unit_budget, gpu - GPU_FIXED_OVERHEAD)

    units = UnitTable()
    # inputs whose entries are columns with one name list: a tensor's sources are
    # made on access from its row (io/entries.RowEntries), not held per input
    columns = aligned([c.tensors for c in inputs]) if stacked is None else None
    names = sorted(kinds)
    if columns is not None and columns[0].names == names:
        names = columns[0].names  # (one list: the inputs')
    tensors = TensorTable(names, columns)
    # small whole tensors share units (groups), in plans of very many tensors
    grouping = (
        stacked is None
        and len(names) >= GROUP_MIN_TENSORS
        and cfg.merge.method != "emr"
        and not (cfg.sparsify.method in MAGNITUDE_METHODS and cfg.sparsify.scope == "global")
    )
    group_bytes = group_members = 0
    one_row = cfg.sparsify.method == "della" or methods.combiner(cfg.merge.method).whole_rows
    per_elem: dict[int, int] = {}  # itemsize -> bytes_per_element
    for i, name in enumerate(names):
        kind, reason = kinds[name]
        if stacked is not None:
            sources: Sequence[TensorEntry] = stacked[name][2]
        elif columns is not None:
            sources = RowEntries(columns, i)
        else:
            sources = tuple(c.tensors[name] for c in inputs)
        entry = sources[0]
        # (a vocabulary tensor on the output's vocabulary is made in float32 from the
        # base's own dtype: io/vocab_rows.VocabEntry.stored_dtype)
        dtype = getattr(entry, "stored_dtype", "") or entry.dtype
        shape = tuple(entry.shape)
        row_numel = entry.row_numel
        # a tensor smaller than one canonical block is one block of its own rows
        # (same random-stream prefix; no padding in the EMR mask chunks)
        rng_rows = min(max(1, entry.rows), canonical_rows(row_numel, cfg.runtime.block_elements))
        srcs = list(sources) if columns is not None else sources
        itemsize = max(e.itemsize for e in srcs)  # (a model may be wider: F32)
        if itemsize not in per_elem:
            per_elem[itemsize] = bytes_per_element(
                k, itemsize, cfg.merge.method, cfg.sparsify.method
            )
        per_row = row_numel * per_elem[itemsize]
        whole_rows = entry.rows
        numel = entry.numel
        if kind == PASS:  # a copy of one source: row blocks within the budget
            step = max(1, unit_budget // max(1, 2 * row_numel * itemsize))
            if cfg.runtime.max_unit_elements is not None:
                step = min(step, max(1, cfg.runtime.max_unit_elements // row_numel))
        elif kind != MERGE or (one_row and len(shape) <= 1):
            step = whole_rows  # DELLA, arcee_fusion: a 1-D tensor is one row, never split
        else:
            step = max(1, unit_budget // max(1, per_row))
            if cfg.runtime.max_unit_elements is not None:
                step = min(step, max(1, cfg.runtime.max_unit_elements // row_numel))
            step = max(rng_rows, (step // rng_rows) * rng_rows)
        if numel == 0:
            step = max(1, whole_rows)
        out_dtype = out_dtype_for(cfg, kind, dtype)
        first = len(units)
        nbytes = sum(e.nbytes for e in srcs)
        if (
            grouping
            and kind != PASS
            and out_dtype is not None
            and max(whole_rows, 1) <= max(step, 1)
            and nbytes <= GROUP_MEMBER_BYTES
        ):  # one unit: joins the open group, or opens one
            if (
                group_members
                and group_members < GROUP_TENSORS
                and (group_bytes + nbytes <= GROUP_BYTES)
            ):
                first -= 1
                units.add_member()
                group_members += 1
                group_bytes += nbytes
            else:
                units.append(Unit(first, i, 0, whole_rows if shape else 1))
                group_members, group_bytes = 1, nbytes
        else:
            group_members = 0
            for start in range(0, max(whole_rows, 1), max(step, 1)):
                units.append(
                    Unit(len(units), i, start, min(whole_rows, start + step) if shape else 1)
                )
        tensors.append(
            TensorPlan(
                index=i,
                name=name,
                shape=shape,
                dtype=dtype,
                kind=kind,
                reason=reason,
                sources=sources,
                out_dtype=out_dtype,
                rng_rows=rng_rows,
                units=range(first, len(units)),
            )
        )
    del kinds

    meta = {"tadmerge_version": __version__, "merge_method": cfg.merge.method}
    shards: list = (
        _layout_columns(tensors, cfg.output.shard_size, meta)
        if len(names) >= GROUP_MIN_TENSORS
        else layout_shards(
            [OutputTensor(t.name, t.out_dtype, t.shape) for t in tensors if t.out_dtype],
            cfg.output.shard_size,
            meta,
        )
    )
    task_shards: dict[str, list[ShardSpec]] = {}
    if cfg.merge.method == "emr":
        # excluded tensors are kept per task in the task's own dtype
        if any(t.kind == EXCLUDE for t in tensors):
            for k, m in enumerate(cfg.models):
                excluded = [
                    OutputTensor(t.name, t.sources[k + 1].dtype, t.shape)
                    for t in tensors
                    if t.kind == EXCLUDE
                ]
                task_shards[m.name] = layout_shards(excluded, cfg.output.shard_size, meta)
    plan = Plan(cfg, inputs, tensors, units, shards, task_shards, unit_budget)
    plan.layer_map = layer_map
    plan.identities = {}
    for ck in inputs:
        if isinstance(ck.tensors, EntryTable):  # (per file, not per tensor)
            tab = ck.tensors
            pairs = zip(tab.files, tab.identities, strict=True)
            plan.identities.update((f, ident) for f, ident in pairs if ident is not None)
        else:
            plan.identities.update(
                (e.file, e.identity) for e in ck.tensors.values() if e.identity is not None
            )
    from ..methods.registry import layer_of

    found = [i for n in names if (i := layer_of(n)) is not None]
    plan.layers = max(found) + 1 if found else 0
    check_per_tensor(plan)
    plan.fingerprint = fingerprint(plan)
    return plan


def check_per_tensor(plan: Plan) -> None:
    """Resolve every merged tensor's per-tensor values now (gradients, {filter,
    value} entries: engine/spec.py MergeSpec.for_tensor), so that a tensor no
    filter entry applies to, or values a method's rule refuses there, is a
    ConfigError naming the tensor before any checkpoint data is read."""
    from ..cluster.worker import merge_spec

    if not merge_spec(plan).per_tensor:
        return
    for t in plan.tensors:
        if t.kind == MERGE:
            merge_spec(plan, t)


def _layout_columns(tensors: TensorTable, shard_size: int, meta: dict) -> list:
    """The main output's shards of a large plan, laid out from the tensor table's
    columns (io/layout.py: the bytes of block_io.layout_shards)."""
    from ..io.layout import layout_table

    ids = tensors.out_dtype.ids.np()
    values = tensors.out_dtype.values
    written = ~np.isin(ids, [j for j, v in enumerate(values) if v is None])
    rows = np.flatnonzero(written)
    names = (
        tensors.names if len(rows) == len(tensors) else [tensors.names[i] for i in rows.tolist()]
    )
    shape_ids = tensors.shape.ids.np()[rows]
    dtypes = [v or "F32" for v in values]  # (None: rows left out)
    return layout_table(names, dtypes, ids[rows], tensors.shape.values, shape_ids, shard_size, meta)


def input_versions(plan: Plan) -> dict[str, dict]:
    """What `--resume` compares per input file, keyed by a name for messages.

    A local file: its path, and inode, size, mtime, ctime and header digest (no
    device number: a shared filesystem gives each node its own). A Hub snapshot's
    file: the repo, commit and file name and the digest of its tensor table
    (io/hub_inputs.py), the same whether planned from its header alone or
    downloaded, so that the same commit fetched again (another cache, another node)
    resumes, and `tadmerge plan` gives the fingerprint the merge records.
    """
    out: dict[str, dict] = {}
    for ck in plan.inputs:
        hub = dict(ck.hub_versions)
        for f in ck.files:
            ident = plan.identities.get(f)
            if f in hub:  # (its commit and tensor table: planned from headers or downloaded)
                rel = os.path.relpath(f, ck.root)
                out[f"{ck.source}@{ck.revision}/{rel}"] = {"tensors_sha256": hub[f]}
            elif ident is None:  # a file holding no tensor: nothing is read from it
                st = os.stat(f)
                out[f] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
            elif ck.revision is not None:
                rel = os.path.relpath(f, ck.root)
                out[f"{ck.source}@{ck.revision}/{rel}"] = {
                    "size": ident.size,
                    "header_sha256": ident.header_sha256,
                }
            else:
                out[f] = ident.resume_key()
    return out


def fingerprint(plan: Plan) -> str:
    """Hash of everything that decides the output bytes: config, inputs, layout."""
    cfg = plan.config.to_dict()
    for key in (
        "executor", "workers", "progress", "max_retries", "cpus_per_worker", "kernels",
        "worker_start_timeout", "if_changed",
    ):  # fmt: skip
        cfg["runtime"].pop(key, None)
    cfg["output"].pop("path", None)
    # (where it is published, not what)
    for key in ("keep", "push_to_hub", "hub_private", "hub_replace_weights"):
        cfg["output"].pop(key, None)
    doc = {
        "version": __version__,
        "config": cfg,
        "files": sorted(input_versions(plan).items()),
        "units": _UNITS,
        # (each header's hex fed in chunks: as one string it cost 2 bytes per header byte)
        "shards": [[s.filename, _SHARD.format(j)] for j, s in enumerate(plan.shards)],
    }
    vocab = plan.inputs[0].vocabulary if plan.inputs else None
    if vocab is not None:  # tokenizer: union | <model>: its row maps and files
        doc["vocabulary"] = vocab.digest  # type: ignore[attr-defined]
    # The hash of json.dumps(doc) with "units" the list of [tensor, row_start, row_end]
    # (and the member count of a group), that list fed in pieces: as one document it
    # cost ~100 bytes per unit at once.
    text = json.dumps(doc, sort_keys=True, default=str)
    h = hashlib.sha256()
    for j, shard in enumerate(plan.shards):
        head, text = text.split(json.dumps(_SHARD.format(j)), 1)
        h.update(head.encode() + b'"')
        chunks = shard.header_chunks() if hasattr(shard, "header_chunks") else [shard.header]
        for chunk in chunks:
            h.update(chunk.hex().encode())
        h.update(b'"')
    head, tail = text.split(json.dumps(_UNITS), 1)
    h.update(head.encode())
    units = plan.units
    for i in range(0, len(units), 4096):
        sep = "[" if i == 0 else ", "
        h.update(
            (
                sep
                + ", ".join(
                    f"[{u.tensor}, {u.row_start}, {u.row_end}"
                    + (f", {u.count}]" if u.grouped else "]")
                    for u in units[i : i + 4096]
                )
            ).encode()
        )
    h.update(("]" if units else "[]").encode() + tail.encode())
    return h.hexdigest()


_UNITS = "\x00units\x00"  # a placeholder no config value can hold (NUL is refused)
_SHARD = "\x00shard{}\x00"
