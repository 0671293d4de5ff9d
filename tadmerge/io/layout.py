"""The output layout of a plan of very many tensors, as columns.

`block_io.layout_shards` lays out a list of OutputTensor objects and keeps, per
shard, its tensors, a dict of their data offsets and the header bytes: ~400
bytes per tensor, and the header again (~70 bytes per tiny tensor) for as long
as the plan lives. :func:`layout_table` makes the same layout, byte for byte,
from columns (the plan's sorted names, a dtype and a shape index per tensor):
a :class:`ShardTable` holds a reference to each name and ~16 bytes of columns
per tensor, and makes its header when one is asked for (creating the file,
checking it on --resume, the plan's fingerprint), chunk by chunk where a caller
can take chunks (:meth:`ShardTable.header_chunks`). It answers what a
`ShardSpec` answers (filename, tensors, header, data_offsets, data_size,
file_size, tensor_offset), so the rest of the merge takes either.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from .block_io import OutputTensor
from .safetensors_format import DTYPE_SIZE, METADATA_KEY

_CHUNK = 8192  # header entries per chunk


class _Offsets(Mapping):
    """name -> (begin, end) of a ShardTable's data, by bisection of its names."""

    __slots__ = ("_shard",)

    def __init__(self, shard: ShardTable) -> None:
        self._shard = shard

    def __len__(self) -> int:
        return len(self._shard.names)

    def __iter__(self) -> Iterator[str]:
        return iter(self._shard.names)

    def __contains__(self, name: object) -> bool:
        return self._shard.find(name) >= 0

    def __getitem__(self, name: str) -> tuple[int, int]:
        i = self._shard.find(name)
        if i < 0:
            raise KeyError(name)
        return self._shard.range_at(i)


class _Tensors(Sequence):
    """A ShardTable's tensors as OutputTensor objects, made on access (name order)."""

    __slots__ = ("_shard",)

    def __init__(self, shard: ShardTable) -> None:
        self._shard = shard

    def __len__(self) -> int:
        return len(self._shard.names)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        s = self._shard
        return OutputTensor(s.names[i], s.dtype_at(i), s.shape_at(i))


class ShardTable:
    """One output file laid out as `block_io.ShardSpec` lays it out, held as columns."""

    def __init__(
        self,
        filename: str,
        names: list[str],
        dtypes: list[str],
        dtype_ids: np.ndarray,
        shapes: list[tuple[int, ...]],
        shape_ids: np.ndarray,
        nbytes: np.ndarray,
        meta: dict[str, str],
    ) -> None:
        self.filename = filename
        self.names = names  # sorted
        self.dtypes = dtypes
        self.dtype_ids = dtype_ids
        self.shapes = shapes
        self.shape_ids = shape_ids
        self.meta = meta
        # data ordered by itemsize (largest first) then name, as the safetensors writer
        itemsize = np.array([DTYPE_SIZE[d] for d in dtypes], dtype=np.int64)[dtype_ids]
        order = np.argsort(-itemsize, kind="stable")
        begin = np.empty(len(names), dtype=np.int64)
        ends = np.cumsum(nbytes[order])
        begin[order] = ends - nbytes[order]
        self.begin = begin
        self.data_size = int(ends[-1]) if len(ends) else 0
        self._body_len = sum(len(c) for c in self._body_chunks())
        self.header_len = 8 + self._body_len + (-self._body_len % 8)

    # ------------------------------------------------------------ ShardSpec's answers
    @property
    def tensors(self) -> Sequence[OutputTensor]:
        return _Tensors(self)

    @property
    def data_offsets(self) -> Mapping[str, tuple[int, int]]:
        return _Offsets(self)

    @property
    def header(self) -> bytes:
        """The header bytes, made now (a ShardTable does not keep them)."""
        return b"".join(self.header_chunks())

    @property
    def file_size(self) -> int:
        return self.header_len + self.data_size

    def tensor_offset(self, name: str) -> int:
        return self.header_len + self.data_offsets[name][0]

    # ------------------------------------------------------------ columns
    def find(self, name: object) -> int:
        if type(name) is not str:
            return -1
        i = bisect.bisect_left(self.names, name)
        return i if i < len(self.names) and self.names[i] == name else -1

    def dtype_at(self, i: int) -> str:
        return self.dtypes[self.dtype_ids[i]]

    def shape_at(self, i: int) -> tuple[int, ...]:
        return self.shapes[self.shape_ids[i]]

    def range_at(self, i: int) -> tuple[int, int]:
        b = int(self.begin[i])
        shape = self.shape_at(i)
        n = 1
        for d in shape:
            n *= d
        return b, b + n * DTYPE_SIZE[self.dtype_at(i)]

    def header_chunks(self) -> Iterator[bytes]:
        """The header in chunks: the 8-byte length, then the JSON padded with spaces
        to a multiple of 8: the bytes of block_io._encode_header."""
        yield (self.header_len - 8).to_bytes(8, "little")
        yield from self._body_chunks()
        yield b" " * (-self._body_len % 8)

    def _body_chunks(self) -> Iterator[bytes]:
        meta = json.dumps(
            dict(sorted(self.meta.items())), separators=(",", ":"), ensure_ascii=False
        )
        yield ("{" + json.dumps(METADATA_KEY) + ":" + meta).encode("utf-8")
        dumps = json.JSONEncoder(ensure_ascii=False).encode
        dtype_json = [dumps(d) for d in self.dtypes]
        shape_json = [",".join(map(str, s)) for s in self.shapes]
        itemsize = [DTYPE_SIZE[d] for d in self.dtypes]
        numel = [math.prod(s) for s in self.shapes]
        names, dids, sids, begin = self.names, self.dtype_ids, self.shape_ids, self.begin
        for lo in range(0, len(names), _CHUNK):
            hi = min(len(names), lo + _CHUNK)
            parts = []
            for i, b, d, s in zip(
                range(lo, hi), begin[lo:hi].tolist(), dids[lo:hi].tolist(),
                sids[lo:hi].tolist(), strict=True,
            ):  # fmt: skip
                parts.append(
                    f',{dumps(names[i])}:{{"dtype":{dtype_json[d]},"shape":[{shape_json[s]}],'
                    f'"data_offsets":[{b},{b + numel[s] * itemsize[d]}]}}'
                )
            yield "".join(parts).encode("utf-8")
        yield b"}"


def layout_table(
    names: list[str],
    dtypes: list[str],
    dtype_ids: np.ndarray,
    shapes: list[tuple[int, ...]],
    shape_ids: np.ndarray,
    shard_size: int,
    metadata: dict[str, str] | None = None,
) -> list[ShardTable]:
    """`block_io.layout_shards` of the tensors `names` (sorted, unique), whose dtype
    is dtypes[dtype_ids[i]] and shape shapes[shape_ids[i]]: the same shards,
    offsets and header bytes, held as columns."""
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    meta = {"format": "pt"}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"metadata must be str -> str, got {key!r}: {value!r}")
        meta[key] = value
    numel = np.array([math.prod(s) for s in shapes] or [0], dtype=np.int64)
    itemsize = np.array([DTYPE_SIZE[d] for d in dtypes] or [0], dtype=np.int64)
    nbytes = numel[shape_ids] * itemsize[dtype_ids] if len(names) else np.zeros(0, np.int64)
    # greedy: a new shard when the next tensor would take this one past shard_size
    cuts = [0]
    used = 0
    for i, size in enumerate(nbytes.tolist()):
        if i > cuts[-1] and used + size > shard_size:
            cuts.append(i)
            used = 0
        used += size
    cuts.append(len(names))
    n = len(cuts) - 1
    shards = []
    for j in range(n):
        lo, hi = cuts[j], cuts[j + 1]
        filename = "model.safetensors" if n == 1 else f"model-{j + 1:05d}-of-{n:05d}.safetensors"
        part = names if (lo, hi) == (0, len(names)) else names[lo:hi]
        shards.append(
            ShardTable(
                filename,
                part,
                dtypes,
                dtype_ids[lo:hi],
                shapes,
                shape_ids[lo:hi],
                nbytes[lo:hi],
                meta,
            )  # fmt: skip
        )
    return shards
