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

    def pinned(self, name: str, nbytes: int) -> torch.Tensor:
        """A page-locked uint8 host tensor of `nbytes`, reused: the staging buffer of
        asynchronous copies to a GPU (a pageable source makes each copy synchronous
        and bounced through a driver buffer). Waits for the copies that read the
        previous contents first (see `copied`)."""
        import torch

        self.wait_copies()
        store = self._local.__dict__.setdefault("pinned", {})
        buf = store.get(name)
        if buf is None or buf.numel() < nbytes:
            store.pop(name, None)
            buf = store[name] = torch.empty(max(1, nbytes), dtype=torch.uint8, pin_memory=True)
        return buf[:nbytes]

    def device(self, name: str, numel: int, dtype: torch.dtype, device) -> torch.Tensor:
        """A flat tensor on `device` of `numel` elements, reused like `get`: GPU
        memory is allocated once per worker, not per unit."""
        import torch

        store = self._local.__dict__.setdefault("device", {})
        buf = store.get(name)
        need = numel * dtype.itemsize
        if buf is None or buf.numel() < need or buf.device != torch.device(device):
            store.pop(name, None)
            buf = store[name] = torch.empty(max(1, need), dtype=torch.uint8, device=device)
        return buf[:need].view(dtype)

    def copied(self, event) -> None:
        """Record the event after which the pinned buffers may be written again."""
        self._local.__dict__["copy_event"] = event

    def wait_copies(self) -> None:
        event = self._local.__dict__.pop("copy_event", None)
        if event is not None:
            event.synchronize()

    def release(self) -> None:
        """Drop this thread's buffers (threads of a finished pool drop theirs on exit)."""
        for key in ("buffers", "pinned", "device", "copy_event"):
            self._local.__dict__.pop(key, None)


POOL = BufferPool()
