"""EMR task masks, bit-packed, in a zarr store that writers fill without locks.

Layout: one zarr group `masks.zarr` with one uint8 array per merged tensor,
shape (K, n_blocks, block_bytes), chunk (1, 1, block_bytes). A block is the
tensor's canonical row block (planners/plan.py: a function of the shape only),
packed with numpy.packbits(bitorder="little") in row-major order; the last block
is padded with zero bits. A unit of work covers whole canonical blocks, so it
writes whole chunks and never shares a chunk with another writer: no locks,
any number of processes, and the store is the same whatever the budget.
"""

from __future__ import annotations

import math
import os
import zlib

import numpy as np
import torch

BITORDER = "little"


def array_key(tensor_index: int) -> str:
    return f"t{tensor_index:06d}"


def block_geometry(shape: tuple[int, ...], block_rows: int) -> tuple[int, int, int]:
    """(n_blocks, elements per full block, bytes per block)."""
    rows = shape[0] if shape else 1
    row_numel = math.prod(shape[1:]) if len(shape) > 1 else 1
    n_blocks = max(1, math.ceil(rows / block_rows))
    elems = block_rows * row_numel
    return n_blocks, elems, (elems + 7) // 8


class MaskStore:
    """Read and write the task masks of an EMR merge."""

    def __init__(self, root: str):
        self.root = root

    @classmethod
    def create(
        cls,
        root: str,
        tasks: list[str],
        tensors: list[tuple[int, str, tuple[int, ...], int]],
    ) -> MaskStore:
        """Create (or, on resume, keep) one array per (index, name, shape, block_rows)."""
        import zarr  # imported here: zarr costs 0.2 s at start-up, and only EMR needs it

        group = zarr.open_group(root, mode="a")
        names = {}
        for index, name, shape, block_rows in tensors:
            n_blocks, _, nbytes = block_geometry(shape, block_rows)
            key = array_key(index)
            names[name] = {"key": key, "shape": list(shape), "block_rows": block_rows}
            if key not in group:
                group.create_array(
                    key,
                    shape=(len(tasks), n_blocks, nbytes),
                    chunks=(1, 1, nbytes),
                    dtype="uint8",
                    fill_value=0,
                )
        group.attrs.update(
            {
                "format": "tadmerge-emr-masks/1",
                "bitorder": BITORDER,
                "tasks": tasks,
                "tensors": names,
            }  # fmt: skip
        )
        return cls(root)

    def _array(self, key: str, mode: str = "r"):
        import zarr

        return zarr.open_array(os.path.join(self.root, key), mode=mode)

    def write(
        self,
        tensor_index: int,
        shape: tuple[int, ...],
        block_rows: int,
        row_start: int,
        row_end: int,
        masks: list[torch.Tensor],
    ) -> tuple[int, int, int]:
        """Write the masks (one flat bool tensor per task) of rows [row_start, row_end).

        Returns the blocks written, [b0, b1), and the zlib.crc32 of their packed bits,
        task after task (what :meth:`checksum` reads back: the resume log's check)."""
        if row_start % block_rows:
            raise ValueError("mask writes must start on a canonical block boundary")
        _, elems, nbytes = block_geometry(shape, block_rows)
        b0 = row_start // block_rows
        arr = self._array(array_key(tensor_index), "r+")
        crc = 0
        nblk = 1
        for k, m in enumerate(masks):
            bits = m.to("cpu", torch.uint8).numpy()
            nblk = math.ceil(bits.size / elems) if bits.size else 1
            padded = np.zeros(nblk * elems, dtype=np.uint8)
            padded[: bits.size] = bits
            packed = np.packbits(padded.reshape(nblk, elems), axis=1, bitorder=BITORDER)
            chunk = np.ascontiguousarray(packed[:, :nbytes])
            crc = zlib.crc32(chunk, crc)
            arr[k, b0 : b0 + nblk, :] = chunk
        return b0, b0 + nblk, crc

    def checksum(self, key: str, b0: int, b1: int) -> int | None:
        """zlib.crc32 of blocks [b0, b1) of every task of array `key` as stored now
        (see write), or None when they cannot be read (a damaged chunk)."""
        try:
            return zlib.crc32(np.ascontiguousarray(self._array(key)[:, b0:b1, :]))
        except Exception:  # zarr's decode and metadata errors have no common base
            return None

    def read(
        self,
        tensor_index: int,
        shape: tuple[int, ...],
        block_rows: int,
        task: int,
        row_start: int,
        row_end: int,
    ) -> torch.Tensor:
        """Task `task`'s mask of rows [row_start, row_end) as a flat bool tensor."""
        _, elems, _ = block_geometry(shape, block_rows)
        row_numel = math.prod(shape[1:]) if len(shape) > 1 else 1
        b0 = row_start // block_rows
        b1 = max(b0 + 1, math.ceil(row_end / block_rows))
        arr = self._array(array_key(tensor_index))
        packed = np.asarray(arr[task, b0:b1, :])
        bits = np.unpackbits(packed, axis=1, count=elems, bitorder=BITORDER).reshape(-1)
        lo = (row_start - b0 * block_rows) * row_numel
        n = (row_end - row_start) * row_numel if shape else 1
        return torch.from_numpy(bits[lo : lo + n].astype(bool))
