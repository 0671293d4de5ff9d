"""Per-thread scratch buffers that outlive one unit.

A worker merges unit after unit of nearly the same size. Allocating the K+1
float32 blocks afresh for each one costs a page fault per 4 KiB touched (large
blocks come from mmap and go back on free) and fragments the heap when several
worker threads share it; reusing the same buffers costs neither, and holds no
more than the largest unit, which the planner fits in the memory budget.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


class BufferPool:
    """Buffers are numpy byte arrays (torch tensors are views of them), so that
    the streamed merges use the pool without importing torch."""

    def __init__(self) -> None:
        self._local = threading.local()

    def bytes(self, name: str, nbytes: int) -> np.ndarray:
        """A uint8 array of `nbytes` (uninitialised) reusing the buffer `name`."""
        store = self._local.__dict__.setdefault("buffers", {})
        buf = store.get(name)
        if buf is None or buf.size < nbytes:
            store.pop(name, None)  # free the old one before allocating the larger
            buf = store[name] = np.empty(nbytes, dtype=np.uint8)
        return buf[:nbytes]

    def get(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat tensor of `numel` elements (uninitialised) reusing the buffer `name`."""
        import torch

        if not numel:  # torch views no empty array as a wider dtype
            return torch.empty(0, dtype=dtype)
        return torch.from_numpy(self.bytes(name, numel * dtype.itemsize)).view(dtype)

    def release(self) -> None:
        """Drop this thread's buffers (threads of a finished pool drop theirs on exit)."""
        self._local.__dict__.pop("buffers", None)


POOL = BufferPool()
