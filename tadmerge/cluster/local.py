"""The in-process executor: a bounded pool of threads over units.

torch and numpy release the GIL in their kernels and reads/writes are
pread/pwrite, so threads overlap I/O and compute without copying data between
processes. At
most `workers` units are in flight, which keeps the working set within the
memory budget that the planner divided among them. Results are delivered to
the driver's callbacks in completion order; every reduction they feed is exact
and order-independent, so the output does not depend on scheduling.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from ..config import available_cpus
from ..engine.spec import StatsRequest
from ..io.block_io import prefetch_rows
from ..planners.plan import Plan
from .buffers import POOL
from .dispatch import Dispatch
from .worker import UnitRecord, run_unit, torch_free, unit_stats

# units read ahead into the page cache (not RSS): a few, so that the disk keeps
# reading while the workers compute
PREFETCH_AHEAD = 4

# units handed to the thread pool beyond those running: a worker that finishes
# takes the next at once instead of idling while the driver's thread wakes up,
# takes in the result (a statistics round reduces histograms there, holding the
# GIL) and submits another. Queued units hold no memory until they start.
QUEUED_PER_WORKER = 1


class LocalExecutor:
    def __init__(self, plan: Plan, staging: str, workers: int, dispatch: Dispatch):
        self.plan = plan
        self.staging = staging
        self.workers = max(1, workers)
        # the driver's decision (device resolved: the local executor's is), handed
        # to every unit as it is
        self.dispatch = dispatch
        device = dispatch.device
        self.peak_rss_workers: list[int] = []
        # Several workers on a CPU: each runs its kernels on its own share of the
        # cores. The engine works in cache-sized chunks, where an intra-op thread
        # pool costs more in synchronisation than it gains.
        # (A merge whose units all stream or take the raw bf16 path runs numpy
        # and the C kernels, and never imports torch.)
        self._threads: int | None = None
        if device == "cpu" and self.workers > 1 and not torch_free(plan, device, dispatch.kernels):
            import torch

            self._threads = torch.get_num_threads()
            torch.set_num_threads(max(1, available_cpus() // self.workers))

    def _bounded_map(self, fn: Callable, items: list, on_result: Callable) -> None:
        """Run fn over items (key = unit id first), at most `workers` at a time
        (with QUEUED_PER_WORKER more waiting in the pool's queue).

        The unit after those running is prefetched into the page cache as each
        one starts (io/block_io.prefetch_rows), so that on a cold cache the disk
        reads ahead while the workers compute instead of waiting for their next
        pread.
        """
        pending = list(items)
        for key, *_ in pending[:PREFETCH_AHEAD]:
            self._prefetch(key)
        if self.workers == 1:
            for i, (key, *args) in enumerate(pending):
                if i + PREFETCH_AHEAD < len(pending):
                    self._prefetch(pending[i + PREFETCH_AHEAD][0])
                on_result(key, fn(*args))
            return
        with ThreadPoolExecutor(self.workers) as pool:
            running: dict[Future, object] = {}
            pos = 0

            def submit() -> None:
                nonlocal pos
                key, *args = pending[pos]
                if pos + PREFETCH_AHEAD < len(pending):
                    self._prefetch(pending[pos + PREFETCH_AHEAD][0])
                pos += 1
                running[pool.submit(fn, *args)] = key

            window = self.workers * (1 + QUEUED_PER_WORKER)
            while pos < len(pending) and len(running) < window:
                submit()
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for f in done:
                    key = running.pop(f)
                    on_result(key, f.result())
                    if pos < len(pending):
                        submit()

    def _prefetch(self, unit_id: int) -> None:
        unit = self.plan.units[unit_id]
        for src in self.plan.tensors[unit.tensor].sources:
            prefetch_rows(src, unit.row_start, unit.row_end)

    def map_stats(self, label: str, items: list[tuple[int, StatsRequest]], on_result) -> None:
        self._bounded_map(
            unit_stats,
            [(u, self.plan, u, req, self.dispatch) for u, req in items],
            on_result,
        )

    def run_units(
        self, unit_ids: list[int], resolved: dict, on_done: Callable[[UnitRecord], None]
    ) -> None:
        self._bounded_map(
            run_unit,
            [(u, self.plan, self.staging, u, resolved.get(u), self.dispatch) for u in unit_ids],
            lambda _k, rec: on_done(rec),
        )

    def close(self) -> None:
        POOL.release()
        if self._threads is not None:
            import torch

            torch.set_num_threads(self._threads)
