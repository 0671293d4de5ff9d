"""Vocabulary tensors read on the output's vocabulary (`tokenizer: union | <model>`).

The output's vocabulary (planners/vocabulary.py) gives every input a row map:
for each output row, the input's own row of that token, or -1 where the input
lacks it. A :class:`VocabEntry` is one input's vocabulary tensor (embeddings,
head) read through its map: rows [r0, r1) of the output are gathered from the
input's own rows, in runs of consecutive rows, and widened to float32 (a made
tensor, like io/lora.LoraEntry: read_bytes calls ``made_rows``). So every merge
path (streamed, torch engine, statistics rounds) sees K+1 ordinary blocks of the
output's rows, a unit's worth at a time, and nothing reads a whole embedding.

A row an input lacks is filled so that it adds nothing to the merge of that row
(mergekit's rule, docs/semantics.md "Vocabulary"):
- the base's row of a token the base lacks: the mean (float32, summed in model
  order, then divided by their count) of the models that have it, so a token
  only one model has is that model's row exactly; zero where none has it;
- a model's row of a token it lacks: the base's row (filled as above), τ = 0.

numpy only, no torch: streamed merges stay torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .block_io import read_bytes
from .safetensors_format import TensorEntry

# elements read and widened at once per run of rows (a bound on the temporaries)
PIECE_ELEMS = 1 << 20
_WIDE = {"F16": np.float16, "F32": np.float32, "F64": np.float64}


@dataclass(frozen=True, slots=True)
class RowMaps:
    """One vocabulary tensor's inputs: each one's stored tensor and row map."""

    entries: tuple[TensorEntry, ...]  # per input (0: the base), the tensor as stored
    maps: tuple[bytes, ...]  # per input: int64 [output rows], its own row or -1

    def map(self, i: int) -> np.ndarray:
        return np.frombuffer(self.maps[i], dtype=np.int64)


@dataclass(frozen=True, slots=True)
class VocabEntry(TensorEntry):
    """Input `input`'s vocabulary tensor on the output's rows, made in float32."""

    rows_of: RowMaps | None = None
    input: int = 0
    stored_dtype: str = ""  # the input's own dtype (the base's: the output's, auto)

    def made_rows(self, row_start: int, row_end: int, out: np.ndarray | None) -> np.ndarray:
        """Rows [row_start, row_end) in float32, as bytes (read_bytes' contract)."""
        n = (row_end - row_start) * self.row_numel
        buf = np.empty(n * 4, np.uint8) if out is None else out[: n * 4]
        if n:
            assert self.rows_of is not None
            dst = buf.view(np.float32).reshape(row_end - row_start, self.row_numel)
            gather(self.rows_of, self.input, row_start, row_end, dst)
        return buf


def gather(rm: RowMaps, i: int, row_start: int, row_end: int, dst: np.ndarray) -> None:
    """Output rows [row_start, row_end) of input i into dst (float32, [rows, row_numel])."""
    m = rm.map(i)[row_start:row_end]
    have = np.flatnonzero(m >= 0)
    read_into(rm.entries[i], m[have], dst, have)
    lack = np.flatnonzero(m < 0)
    if lack.size:
        dst[lack] = base_rows(rm, lack + row_start)


def base_rows(rm: RowMaps, rows: np.ndarray) -> np.ndarray:
    """The base's rows of output rows `rows`, filled where it lacks the token."""
    width = rm.entries[0].row_numel
    out = np.zeros((rows.size, width), np.float32)
    m0 = rm.map(0)[rows]
    have = np.flatnonzero(m0 >= 0)
    read_into(rm.entries[0], m0[have], out, have)
    lack = np.flatnonzero(m0 < 0)
    if not lack.size:
        return out
    total = np.zeros((lack.size, width), np.float32)
    count = np.zeros(lack.size, np.int64)
    part = np.empty_like(total)
    for k in range(1, len(rm.entries)):
        mk = rm.map(k)[rows[lack]]
        h = np.flatnonzero(mk >= 0)
        if h.size:
            read_into(rm.entries[k], mk[h], part, h)
            total[h] += part[h]
            count[h] += 1
    some = count > 0
    total[some] /= count[some, None].astype(np.float32)
    out[lack] = total
    return out


def read_into(entry: TensorEntry, src: np.ndarray, dst: np.ndarray, at: np.ndarray) -> None:
    """dst[at[j]] = widened row src[j] of `entry`, read in runs of consecutive rows
    (consecutive in both), each in pieces of at most PIECE_ELEMS elements."""
    if not src.size:
        return
    breaks = np.flatnonzero((np.diff(src) != 1) | (np.diff(at) != 1)) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [src.size]))
    piece = max(1, PIECE_ELEMS // max(1, entry.row_numel))
    for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
        for j in range(a, b, piece):
            k = min(b, j + piece)
            r0 = int(src[j])
            raw = read_bytes(entry, r0, r0 + (k - j))
            widen_into(raw, _made_dtype(entry), dst[int(at[j]) : int(at[j]) + (k - j)])


def _made_dtype(entry: TensorEntry) -> str:
    """The dtype of what read_bytes returns for `entry` (a made entry: float32)."""
    return "F32" if hasattr(entry, "made_rows") else entry.dtype


def widen_into(raw: np.ndarray, dtype: str, dst: np.ndarray) -> None:
    """Raw bytes of `dtype` widened exactly into float32 rows `dst` (contiguous)."""
    if dtype == "BF16":
        bits = dst.reshape(-1).view(np.uint32)
        bits[...] = raw.view(np.uint16)
        bits <<= 16
    elif dtype in _WIDE:
        dst.reshape(-1)[...] = raw.view(_WIDE[dtype])
    else:  # (fp8: through torch, which knows the format)
        import torch

        from .safetensors_format import torch_dtype

        t = torch.from_numpy(np.ascontiguousarray(raw)).view(torch_dtype(dtype))
        dst.reshape(-1)[...] = t.float().numpy()
