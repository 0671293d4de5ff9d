"""Per-thread scratch buffers that outlive one unit.

A worker merges unit after unit of nearly the same size. Allocating the K+1
float32 blocks afresh for each one costs a page fault per 4 KiB touched (large
blocks come from mmap and go back on free) and fragments the heap when several
worker threads share it; reusing the same buffers costs neither, and holds no
more than the largest unit, which the planner fits in the memory budget.
"""

from __future__ import annotations

import threading

import torch


class BufferPool:
    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat tensor of `numel` elements (uninitialised) reusing the buffer `name`."""
        store = self._local.__dict__.setdefault("buffers", {})
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        buf = store.get(name)
        if buf is None or buf.numel() < nbytes:
            store.pop(name, None)  # free the old one before allocating the larger
            buf = store[name] = torch.empty(nbytes, dtype=torch.uint8)
        return buf[:nbytes].view(dtype)

    def release(self) -> None:
        """Drop this thread's buffers (threads of a finished pool drop theirs on exit)."""
        self._local.__dict__.pop("buffers", None)


POOL = BufferPool()
