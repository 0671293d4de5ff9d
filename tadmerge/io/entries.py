"""A checkpoint's tensor entries as columns: memory per tensor, not per object.

A checkpoint of a million tiny tensors held as a dict of TensorEntry objects costs
~230 bytes per tensor and input (the entry, its offset int, the dict slot, the name),
and parsing its header with ``json.loads`` a few hundred more at once. Here a header
in the canonical form that the safetensors library writes (``{"name":{"dtype":...,
"shape":[...],"data_offsets":[b,e]},...}``, no whitespace inside) is scanned by one
regular expression straight into columns: the sorted names (one list, shared between
inputs whose names agree), a dtype code per tensor, an index into the file's distinct
shapes, the absolute offset and the byte count. :class:`EntryTable` is a read-only
``Mapping[str, TensorEntry]`` over them that makes an entry when one is asked for.

The fast scan only accepts what it fully checks (every entry well formed and
consistent, names unique and plain, ranges inside the file and disjoint); anything
else returns None and the header goes through the full JSON diagnosis of
safetensors_format.py, so messages never depend on which path read a file.
"""

from __future__ import annotations

import bisect
import re
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar

import numpy as np

from .identity import FileIdentity
from .safetensors_format import _MAX_DIM, DTYPE_SIZE, TensorEntry

__all__ = ["EntryTable", "RowEntries", "aligned", "as_table", "scan_canonical"]

_INT = r"(?:0|[1-9][0-9]{0,17})"  # JSON integers up to 18 digits: no overflow below 2**63
# one canonical entry; names without escapes, quotes or control characters
_ENTRY = re.compile(
    r'"([^"\\\x00-\x1f]+)":\{"dtype":"([A-Z0-9_]{1,16})","shape":\[((?:'
    + _INT
    + r"(?:,"
    + _INT
    + r')*)?)\],"data_offsets":\[('
    + _INT
    + "),("
    + _INT
    + r")\]\}"
)
# The names of the input opened first (planners/inventory.open_inputs sets it while
# it opens the others): a name equal to the one at the same row there is kept as
# that str object, so a million names are held once, not once per input.
NAMES_LIKE: ContextVar[list[str] | None] = ContextVar("tadmerge_names_like", default=None)
_METADATA = re.compile(r'"__metadata__":(\{[^{}\\]*\})')
_DTYPE_LIST = sorted(DTYPE_SIZE)
_DTYPE_CODE = {d: i for i, d in enumerate(_DTYPE_LIST)}


class EntryTable(Mapping):
    """Tensor entries sorted by name, as columns; entries are made on access.

    ``names`` is a sorted list of str; ``dtype`` one code per tensor (index into
    the sorted dtype names); ``shape_id`` an index into ``shapes``; ``offset`` the
    absolute byte offset; ``nbytes``; ``file_id`` an index into ``files`` /
    ``identities`` (several for a sharded checkpoint).
    """

    __slots__ = (
        "names", "dtype", "shape_id", "shapes", "offset", "nbytes", "file_id", "files",
        "identities",
    )  # fmt: skip

    def __init__(
        self,
        names: list[str],
        dtype: bytes,
        shape_id: array,
        shapes: list[tuple[int, ...]],
        offset: array,
        nbytes: array,
        file_id: bytes | array,
        files: list[str],
        identities: list[FileIdentity | None],
    ) -> None:
        self.names = names
        self.dtype = dtype
        self.shape_id = shape_id
        self.shapes = shapes
        self.offset = offset
        self.nbytes = nbytes
        self.file_id = file_id
        self.files = files
        self.identities = identities

    # ------------------------------------------------------------------ Mapping
    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def _find(self, name: object) -> int:
        if type(name) is not str:
            return -1
        i = bisect.bisect_left(self.names, name)
        return i if i < len(self.names) and self.names[i] == name else -1

    def __contains__(self, name: object) -> bool:
        return self._find(name) >= 0

    def __getitem__(self, name: str) -> TensorEntry:
        i = self._find(name)
        if i < 0:
            raise KeyError(name)
        return self.entry_at(i)

    def entry_at(self, i: int) -> TensorEntry:
        f = self.file_id[i]
        return TensorEntry(
            self.names[i],
            _DTYPE_LIST[self.dtype[i]],
            self.shapes[self.shape_id[i]],
            self.files[f],
            self.offset[i],
            self.nbytes[i],
            self.identities[f],
        )

    def values(self) -> Iterator[TensorEntry]:  # type: ignore[override]
        return (self.entry_at(i) for i in range(len(self.names)))

    def items(self) -> Iterator[tuple[str, TensorEntry]]:  # type: ignore[override]
        return ((n, self.entry_at(i)) for i, n in enumerate(self.names))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return len(self) == len(other) and all(
                n in other and other[n] == e for n, e in self.items()
            )
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"EntryTable({len(self)} tensors in {len(self.files)} file(s))"

    # ------------------------------------------------------------------ building
    @classmethod
    def from_entries(cls, entries: Iterable[TensorEntry]) -> EntryTable:
        """From TensorEntry objects (any order; names unique)."""
        items = sorted(entries, key=lambda e: e.name)
        files: dict[tuple[str, int], int] = {}
        file_list: list[str] = []
        idents: list[FileIdentity | None] = []
        shapes: dict[tuple, int] = {}
        shape_list: list[tuple[int, ...]] = []
        dtype = bytearray()
        shape_id, offset, nbytes, file_id = array("I"), array("q"), array("q"), array("I")
        for e in items:
            key = (e.file, id(e.identity))
            if key not in files:
                files[key] = len(file_list)
                file_list.append(e.file)
                idents.append(e.identity)
            shape = tuple(e.shape)
            if shape not in shapes:
                shapes[shape] = len(shape_list)
                shape_list.append(shape)
            dtype.append(_DTYPE_CODE[e.dtype])
            shape_id.append(shapes[shape])
            offset.append(e.offset)
            nbytes.append(e.nbytes)
            file_id.append(files[key])
        return cls(
            [e.name for e in items],
            bytes(dtype),
            shape_id,
            shape_list,
            offset,
            nbytes,
            file_id,
            file_list,
            idents,
        )

    def share_names(self, other: EntryTable) -> None:
        """Hold `other`'s name list when the names are the same (one list for all
        inputs of a merge instead of one per input)."""
        if self.names is not other.names and self.names == other.names:
            self.names = other.names


def _sorted_order(names: list[str]) -> np.ndarray | None:
    """None when `names` is sorted already (the usual case), else the permutation."""
    if all(a < b for a, b in zip(names, names[1:], strict=False)):  # noqa: RUF007
        return None
    return np.array(sorted(range(len(names)), key=names.__getitem__), dtype=np.int64)


def scan_canonical(
    text: str, path: str, data_start: int, data_size: int, identity: FileIdentity
) -> tuple[dict[str, str], EntryTable] | None:
    """(metadata, entries) of a valid header in canonical form, or None (anything
    else, valid or not: the caller parses it in full and says what is wrong)."""
    end = len(text.rstrip(" "))
    if end < 2 or text[0] != "{" or text[end - 1] != "}" or "\\" in text:
        return None
    metadata: dict[str, str] = {}
    pos = 1
    m = _METADATA.match(text, pos)
    if m is not None:
        import json

        try:
            meta = json.loads(m.group(1))
        except ValueError:
            return None
        if not all(isinstance(v, str) for v in meta.values()) or len(meta) != m.group(1).count(
            '":"'
        ):
            return None  # (a repeated key, or a value that is no string: the full path)
        metadata = meta
        pos = m.end()
        if pos >= end:
            return None  # the metadata's brace closes the text: invalid JSON
        if text[pos] == ",":
            pos += 1
    names: list[str] = []
    dtype = bytearray()
    shape_id = array("I")
    begins, ends = array("q"), array("q")
    shape_of: dict[str, int] = {}
    shapes: list[tuple[int, ...]] = []
    codes = _DTYPE_CODE
    like = NAMES_LIKE.get()
    like_n = len(like) if like is not None else 0
    for m in _ENTRY.finditer(text, pos, end - 1):
        if m.start() != pos:
            return None
        name, dt, shape, b, e = m.groups()
        i = len(names)
        if i < like_n and like[i] == name:  # type: ignore[index]
            name = like[i]  # type: ignore[index]  # (the base's str: this one is freed)
        code = codes.get(dt)
        if code is None:
            return None
        sid = shape_of.get(shape)
        if sid is None:
            sid = shape_of[shape] = len(shapes)
            shapes.append(tuple(int(d) for d in shape.split(",")) if shape else ())
        names.append(name)
        dtype.append(code)
        shape_id.append(sid)
        begins.append(int(b))
        ends.append(int(e))
        pos = m.end()
        if text[pos] == ",":
            pos += 1
    if pos != end - 1 or text[pos - 1] == ",":
        return None
    n = len(names)
    # per distinct shape: its element count, or -1 where a check fails
    numel = np.empty(max(1, len(shapes)), dtype=np.int64)
    for i, s in enumerate(shapes):
        count, big = 1, False
        for d in s:  # left to right, as safetensors: [2**53, 2**53, 0] overflows first
            count *= d
            big = big or count >= 2**59
        numel[i] = -1 if big or any(d > _MAX_DIM for d in s) else count
    size = np.array([DTYPE_SIZE[d] for d in _DTYPE_LIST], dtype=np.int64)
    beg = np.frombuffer(begins, dtype=np.int64)
    fin = np.frombuffer(ends, dtype=np.int64)
    sid_np = np.frombuffer(shape_id, dtype=np.uint32)
    code_np = np.frombuffer(bytes(dtype), dtype=np.uint8)
    counts = numel[sid_np]
    if n and ((counts < 0).any() or (counts * size[code_np] != fin - beg).any()):
        return None
    if n and int(fin.max()) > data_size:
        return None
    order = _sorted_order(names)
    if order is not None:
        names = [names[i] for i in order]
        beg, fin = beg[order], fin[order]
        sid_np, code_np = sid_np[order], code_np[order]
    if any(a == b for a, b in zip(names, names[1:], strict=False)):  # noqa: RUF007
        return None  # a repeated name
    if "__metadata__" in names:
        return None
    # overlaps: by start, then length, each start at or after the furthest end so far
    # (at once where every tensor has bytes and they lie in name order, as the
    # safetensors library writes tensors of one dtype: no sort, no copies)
    in_order = bool((fin > beg).all() and (beg[1:] >= fin[:-1]).all())
    nonempty = np.flatnonzero(fin > beg) if not in_order else np.zeros(0, np.int64)
    if len(nonempty) > 1:
        by = nonempty[np.lexsort((fin[nonempty] - beg[nonempty], beg[nonempty]))]
        furthest = np.maximum.accumulate(fin[by])
        if (beg[by][1:] < furthest[:-1]).any():
            return None
    # columns as narrow as their values allow (a shape index and a byte count per
    # tensor: 3 bytes for a million tiny tensors of a few shapes, instead of 12)
    sid_code = "B" if len(shapes) <= 256 else "H" if len(shapes) <= 65536 else "I"
    sizes = fin - beg
    size_code = "I" if not n or int(sizes.max()) < 2**32 else "q"
    table = EntryTable(
        names,
        code_np.tobytes(),
        array(sid_code, sid_np.astype(sid_code).tobytes()),
        shapes,
        array("q", (beg + data_start).tobytes()),
        array(size_code, sizes.astype(size_code).tobytes()),
        bytes(n),
        [path],
        [identity],
    )
    return metadata, table


def as_table(entries: Mapping[str, TensorEntry] | Iterable[TensorEntry]) -> EntryTable:
    """An EntryTable of `entries` (a mapping by name, or entries): kept if it is one."""
    if isinstance(entries, EntryTable):
        return entries
    if isinstance(entries, Mapping):
        entries = entries.values()
    return EntryTable.from_entries(entries)


class RowEntries(Sequence):
    """The entries of row `row` of several EntryTables whose names are one list (a
    tensor's sources in every input): made on access, so that a plan of a million
    tensors holds two references per tensor instead of a TensorEntry per input."""

    __slots__ = ("row", "tables")

    def __init__(self, tables: tuple[EntryTable, ...], row: int) -> None:
        self.tables = tables
        self.row = row

    def __len__(self) -> int:
        return len(self.tables)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return tuple(t.entry_at(self.row) for t in self.tables[i])
        return self.tables[i].entry_at(self.row)

    def __iter__(self) -> Iterator[TensorEntry]:
        return (t.entry_at(self.row) for t in self.tables)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence):
            return tuple(self) == tuple(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self):
        return (RowEntries, (self.tables, self.row))


def aligned(tables: list[object]) -> tuple[EntryTable, ...] | None:
    """The tables, when every one is an EntryTable holding the same name list (after
    EntryTable.share_names): row i is then the same tensor in each."""
    if not tables or not all(isinstance(t, EntryTable) for t in tables):
        return None
    first = tables[0].names  # type: ignore[union-attr]
    if all(t.names is first for t in tables):  # type: ignore[union-attr]
        return tuple(tables)  # type: ignore[arg-type]
    return None
