"""The resume log (``units.jsonl``): a unit logged is a unit whose bytes are on disk.

One line per finished unit: its statistics (what the report and EMR's rescalers
are made from) and the byte ranges it wrote with their crc32
(:func:`record_to_json`). Two halves (run/state.py's RunState holds the log):

- :class:`UnitLog` appends finished units' records to ``units.jsonl`` in batches,
  and only after the output files those units wrote were fdatasync'ed: a record
  never outlives its data, even across a power failure. A batch goes every
  FLUSH_INTERVAL_S or FLUSH_UNITS records, from a thread of its own, so the
  workers never wait on the disk for it. A failing merge (disk full, Ctrl-C)
  logs what finished before it stops; a killed one loses at most the last
  batch's units, which --resume redoes.
- :func:`check_finished`, on ``--resume``: every record carries the byte ranges its
  unit wrote and their zlib.crc32, computed by the worker from the very buffer it
  handed to pwrite (cluster/worker.py ``write_checked``). Each finished unit's
  ranges are read back; a unit whose bytes do not match (a shard truncated or
  emptied by a crash and rebuilt with zeros, a torn write, a mask chunk lost) is
  redone instead of reused. EMR masks are checked by the crc32 of their packed
  bits as zarr reads them back; they are made durable at publish, not per batch
  (a chunk lost to a crash fails its unit's check on resume).

Why crc32: it is the cheapest of the checks that catch zeros, truncation and
any burst of damage up to 32 bits (longer damage with probability 1 - 2^-32 per
range); zlib's releases the GIL and is in the standard library. On the 2-core
development machine, 64 MB: crc32 0.15 ns/byte, sha256 0.55, blake2b 1.0.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import threading
import time
import zlib
from array import array
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from ..cluster.worker import MASKS_DIR, GroupRecord, UnitRecord
from ..engine.spec import TaskStats
from ..errors import MergeRuntimeError
from ..io import libc
from ..io.block_io import crc_of_range
from .files import writing

log = logging.getLogger("tadmerge")

FLUSH_INTERVAL_S = 1.0  # a batch of records at least this often while units finish
FLUSH_UNITS = 256  # or as soon as this many are waiting
# disk space kept allocated past the log's end: when the disk fills up mid-merge the
# batch that a failing merge still logs fits in it (--resume then reuses those units)
LOG_RESERVE = 16 * 2**10
_FALLOC_FL_KEEP_SIZE = 1
_fallocate = libc.function(
    "fallocate", (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
)


def _reserve(fd: int, end: int, nbytes: int) -> None:
    """Allocate [end, end + nbytes) of the file without changing its size (Linux
    fallocate KEEP_SIZE); advice only: any failure is ignored."""
    if _fallocate is not None:
        _fallocate(fd, _FALLOC_FL_KEEP_SIZE, end, nbytes)


def _is_mask(where: str) -> bool:
    return where.startswith(MASKS_DIR + "/")


def _full(staging: str, rel: str) -> str:
    return os.path.join(staging, *rel.split("/"))


class UnitLog:
    """``units.jsonl``: records appended in batches, each after its data is durable."""

    def __init__(self, path: str, staging: str) -> None:
        self.path = path
        self.staging = staging
        self.interval = FLUSH_INTERVAL_S
        self.max_batch = FLUSH_UNITS
        self._pending: list[tuple[str, list[str], UnitRecord | GroupRecord]] = []
        self._cond = threading.Condition()
        self._io = threading.Lock()  # one batch at a time: lines stay in order
        self._error: MergeRuntimeError | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        try:  # room for the first batches, taken while the disk has some
            with open(path, "ab") as f:
                _reserve(f.fileno(), f.tell(), LOG_RESERVE)
        except OSError:
            pass  # the first batch reports it

    def add(self, rec: UnitRecord | GroupRecord) -> None:
        """Queue a finished unit's record; raises the error of a batch that failed
        in the background. A group's record learns where its line is
        (GroupRecord.where) once the line is written."""
        line = json.dumps(record_to_json(rec)) + "\n"
        if isinstance(rec, GroupRecord):
            files = list(rec.files)
        else:
            files = [w for w, *_ in rec.out or () if not _is_mask(w)]
        with self._cond:
            if self._error is not None:
                raise self._error
            self._pending.append((line, files, rec))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="tadmerge-unit-log", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        """A batch as soon as there is a record to log and the last batch is
        `interval` old (or `max_batch` records wait): the first unit is logged at
        once, and then at most one batch a second."""
        last = -math.inf
        while True:
            with self._cond:
                while not self._closed:
                    wait = last + self.interval - time.monotonic()
                    if self._pending and (len(self._pending) >= self.max_batch or wait <= 0):
                        break
                    self._cond.wait(wait if self._pending else None)
                if self._closed:
                    return
            last = time.monotonic()
            try:
                self._write_batch()
            except MergeRuntimeError as exc:
                with self._cond:
                    self._error = exc
                return

    def flush(self) -> None:
        """Make every record added so far durable and logged (or raise why not)."""
        self._write_batch()
        with self._cond:
            if self._error is not None:
                raise self._error

    def close(self) -> None:
        """Stop the batching thread; records not flushed are dropped (redone on resume)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    def _write_batch(self) -> None:
        with self._io:
            with self._cond:
                batch, self._pending = self._pending, []
            if not batch:
                return
            files = sorted({f for _, fs, _ in batch for f in fs})
            for rel in files:
                path = _full(self.staging, rel)
                with writing(path, "fdatasync of"):
                    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                    try:
                        getattr(os, "fdatasync", os.fsync)(fd)
                    finally:
                        os.close(fd)
            lines = [line.encode() for line, _, _ in batch]
            data = b"".join(lines)
            with writing(self.path), open(self.path, "ab") as f:
                pos = os.fstat(f.fileno()).st_size
                for line, (_, _, rec) in zip(lines, batch, strict=True):
                    if isinstance(rec, GroupRecord):
                        rec.where = (pos, len(line))
                    pos += len(line)
                f.write(data)
                f.flush()
                _reserve(f.fileno(), f.tell(), max(LOG_RESERVE, 2 * len(data)))


def read_records(path: str) -> dict[int, UnitRecord | GroupRecord]:
    """The records logged at `path`, up to the first line a kill cut short (that
    unit and any after it are redone). A group's record keeps where its line is,
    not its figures (read again for the report: read_group_figures)."""
    out: dict[int, UnitRecord | GroupRecord] = {}
    if not os.path.exists(path):
        return out
    pos = 0
    with open(path, "rb") as f:
        for line in f:
            try:
                if not line.endswith(b"\n"):
                    raise ValueError("cut short")
                rec = record_from_json(json.loads(line))
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                break
            if isinstance(rec, GroupRecord):
                rec.figures = None
                rec.where = (pos, len(line))
            pos += len(line)
            out[rec.unit] = rec
    return out


def read_group_figures(path: str, rec: GroupRecord) -> list:
    """A logged group's figures per member (GroupRecord.figures), from its line."""
    assert rec.where is not None, "a group's figures are read once it is logged"
    offset, length = rec.where
    with open(path, "rb") as f:
        f.seek(offset)
        doc = json.loads(f.read(length))
    if doc.get("unit") != rec.unit:
        raise MergeRuntimeError(f"{path}: the record of unit {rec.unit} is not where it was")
    return doc["group"]["figures"]


def _group_matches(staging: str, plan, rec: GroupRecord, rebuilt: set[str]) -> bool:
    """A group's members' output bytes, read back one run of adjacent ranges at a
    time, against their logged crc32s."""
    if plan is None or not 0 <= rec.unit < len(plan.units):
        return False
    unit = plan.units[rec.unit]
    if rec.first != unit.tensor or len(rec.crcs) != unit.count:
        return False
    from ..cluster.worker import unit_output_range

    ranges = [unit_output_range(plan, m) for m in plan.members(unit)]
    if any(r is None or r[0] in rebuilt for r in ranges):
        return False
    i = 0
    while i < len(ranges):
        j = i + 1
        while j < len(ranges) and ranges[j][0] == ranges[i][0] and ranges[j][1] == ranges[j - 1][2]:
            j += 1
        rel, start, end = ranges[i][0], ranges[i][1], ranges[j - 1][2]
        try:
            fd = os.open(_full(staging, rel), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                data = os.pread(fd, end - start, start)
            finally:
                os.close(fd)
        except OSError:
            return False
        if len(data) != end - start:
            return False
        view = memoryview(data)
        for k in range(i, j):
            _, a, b = ranges[k]
            if zlib.crc32(view[a - start : b - start]) != rec.crcs[k]:
                return False
        i = j
    return True


def _matches(staging: str, rec: UnitRecord | GroupRecord, rebuilt: set[str], plan=None) -> bool:
    if isinstance(rec, GroupRecord):
        return _group_matches(staging, plan, rec, rebuilt)
    if rec.out is None:  # no checksums (a log from before them): redo
        return False
    for where, start, end, crc in rec.out:
        if where in rebuilt:
            return False
        if _is_mask(where):
            from ..emr.store import MaskStore

            got = MaskStore(_full(staging, MASKS_DIR)).checksum(where.split("/", 1)[1], start, end)
        else:
            got = crc_of_range(_full(staging, where), start, end)
        if got != crc:
            return False
    return True


def check_finished(
    staging: str, done: dict[int, UnitRecord], rebuilt: Iterable[str], plan=None
) -> dict[int, UnitRecord]:
    """The finished units whose output bytes still match their records' checksums.

    `rebuilt`: output files (relative to staging) that were just recreated empty:
    their units are redone without reading them. Reads every finished unit's
    output once (resume only), in parallel: crc32 and pread release the GIL.
    A group's ranges are the plan's (`plan`: without it, groups are redone).
    """
    rebuilt = set(rebuilt)
    recs = list(done.values())
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        ok = list(pool.map(lambda r: _matches(staging, r, rebuilt, plan), recs))
    kept = {r.unit: r for r, good in zip(recs, ok, strict=True) if good}
    bad = len(recs) - len(kept)
    if bad:
        log.warning(
            "--resume: %d of %d finished unit(s) no longer match their logged checksum "
            "(output damaged or rebuilt after a crash); they are redone",
            bad,
            len(recs),
        )
    return kept


def out_to_json(out: list | None) -> list | None:
    return None if out is None else [list(e) for e in out]


def out_from_json(doc) -> list | None:
    """UnitRecord.out from its JSON; None (redo the unit) when malformed."""
    if not isinstance(doc, list):
        return None
    out = []
    for e in doc:
        if not (
            isinstance(e, list)
            and len(e) == 4
            and isinstance(e[0], str)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in e[1:])
            and ".." not in e[0].split("/")
            and not e[0].startswith("/")
        ):
            return None
        out.append(tuple(e))
    return out


def _selection_json(sel) -> dict:  # an engine.selection.Selection
    # vars() of the flat dataclasses: dataclasses.asdict deep-copies, and this runs
    # for every task of every unit
    return {**vars(sel), "lo": dict(vars(sel.lo)), "hi": dict(vars(sel.hi))}


def _stats_json(st) -> dict:
    return {
        "kept": st.kept,
        "selection": None if st.selection is None else _selection_json(st.selection),
        "tau_sq": st.tau_sq,
        "t_sq": st.t_sq,
    }


def record_to_json(rec: UnitRecord | GroupRecord) -> dict:
    """A unit's line in the log (the resume format: read back by record_from_json).
    A group's: its first member, each member's crc32 and figures
    (cluster/worker.task_figures), in one line."""
    if isinstance(rec, GroupRecord):
        group = {"first": rec.first, "crcs": rec.crcs.tolist(), "figures": rec.figures}
        return {"unit": rec.unit, "group": group}
    return {
        "unit": rec.unit,
        "tasks": [_stats_json(t) for t in rec.tasks],
        "emr_abs_t": None if rec.emr_abs_t is None else [s.to_json() for s in rec.emr_abs_t],
        "emr_abs_uni": None if rec.emr_abs_uni is None else [s.to_json() for s in rec.emr_abs_uni],
        "ties": None if rec.ties is None else list(rec.ties),
        "out": out_to_json(rec.out),
    }


def record_from_json(d: dict) -> UnitRecord | GroupRecord:
    """A logged line back; the engine's types are imported only for what it holds
    (a merge without selections or EMR sums reads its log without torch)."""
    if "group" in d:
        g = d["group"]
        crcs = array("I", g["crcs"])
        if not isinstance(d["unit"], int) or not isinstance(g["first"], int):
            raise TypeError("unit")
        return GroupRecord(d["unit"], g["first"], crcs, g["figures"])
    tasks = []
    for t in d["tasks"]:
        sel = t["selection"]
        if sel is not None:
            from ..engine.histogram import Cut
            from ..engine.selection import Selection

            sel = Selection(**{**sel, "lo": Cut(**sel["lo"]), "hi": Cut(**sel["hi"])})
        tasks.append(
            TaskStats(
                kept=t["kept"],
                selection=sel,
                tau_sq=t["tau_sq"],
                t_sq=t["t_sq"],
            )
        )

    def conv(v: list | None) -> list | None:
        if v is None:
            return None
        from ..engine.exact import ExactSum

        return [ExactSum.from_json(x) for x in v]

    ties = None if d.get("ties") is None else tuple(d["ties"])
    return UnitRecord(
        d["unit"],
        tasks,
        conv(d["emr_abs_t"]),
        conv(d["emr_abs_uni"]),
        ties,
        out=out_from_json(d.get("out")),
    )
