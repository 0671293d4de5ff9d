"""Strict, header-only reader for the safetensors format.

Input checkpoints are untrusted (published by other teams, merged unattended), so this
module parses the header with plain Python instead of trusting a loader: it reads only
``8 + header_len`` bytes, checks every entry, and reports *all* problems of a file in
one :class:`~tadmerge.errors.InputError`. On arbitrary bytes it raises nothing else,
never hangs and never allocates more than ``max_header_bytes`` (the length prefix is
checked against the file size and the cap *before* anything is allocated).

File layout (https://github.com/huggingface/safetensors)::

    u64 little-endian N | N bytes of UTF-8 JSON (space padded) | data

Data offsets in the JSON are relative to the first data byte (``8 + N``); a
:class:`TensorEntry` stores the *absolute* offset so block readers never redo the sum.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from operator import attrgetter
from typing import TYPE_CHECKING

from tadmerge.errors import InputError, InputProblem
from tadmerge.io.identity import FileIdentity, pread_exact

if TYPE_CHECKING:
    import torch

__all__ = [
    "DTYPE_SIZE",
    "FLOAT_DTYPES",
    "SafetensorsHeader",
    "TensorEntry",
    "dtype_name",
    "read_header",
    "torch_dtype",
]


# safetensors dtype string -> (the torch dtype's name, bytes per element). Plain
# strings: reading headers and planning must not import torch (a merge that
# only streams never does, engine/stream.py).
_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "F8_E4M3FNUZ": ("float8_e4m3fnuz", 1),
    "F8_E5M2FNUZ": ("float8_e5m2fnuz", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "U16": ("uint16", 2),
    "U32": ("uint32", 4),
    "U64": ("uint64", 8),
    "BOOL": ("bool", 1),
}
DTYPE_SIZE: dict[str, int] = {name: size for name, (_, size) in _DTYPES.items()}
FLOAT_DTYPES: frozenset[str] = frozenset(n for n in _DTYPES if n.startswith(("F", "BF")))
_NAME_OF: dict[str, str] = {attr: name for name, (attr, _) in _DTYPES.items()}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype string (imports torch).

    Raises ValueError for a string this torch has no dtype for.
    """
    import torch

    dt = getattr(torch, _DTYPES[name][0], None) if name in _DTYPES else None
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"dtype {name!r} has no torch dtype in torch {torch.__version__}")
    return dt


METADATA_KEY = "__metadata__"
DEFAULT_MAX_HEADER_BYTES = 100 * 2**20


def dtype_name(dtype: torch.dtype) -> str:
    """Inverse of :func:`torch_dtype`: the safetensors string for a torch dtype.

    Raises ValueError for dtypes safetensors (or this engine) cannot store, e.g. complex.
    """
    try:
        return _NAME_OF[str(dtype).removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"dtype {dtype} has no safetensors equivalent") from None


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """Where one tensor lives on disk; enough to read any row range with ``pread``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    offset: int
    nbytes: int
    # the version of `file` whose header gave `offset` (io/identity.py): readers
    # check it; None for entries made by hand (nothing to check against)
    identity: FileIdentity | None = field(default=None, compare=False, repr=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def rows(self) -> int:
        """Blocks are row ranges; a 0-d tensor counts as one row of one element."""
        return self.shape[0] if self.shape else 1

    @property
    def row_numel(self) -> int:
        return math.prod(self.shape[1:]) if len(self.shape) > 1 else 1

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZE[self.dtype]

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: every entry's byte range is inside the file, none overlap."""

    path: str
    file_size: int
    data_start: int
    metadata: dict[str, str]
    tensors: Mapping[str, TensorEntry]  # an io/entries.EntryTable
    identity: FileIdentity | None = None


def _is_int(value: object) -> bool:
    # JSON true/false arrive as bool, which is an int subclass: never a valid dim/offset.
    return isinstance(value, int) and not isinstance(value, bool)


# Bounds that keep arithmetic on hostile headers cheap: no real tensor dim or byte count
# comes near these, and capping avoids multiplying thousands of huge integers.
_MAX_DIM = 2**53
_NUMEL_CAP = 2**64
# The safetensors library computes a tensor's element count left to right, then its
# byte count, in unsigned 64-bit arithmetic, and refuses the file when either overflows
# (SafeTensorError::ValidationOverflow); so does this reader, with the same rule.
_U64_MAX = 2**64 - 1
_MAX_NAME_IN_MESSAGE = 200
_MAX_PROBLEMS_PER_FILE = 50


def _short(name: str) -> str:
    """Clip hostile tensor names so one bad file cannot flood the log."""
    if len(name) <= _MAX_NAME_IN_MESSAGE:
        return name
    return name[:_MAX_NAME_IN_MESSAGE] + f"...({len(name)} chars)"


def _capped_numel(shape: tuple[int, ...]) -> int:
    """prod(shape), but stops growing past _NUMEL_CAP (any such size mismatches anyway)."""
    if 0 in shape:
        return 0
    n = 1
    for dim in shape:
        n *= dim
        if n > _NUMEL_CAP:
            return _NUMEL_CAP + 1
    return n


def _overflows_u64(shape: tuple[int, ...], itemsize: int) -> bool:
    """True where safetensors' checked u64 products (shape, then bytes) overflow."""
    n = 1
    for dim in shape:  # no early exit on a 0 dim: the library multiplies in order too
        n *= dim
        if n > _U64_MAX:
            return True
    return n * itemsize > _U64_MAX


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _RawEntry(tuple):
    """(dtype, shape, begin, end) of a well-typed tensor entry, made while parsing: a
    header of a million entries would otherwise hold a million dicts and lists."""

    __slots__ = ()


def _compacting_hook() -> object:
    """object_pairs_hook: a well-typed tensor entry becomes a _RawEntry (shapes and
    dtype strings shared within the file); anything else is _no_duplicates' dict and
    goes through _check_entry's full diagnosis."""
    shapes: dict[tuple, tuple] = {}
    dtypes: dict[str, str] = {}

    def hook(pairs: list[tuple[str, object]]) -> object:
        if len(pairs) == 3:
            got = {}
            for key, value in pairs:
                got[key] = value
            dtype, shape, offs = got.get("dtype"), got.get("shape"), got.get("data_offsets")
            if (
                type(dtype) is str
                and type(shape) is list
                and type(offs) is list
                and len(offs) == 2
                and type(offs[0]) is int
                and type(offs[1]) is int
                and all(type(d) is int for d in shape)
            ):
                t = tuple(shape)
                return _RawEntry(
                    (dtypes.setdefault(dtype, dtype), shapes.setdefault(t, t), offs[0], offs[1])
                )
        return _no_duplicates(pairs)

    return hook


def _fast_entry(raw: _RawEntry) -> tuple[str, tuple[int, ...], int, int] | None:
    """The entry if every check of _check_entry passes, else None (diagnose it there)."""
    dtype, shape, begin, end = raw
    itemsize = DTYPE_SIZE.get(dtype)
    if itemsize is None or begin < 0 or end < begin:
        return None
    for dim in shape:
        if dim < 0 or dim > _MAX_DIM:
            return None
    if _overflows_u64(shape, itemsize) or end - begin != _capped_numel(shape) * itemsize:
        return None
    return raw


class _DuplicateKeys(ValueError):
    """Raised from the JSON object hook when a key repeats (ambiguous tensor entry)."""


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # Two entries for one name would let two parsers disagree on which bytes are the
    # tensor, so duplicates are refused instead of silently keeping the last one.
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKeys(key)
        out[key] = value
    return out


def _check_entry(
    path: str, name: str, raw: object, problems: list[InputProblem]
) -> tuple[str, tuple[int, ...], int, int] | None:
    """Validate one tensor entry; returns (dtype, shape, begin, end) or None if broken."""

    def bad(message: str) -> None:
        problems.append(InputProblem(path, _short(name), message))

    if not isinstance(raw, dict):
        bad(f"entry must be a JSON object, got {type(raw).__name__}")
        return None
    ok = True
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in raw]
    if missing:
        bad("entry is missing " + ", ".join(missing))
        ok = False

    dtype = raw.get("dtype")
    itemsize = None
    if "dtype" in raw:
        if not isinstance(dtype, str):
            bad(f"dtype must be a string, got {type(dtype).__name__}")
            ok = False
        elif dtype not in DTYPE_SIZE:
            bad(f"unknown dtype {dtype[:40]!r} (known: {', '.join(sorted(DTYPE_SIZE))})")
            ok = False
        else:
            itemsize = DTYPE_SIZE[dtype]

    shape_raw = raw.get("shape")
    shape: tuple[int, ...] | None = None
    if "shape" in raw:
        if not isinstance(shape_raw, list):
            bad(f"shape must be a list of integers, got {type(shape_raw).__name__}")
            ok = False
        else:
            dims_ok = True
            for i, dim in enumerate(shape_raw):
                if not _is_int(dim):
                    bad(f"shape[{i}] is {str(dim)[:40]!r}, not an integer")
                    dims_ok = False
                elif dim < 0:
                    bad(f"shape[{i}] is negative ({dim})")
                    dims_ok = False
                elif dim > _MAX_DIM:
                    bad(f"shape[{i}] is {str(dim)[:40]}, larger than any real tensor")
                    dims_ok = False
            if dims_ok:
                shape = tuple(shape_raw)
            else:
                ok = False

    offsets = raw.get("data_offsets")
    begin = end = None
    if "data_offsets" in raw:
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(v) for v in offsets)
        ):
            bad(f"data_offsets must be two integers, got {str(offsets)[:80]}")
            ok = False
        else:
            begin, end = offsets
            if begin < 0 or end < 0:
                bad(f"data_offsets {offsets} are negative")
                ok = False
            elif end < begin:
                bad(f"data_offsets end {end} is before begin {begin}")
                ok = False

    if ok and shape is not None and itemsize is not None and begin is not None:
        assert end is not None
        if _overflows_u64(shape, itemsize):
            bad(
                f"shape {list(shape)} of {dtype}: its element or byte count overflows 64 bits "
                "(the safetensors library refuses it: ValidationOverflow)"
            )
            return None
        expected = _capped_numel(shape) * itemsize
        if end - begin != expected:
            bad(
                f"data_offsets [{begin}, {end}] span {end - begin} bytes but shape "
                f"{list(shape)} of {dtype} needs {expected}"
            )
            return None
        assert isinstance(dtype, str)
        return dtype, shape, begin, end
    return None


def read_header(
    path: str, *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
) -> SafetensorsHeader:
    """Read and validate a safetensors header without touching the tensor data.

    Raises :class:`InputError` listing every problem in the file; nothing else escapes.
    """
    apath = os.path.abspath(path)
    problems: list[InputProblem] = []

    def fail(message: str) -> InputError:
        return InputError([*problems, InputProblem(apath, None, message)])

    try:
        # O_NONBLOCK so a FIFO planted under a weight name cannot hang the open.
        fd = os.open(apath, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise fail(f"cannot open: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise fail("not a regular file")
        file_size = st.st_size
        if file_size < 8:
            raise fail(
                f"file is {file_size} bytes, shorter than the 8-byte safetensors length prefix"
            )
        try:
            prefix = pread_exact(fd, 8, 0)
        except OSError as exc:
            raise fail(f"cannot read: {exc.strerror or exc}") from None
        if len(prefix) < 8:
            raise fail("file shrank while reading the length prefix")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > max_header_bytes:
            raise fail(
                f"header length {header_len} exceeds the limit of {max_header_bytes} bytes "
                "(corrupt length prefix or not a safetensors file)"
            )
        if 8 + header_len > file_size:
            raise fail(
                f"header length {header_len} runs past the end of the file "
                f"(needs {8 + header_len} bytes, file has {file_size}); "
                "truncated or not a safetensors file"
            )
        try:
            raw = pread_exact(fd, header_len, 8)
        except OSError as exc:
            raise fail(f"cannot read: {exc.strerror or exc}") from None
        if len(raw) < header_len:
            raise fail("file shrank while reading the header")
    finally:
        os.close(fd)
    # the version parsed: the descriptor's fstat and the bytes read through it
    identity = FileIdentity.of(apath, st, prefix, raw)

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise fail(f"header is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    raw = b""  # (the text holds it: a header of a million tensors is ~75 MB)
    data_start = 8 + header_len
    data_size = file_size - data_start
    from .entries import EntryTable, scan_canonical

    fast = scan_canonical(text, apath, data_start, data_size, identity)
    if fast is not None:  # a valid header as the safetensors library writes it
        return SafetensorsHeader(apath, file_size, data_start, fast[0], fast[1], identity)
    try:
        doc = json.loads(text, object_pairs_hook=_compacting_hook())
    except _DuplicateKeys as exc:
        raise fail(f"header JSON repeats the key {str(exc)[:80]!r}") from None
    except RecursionError:
        raise fail("header JSON is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and int-too-long from huge literals
        raise fail(f"header is not valid JSON ({str(exc)[:120]})") from None
    if not isinstance(doc, dict):
        raise fail(f"header must be a JSON object, got {type(doc).__name__}")
    # A \uD800-style escape decodes to a lone surrogate: a str that cannot be encoded
    # again (UTF-8 output headers, messages, reports, hashes of names). Refused here so
    # nothing later meets one; only headers with escapes at all pay for the check.
    check_unicode = "\\u" in text

    metadata: dict[str, str] = {}
    if METADATA_KEY in doc:
        meta = doc[METADATA_KEY]
        if not isinstance(meta, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
        ):
            problems.append(
                InputProblem(apath, None, "__metadata__ must be an object of string -> string")
            )
        elif check_unicode and not all(_encodable(k) and _encodable(v) for k, v in meta.items()):
            problems.append(
                InputProblem(apath, None, "__metadata__ holds a string that is not valid Unicode")
            )
        else:
            metadata = dict(meta)

    del text, raw
    valid: dict[str, TensorEntry] = {}
    for name in sorted(k for k in doc if k != METADATA_KEY):
        if name == "":
            problems.append(InputProblem(apath, None, "a tensor has an empty name"))
            continue
        if check_unicode and not _encodable(name):
            problems.append(
                InputProblem(
                    apath,
                    None,
                    f"tensor name {ascii(name)[:_MAX_NAME_IN_MESSAGE]} is not valid Unicode "
                    "(a lone surrogate escape)",
                )
            )
            continue
        entry = doc[name]
        checked = _fast_entry(entry) if type(entry) is _RawEntry else None
        if checked is None:
            if type(entry) is _RawEntry:  # well-typed but wrong: the full diagnosis
                dtype, shape, begin, end = entry
                entry = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
            checked = _check_entry(apath, name, entry, problems)
        if checked is not None:
            dtype, shape, begin, end = checked
            valid[name] = TensorEntry(
                name, dtype, shape, apath, data_start + begin, end - begin, identity
            )
    del doc

    # Truncation: the furthest byte any tensor needs must be inside the file.
    if valid:
        far = max(valid.values(), key=lambda e: (e.offset + e.nbytes, e.name))
        far_end = far.offset + far.nbytes - data_start
        if far_end > data_size:
            problems.append(
                InputProblem(
                    apath,
                    _short(far.name),
                    f"truncated: needs {data_start + far_end} bytes, file has {file_size}",
                )
            )

    # Overlaps: sweep by (start, end), then name; empty tensors occupy no bytes and
    # cannot overlap. Two stable sorts by plain ints: no key tuple per tensor.
    spans = [e for e in valid.values() if e.nbytes > 0]
    spans.sort(key=attrgetter("nbytes"))
    spans.sort(key=attrgetter("offset"))
    prev_end, prev_name = -1, ""
    for e in spans:
        begin, end, name = e.offset - data_start, e.offset + e.nbytes - data_start, e.name
        if begin < prev_end:
            problems.append(
                InputProblem(
                    apath,
                    _short(name),
                    f"byte range [{begin}, {end}) overlaps tensor {_short(prev_name)!r}",
                )
            )
        if end > prev_end:
            prev_end, prev_name = end, name

    if problems:
        if len(problems) > _MAX_PROBLEMS_PER_FILE:
            more = len(problems) - _MAX_PROBLEMS_PER_FILE
            problems = problems[:_MAX_PROBLEMS_PER_FILE]
            problems.append(InputProblem(apath, None, f"... and {more} more problems"))
        raise InputError(problems)
    return SafetensorsHeader(
        path=apath,
        file_size=file_size,
        data_start=data_start,
        metadata=metadata,
        tensors=EntryTable.from_entries(valid.values()),
        identity=identity,
    )
