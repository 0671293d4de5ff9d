"""Positional block I/O on safetensors files, and the output shard layout.

Reading: merges stream models far larger than RAM, so nothing maps a whole file. A
row range is either read with ``preadv`` straight into a numpy buffer (one copy, kernel
-> buffer), or, for the large blocks of the merges that take their inputs raw
(:func:`map_bytes`), mapped for the unit's lifetime only: no copy, and RSS still
follows the unit, not the model. ``pwrite`` at precomputed absolute offsets lets any
number of processes fill one output shard concurrently without coordination, because
:func:`layout_shards` fixes every tensor's byte range before any data exists.

File descriptors are cached per process (read-only and write caches, LRU, closed on
eviction). An input's descriptor is checked on every use against the identity of the
version the plan was made from (``TensorEntry.identity``, io/identity.py): its
``fstat`` must still give that inode, size, mtime and ctime, and the reader keeps
using that descriptor, so a path that now names another file is never read at the
old plan's offsets; any difference raises InputChangedError naming the file. A write
descriptor (and a read of an entry made by hand, with no identity) is re-validated
against the path's (device, inode) on every use instead, so a file replaced under
the same name (a new staging directory after a publish) is never written through a
stale descriptor.

Byte order: safetensors data is little-endian; like the safetensors library, this
module assumes a little-endian host (x86-64, aarch64).
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import mmap
import os
import sys
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from tadmerge.errors import InputChangedError, InputError, InputProblem, MergeRuntimeError
from tadmerge.io import libc
from tadmerge.io.identity import FileIdentity
from tadmerge.io.safetensors_format import DTYPE_SIZE, METADATA_KEY, TensorEntry, dtype_name

if TYPE_CHECKING:
    import torch

__all__ = [
    "OutputTensor",
    "ShardSpec",
    "close_all",
    "create_shard_files",
    "index_json",
    "layout_shards",
    "map_bytes",
    "read_bytes",
    "read_rows",
    "sync_all",
    "write_at",
    "write_at_crc",
]

if sys.byteorder != "little":  # pragma: no cover - no such hosts in practice
    raise ImportError("tadmerge.io.block_io requires a little-endian host (safetensors data)")

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_MAX_CACHED_FDS = 64


class _FdCache:
    """Thread-safe LRU of open descriptors, reference counted.

    A descriptor evicted while another thread is inside ``pread`` on it is closed only
    when that thread releases it: closing it early could let the kernel hand the same
    number to an unrelated ``open`` and the reader would silently read the wrong file.
    """

    def __init__(self, flags: int, maxsize: int = _MAX_CACHED_FDS) -> None:
        self._flags = flags
        self._maxsize = maxsize
        self._lock = threading.Lock()
        # path -> [fd, key, refcount, evicted]; key: the FileIdentity the descriptor
        # was checked against, or (st_dev, st_ino) where there is none
        self._entries: OrderedDict[str, list] = OrderedDict()

    def reset_after_fork(self) -> None:
        # The lock may have been held by another thread at fork time; descriptors are
        # inherited and stay valid (positional I/O shares no file offset).
        self._lock = threading.Lock()

    @contextmanager
    def acquire(
        self, path: str, identity: FileIdentity | None = None, tensor: str | None = None
    ) -> Iterator[int]:
        """A descriptor of ``path``; with ``identity``, one of that version of the
        file (else InputChangedError naming it and ``tensor``), kept even where the
        path now names another file."""
        if identity is None:
            entry = self._get(path)
        else:
            entry = self._get_checked(path, identity, tensor)
        try:
            yield entry[0]
        finally:
            self._release(entry)

    def _get_checked(self, path: str, identity: FileIdentity, tensor: str | None) -> list:
        with self._lock:
            entry = self._entries.get(path)
            if entry is not None and (entry[1] is identity or entry[1] == identity):
                self._entries.move_to_end(path)
                entry[2] += 1
            else:
                entry = None
        if entry is None:
            entry = self._open(path, identity)
        try:
            # the descriptor's own file: a rewrite in place (even with the size and
            # mtime restored) moves its ctime; a replaced path is not looked at
            why = identity.differs(os.fstat(entry[0]))
        except OSError:
            self._release(entry)
            raise
        if why is not None:
            self._release(entry)
            self.forget(path)
            raise changed_error(path, tensor, why)
        return entry

    def _get(self, path: str) -> list:
        ident = None
        try:
            st = os.stat(path)
            ident = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            if not self._flags & os.O_CREAT:
                raise
        with self._lock:
            entry = self._entries.get(path)
            if entry is not None and ident is not None and entry[1] == ident:
                self._entries.move_to_end(path)
                entry[2] += 1
                return entry
        return self._open(path, None)

    def _open(self, path: str, identity: FileIdentity | None) -> list:
        """Open ``path`` and cache the descriptor (replacing any cached one)."""
        fd = os.open(path, self._flags | _CLOEXEC, 0o644)
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        entry = [fd, identity if identity is not None else (st.st_dev, st.st_ino), 1, False]
        with self._lock:
            old = self._entries.get(path)
            if old is not None:
                self._drop(path)
            self._entries[path] = entry
            while len(self._entries) > self._maxsize:
                oldest = next(iter(self._entries))
                self._drop(oldest)
        return entry

    def _drop(self, path: str) -> None:
        """Remove from the map (lock held); close now if unused, else on release."""
        entry = self._entries.pop(path)
        entry[3] = True
        if entry[2] == 0:
            _close_quietly(entry[0])

    def _release(self, entry: list) -> None:
        with self._lock:
            entry[2] -= 1
            if entry[3] and entry[2] == 0:
                _close_quietly(entry[0])

    def cached_fd(self, path: str) -> int | None:
        with self._lock:
            entry = self._entries.get(path)
            return None if entry is None else entry[0]

    def forget(self, path: str) -> None:
        """Drop ``path``'s descriptor (closed once no thread uses it)."""
        with self._lock:
            if path in self._entries:
                self._drop(path)

    def close_all(self) -> None:
        with self._lock:
            for path in list(self._entries):
                self._drop(path)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


_READ_FDS = _FdCache(os.O_RDONLY)
_WRITE_FDS = _FdCache(os.O_WRONLY | os.O_CREAT)


def _after_fork() -> None:
    _READ_FDS.reset_after_fork()
    _WRITE_FDS.reset_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def close_all() -> None:
    """Close every cached descriptor of this process (read and write caches)."""
    _READ_FDS.close_all()
    _WRITE_FDS.close_all()


def changed_problem(path: str, tensor: str | None, why: str) -> InputProblem:
    """An input that is no longer the version the merge planned with."""
    return InputProblem(
        path,
        tensor,
        f"changed during the merge: {why}. Nothing is published (what was read from "
        "it could mix two versions); rerun the merge once the file no longer changes: "
        "work done from the old version cannot be reused",
    )


def changed_error(path: str, tensor: str | None, why: str) -> InputChangedError:
    return InputChangedError(changed_problem(path, tensor, why))


def _errtext(exc: OSError) -> str:
    code = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno else "?"
    return f"{exc.strerror or exc} ({code})"


# --------------------------------------------------------------------------- reading


def _row_span(entry: TensorEntry, row_start: int, row_end: int) -> tuple[int, int]:
    """(file offset, byte count) of rows [row_start, row_end) of entry."""
    if not (0 <= row_start <= row_end <= entry.rows):
        raise ValueError(
            f"row range [{row_start}, {row_end}) outside [0, {entry.rows}) of {entry.name}"
        )
    row_bytes = entry.row_numel * entry.itemsize
    return entry.offset + row_start * row_bytes, (row_end - row_start) * row_bytes


def read_bytes(
    entry: TensorEntry, row_start: int, row_end: int, out: np.ndarray | None = None
) -> np.ndarray:
    """The raw bytes of rows ``[row_start, row_end)`` of ``entry`` as a flat uint8
    array: a new one, or the first bytes of ``out`` (a uint8 array large enough).

    A 0-d tensor is one row of one element. The bytes go straight from the kernel
    into the array's memory (no intermediate ``bytes``). numpy, not torch: the
    streamed merges (engine/stream.py) never import torch.

    A made tensor is made here, per row block (``made_rows``: a LoRA adapter's
    target, io/lora.LoraEntry; a vocabulary tensor on the output's vocabulary,
    io/vocab_rows.VocabEntry).
    """
    made = getattr(entry, "made_rows", None)
    if made is not None:
        return made(row_start, row_end, out)
    offset, nbytes = _row_span(entry, row_start, row_end)
    buf = np.empty(nbytes, dtype=np.uint8) if out is None else out[:nbytes]
    if nbytes:
        view = memoryview(buf)
        try:
            with _READ_FDS.acquire(entry.file, entry.identity, entry.name) as fd:
                got = 0
                while got < nbytes:
                    n = os.preadv(fd, [view[got:]], offset + got)
                    if n == 0:
                        raise _short_read(entry, offset + nbytes, os.fstat(fd).st_size)
                    got += n
        except OSError as exc:
            raise _read_error(entry, exc) from exc
        finally:
            view.release()
    return buf


def _read_error(entry: TensorEntry, exc: OSError) -> MergeRuntimeError:
    """An OS error while reading data (EACCES, ENOENT, EIO, ...): a runtime error,
    not a bad input, so the merge keeps its staging for --resume (a brief EACCES
    on a shared filesystem must not cost the finished work). An input that was
    in fact replaced is told apart by --resume, which compares identities."""
    return MergeRuntimeError(f"reading {entry.file} [{entry.name}] failed: {_errtext(exc)}")


MAP_MIN_BYTES = 1 << 20  # below this a copy costs less than a map, a populate and an unmap
_MAP_ALIGN = 8  # file offsets of mapped blocks: every dtype's alignment, and numba's
_MADV_POPULATE_READ = 22  # Linux 5.14+: fault the whole range in now, an error for a hole
_map_ok = hasattr(mmap, "mmap") and hasattr(mmap.mmap, "madvise")


_madvise = libc.function("madvise", (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int))


def _populate(mm: mmap.mmap) -> None:
    """Fault every page of the map in now (MADV_POPULATE_READ); OSError as
    mmap.madvise raises it. Why not mmap.madvise: it holds the GIL for the whole
    populate, which for a unit's inputs is milliseconds that the other workers'
    Python waited out (both workers of a 2-core merge, every unit)."""
    if _madvise is None:
        mm.madvise(_MADV_POPULATE_READ)
        return
    view = np.frombuffer(mm, dtype=np.uint8)  # the map's address; released below
    try:
        if _madvise(view.ctypes.data, len(mm), _MADV_POPULATE_READ) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        del view


def map_bytes(entry: TensorEntry, row_start: int, row_end: int) -> np.ndarray | None:
    """Rows ``[row_start, row_end)`` of ``entry`` as a flat uint8 array over the
    page cache (a private, copy-on-write map of the file), or None where the
    caller should ``read_bytes`` instead: a small range, an offset the array would
    be misaligned at, or no ``madvise(MADV_POPULATE_READ)`` (not Linux 5.14+).

    Why: reading a block copies it from the page cache into the process (pread),
    which cost 0.51 ns per element and task on the 2-core benchmark machine,
    against 0.71 for task arithmetic's whole kernel reading a map
    (benchmarks/io_map.py). A map costs page-table entries only. The
    memory stays honest as with read_bytes: the map covers one unit's rows, is
    populated now (the pages are read here, and a file truncated after its header
    was checked is an InputError here, not a SIGBUS later), and is unmapped when
    the last array over it goes. Copy-on-write, not read-only: the kernels take
    writable arrays (numba compiles read-only ones separately), and they never
    write to their inputs.
    """
    global _map_ok
    if hasattr(entry, "made_rows"):  # made when read (io/lora.py, io/vocab_rows.py)
        return None
    offset, nbytes = _row_span(entry, row_start, row_end)
    if not _map_ok or nbytes < MAP_MIN_BYTES or offset % _MAP_ALIGN:
        return None
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    # a cold range is then read in large requests, as pread's would be, not 128 KB
    # at a time by the faults of the populate
    prefetch_rows(entry, row_start, row_end)
    try:
        with _READ_FDS.acquire(entry.file, entry.identity, entry.name) as fd:
            size = os.fstat(fd).st_size
            if size < offset + nbytes:
                raise _short_read(entry, offset + nbytes, size)
            try:
                mm = mmap.mmap(fd, offset + nbytes - start, access=mmap.ACCESS_COPY, offset=start)
            except OSError:
                return None  # no map here (a filesystem without mmap): read it
    except OSError as exc:
        raise _read_error(entry, exc) from exc
    try:
        _populate(mm)
    except OSError as exc:
        mm.close()
        if exc.errno == errno.EFAULT:  # a hole: the file shrank since the fstat
            # (with an identity, the acquire itself reports the new size)
            with _READ_FDS.acquire(entry.file, entry.identity, entry.name) as fd:
                raise _short_read(entry, offset + nbytes, os.fstat(fd).st_size) from None
        if exc.errno in (errno.EINVAL, errno.ENOSYS):
            _map_ok = False  # an older kernel: read from now on
            return None
        raise _read_error(entry, exc) from exc
    return np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=offset - start)


def _short_read(entry: TensorEntry, needed: int, size: int) -> InputError:
    if entry.identity is not None:  # its size was checked: it shrank since
        return changed_error(
            entry.file, entry.name, f"it shrank to {size} bytes (a read needs {needed})"
        )
    return InputError(
        InputProblem(
            entry.file,
            entry.name,
            f"short read: needs bytes up to {needed}, file has {size} (truncated or "
            "replaced after its header was checked)",
        )
    )


def read_rows(
    entry: TensorEntry, row_start: int, row_end: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Rows ``[row_start, row_end)`` of ``entry`` as a flat 1-D CPU tensor: a new
    one, or over the first bytes of ``out`` (a uint8 tensor large enough)."""
    import torch

    raw = read_bytes(entry, row_start, row_end, None if out is None else out.numpy())
    if not raw.size:  # torch views no empty array as a wider dtype
        return torch.empty(0, dtype=entry.torch_dtype)
    return torch.from_numpy(raw).view(entry.torch_dtype)


def prefetch_rows(entry: TensorEntry, row_start: int, row_end: int) -> None:
    """Ask the kernel to start reading rows [row_start, row_end) into the page
    cache (posix_fadvise WILLNEED) and return at once: a later read_rows of
    them then waits less on the disk. Advice only: any failure is ignored."""
    if not hasattr(os, "posix_fadvise") or row_end <= row_start:
        return
    if hasattr(entry, "made_rows"):  # (io/lora.py: its base's rows are read)
        entry = getattr(entry, "base", None)
        if entry is None:  # (io/vocab_rows.py: gathered rows, no one range)
            return
    row_bytes = entry.row_numel * entry.itemsize
    try:
        with _READ_FDS.acquire(entry.file, entry.identity, entry.name) as fd:
            os.posix_fadvise(
                fd,
                entry.offset + row_start * row_bytes,
                (row_end - row_start) * row_bytes,
                os.POSIX_FADV_WILLNEED,
            )
    except (OSError, InputError):
        pass  # the read that follows reports it


# --------------------------------------------------------------------------- writing


def _as_bytes(tensor: torch.Tensor | np.ndarray) -> np.ndarray:
    """A contiguous CPU uint8 view of the tensor's raw bytes (bf16/fp8/bool included)."""
    if isinstance(tensor, np.ndarray):
        return np.ascontiguousarray(tensor).reshape(-1).view(np.uint8)
    import torch

    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.dtype != torch.uint8:
        t = t.view(torch.uint8)
    return t.numpy()


def write_at(path: str, offset: int, tensor: torch.Tensor | np.ndarray) -> None:
    """Write ``tensor``'s raw bytes (a tensor or a numpy array) at absolute ``offset`` of ``path``.

    Any OSError (ENOSPC, EACCES, EIO, ...) becomes a MergeRuntimeError that names the
    file, so a full disk reads as such in the nightly log and staging is kept.
    """
    _write(path, offset, _as_bytes(tensor), False)


# slices checksummed then written one at a time: each is still in the CPU cache when
# pwrite copies it into the page cache, so the checksum adds no pass over memory
_CRC_SLICE = 1 << 20


def write_at_crc(path: str, offset: int, tensor: torch.Tensor | np.ndarray) -> tuple[int, int]:
    """:func:`write_at`, returning ``(nbytes, zlib.crc32)`` of the bytes written.

    The checksum is taken from the very buffer handed to ``pwrite``, slice by slice
    right before each slice is written: it is what the resume log records so that a
    later ``--resume`` can tell a unit's bytes on disk from zeros or a torn write.
    """
    data = _as_bytes(tensor)
    return data.size, _write(path, offset, data, True)


def _write(path: str, offset: int, data: np.ndarray, crc: bool) -> int:
    if offset < 0:
        raise ValueError(f"negative offset {offset} for {path}")
    total = data.size
    value = 0
    if total == 0:
        return value
    view = memoryview(data)
    step = _CRC_SLICE if crc else total
    try:
        with _WRITE_FDS.acquire(path) as fd:
            done = 0
            while done < total:
                end = min(total, done + step)
                if crc:
                    value = zlib.crc32(view[done:end], value)
                while done < end:
                    n = os.pwrite(fd, view[done:end], offset + done)
                    if n <= 0:  # pragma: no cover - pwrite reports errors by raising
                        raise OSError(errno.EIO, "pwrite wrote nothing")
                    done += n
    except OSError as exc:
        raise MergeRuntimeError(
            f"writing {total} bytes at offset {offset} of {path} failed: {_errtext(exc)}"
        ) from exc
    finally:
        view.release()
    return value


def crc_of_range(path: str, start: int, end: int) -> int | None:
    """zlib.crc32 of bytes [start, end) of ``path`` as they are on disk now, or None
    when the file is missing or shorter (a ``--resume`` checking a finished unit)."""
    value = 0
    try:
        fd = os.open(path, os.O_RDONLY | _CLOEXEC)
    except OSError:
        return None
    try:
        buf = bytearray(min(end - start, 8 * 2**20))
        view = memoryview(buf)
        pos = start
        while pos < end:
            n = os.preadv(fd, [view[: min(len(buf), end - pos)]], pos)
            if n <= 0:
                return None
            value = zlib.crc32(view[:n], value)
            pos += n
    except OSError:
        return None
    finally:
        os.close(fd)
    return value


def sync_all(paths: Iterable[str]) -> None:
    """fsync each file so its data survives a crash before it is published.

    The cached write descriptor of each synced file is then released: a finished file
    needs no more writes, and an open descriptor would keep a later-deleted file's
    disk space allocated for as long as a long-lived worker process runs.
    """
    for path in paths:
        try:
            if _WRITE_FDS.cached_fd(path) is not None:
                with _WRITE_FDS.acquire(path) as wfd:
                    os.fsync(wfd)
                _WRITE_FDS.forget(path)
                continue
            rfd = os.open(path, os.O_RDONLY | _CLOEXEC)
            try:
                os.fsync(rfd)
            finally:
                os.close(rfd)
        except OSError as exc:
            raise MergeRuntimeError(f"fsync of {path} failed: {_errtext(exc)}") from exc


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True, slots=True)
class OutputTensor:
    """One tensor of the output: name, safetensors dtype string and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_SIZE:
            raise ValueError(f"{self.name}: unknown dtype {self.dtype!r}")
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in self.shape):
            raise ValueError(f"{self.name}: invalid shape {self.shape!r}")
        if not self.name or self.name == METADATA_KEY:
            raise ValueError(f"invalid tensor name {self.name!r}")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZE[self.dtype]

    @staticmethod
    def like(name: str, tensor: torch.Tensor) -> OutputTensor:
        """Convenience: the OutputTensor describing an in-memory tensor."""
        return OutputTensor(name, dtype_name(tensor.dtype), tuple(tensor.shape))


@dataclass(frozen=True)
class ShardSpec:
    """One output file, fully laid out before any data is written.

    ``header`` is the exact prefix safetensors writes (8-byte little-endian length, JSON
    padded with spaces to a multiple of 8); ``data_offsets`` are relative to its end.
    """

    filename: str
    tensors: tuple[OutputTensor, ...]
    header: bytes
    data_offsets: dict[str, tuple[int, int]]

    @property
    def data_size(self) -> int:
        return max((end for _, end in self.data_offsets.values()), default=0)

    @property
    def file_size(self) -> int:
        return len(self.header) + self.data_size

    def tensor_offset(self, name: str) -> int:
        """Absolute offset of ``name``'s first byte in the file (for :func:`write_at`)."""
        return len(self.header) + self.data_offsets[name][0]


def _encode_header(
    tensors: list[OutputTensor],
    offsets: dict[str, tuple[int, int]],
    metadata: dict[str, str],
) -> bytes:
    # The bytes of json.dumps({METADATA_KEY: metadata, name: {dtype, shape,
    # data_offsets}, ...}, separators=(",", ":"), ensure_ascii=False), written entry by
    # entry: a dict of a million entries would cost ~0.5 KB each for a moment.
    meta = json.dumps(dict(sorted(metadata.items())), separators=(",", ":"), ensure_ascii=False)
    parts = ["{", json.dumps(METADATA_KEY), ":", meta]
    dumps = json.JSONEncoder(ensure_ascii=False).encode
    for t in tensors:
        begin, end = offsets[t.name]
        shape = ",".join(map(str, t.shape))
        parts.append(
            f',{dumps(t.name)}:{{"dtype":{dumps(t.dtype)},"shape":[{shape}],'
            f'"data_offsets":[{begin},{end}]}}'
        )
    parts.append("}")
    body = "".join(parts).encode("utf-8")
    body += b" " * (-len(body) % 8)
    return len(body).to_bytes(8, "little") + body


def layout_shards(
    tensors: list[OutputTensor], shard_size: int, metadata: dict[str, str] | None = None
) -> list[ShardSpec]:
    """Assign tensors (sorted by name) to shards greedily and fix every byte offset.

    Within a shard, data is ordered by itemsize (largest first) then name, as the
    safetensors writer does, so every tensor starts at a multiple of its itemsize (the
    header is padded to 8) and zero-copy mmap loaders stay aligned. The result depends
    only on the inputs, so every worker and every resumed run computes the same layout.
    """
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    ordered = sorted(tensors, key=lambda t: t.name)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if a.name == b.name:
            raise ValueError(f"tensor {a.name!r} appears twice in the output")
    meta = {"format": "pt"}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"metadata must be str -> str, got {key!r}: {value!r}")
        meta[key] = value

    groups: list[list[OutputTensor]] = []
    current: list[OutputTensor] = []
    used = 0
    for t in ordered:
        size = t.nbytes
        if current and used + size > shard_size:
            groups.append(current)
            current, used = [], 0
        current.append(t)
        used += size
    if current or not groups:
        groups.append(current)

    n = len(groups)
    shards: list[ShardSpec] = []
    for i, group in enumerate(groups, start=1):
        filename = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        offsets: dict[str, tuple[int, int]] = {}
        pos = 0
        for t in sorted(group, key=lambda t: (-DTYPE_SIZE[t.dtype], t.name)):
            offsets[t.name] = (pos, pos + t.nbytes)
            pos += t.nbytes
        shards.append(
            ShardSpec(
                filename=filename,
                tensors=tuple(group),
                header=_encode_header(group, offsets, meta),
                data_offsets=offsets,
            )
        )
    return shards


def index_json(shards: list[ShardSpec]) -> bytes:
    """Content of ``model.safetensors.index.json`` for these shards (deterministic)."""
    weight_map = {t.name: s.filename for s in shards for t in s.tensors}
    total = sum(t.nbytes for s in shards for t in s.tensors)
    doc = {"metadata": {"total_size": total}, "weight_map": weight_map}
    return (json.dumps(doc, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _header_chunks(shard) -> Iterable[bytes]:
    """A shard's header bytes: in chunks where it makes them (io/layout.ShardTable)."""
    chunks = getattr(shard, "header_chunks", None)
    return chunks() if chunks is not None else (shard.header,)


def _has_layout(path: str, shard: ShardSpec) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | _CLOEXEC)
    except OSError:
        return False
    try:
        if os.fstat(fd).st_size != shard.file_size:
            return False
        pos = 0
        for chunk in _header_chunks(shard):  # (in chunks: a header can be ~75 MB)
            if os.pread(fd, len(chunk), pos) != chunk:
                return False
            pos += len(chunk)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def create_shard_files(directory: str, shards: list[ShardSpec]) -> list[str]:
    """Create each shard at full size (sparse) with its header in place.

    Afterwards any process may ``write_at(path, shard.tensor_offset(name), t)``.
    Idempotent for resume: a file that already has exactly this size and header keeps
    its data. A file with another size or header (truncated or emptied by a crash) is
    rewritten and its data is zeros, so the caller's record of finished blocks for that
    shard is no longer valid: returns the filenames so (re)created.
    """
    created = []
    for shard in shards:
        path = os.path.join(directory, shard.filename)
        if _has_layout(path, shard):
            continue
        created.append(shard.filename)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | _CLOEXEC, 0o644)
            try:
                os.ftruncate(fd, 0)
                done = 0
                for chunk in _header_chunks(shard):
                    view = memoryview(chunk)
                    while len(view):
                        n = os.pwrite(fd, view, done)
                        done += n
                        view = view[n:]
                os.ftruncate(fd, shard.file_size)
            finally:
                os.close(fd)
        except OSError as exc:
            raise MergeRuntimeError(f"creating {path} failed: {_errtext(exc)}") from exc
    return created
