"""The Ray executor: the same plan, run by a pool of actors on a cluster.

Actors receive the plan once (plain data) and then only unit ids and small
contexts; they read inputs by path and byte range from shared storage and write
output bytes at the planned offsets themselves, so no tensor ever goes through
the object store. Results (histograms, sums, counts) come back small. An actor
that dies (killed process, lost node) is replaced and its unit rerun, up to
`runtime.max_retries` times per unit; every unit is idempotent (it rewrites the
same bytes at the same offsets), so a rerun cannot change the output.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace

from ..engine.spec import StatsRequest
from ..errors import MergeRuntimeError, TadmergeError
from ..planners.plan import Plan
from .dispatch import Dispatch
from .worker import UnitRecord, resolve_device, run_unit, start_kernels, unit_stats

log = logging.getLogger("tadmerge")


class _UnitWorker:
    """Actor body (wrapped with ray.remote at runtime)."""

    def __init__(self, plan: Plan, staging: str, dispatch: Dispatch):
        from .memory import tune_malloc

        tune_malloc()
        start_kernels(dispatch)  # the driver's choices, as given
        self.plan = plan
        self.staging = staging
        # the device resolved once here (the actor's GPU), the backend as given
        self.dispatch = replace(dispatch, device=resolve_device(dispatch.device))

    def pid(self) -> int:
        return os.getpid()

    def stats(self, unit_id: int, request: StatsRequest):
        return unit_stats(self.plan, unit_id, request, self.dispatch)

    def run(self, unit_id: int, resolved: dict | None) -> UnitRecord:
        return run_unit(self.plan, self.staging, unit_id, resolved, self.dispatch)

    def peak_rss(self) -> int:
        from .memory import peak_rss_bytes

        return peak_rss_bytes()

    def close(self) -> None:
        from ..io.block_io import close_all

        close_all()


ACTOR_OVERHEAD = 640 * 2**20  # interpreter, torch, the C kernels and Ray's worker beside the budget


def auto_actors(ray, cpus_per_worker: float, memory_budget: int) -> int:
    """`workers: auto` on Ray: as many actors as the cluster's CPUs hold, and no
    more than its memory holds at memory_budget (plus overhead) each."""
    res = ray.cluster_resources()
    cpus = float(res.get("CPU", 1.0))
    by_cpu = int(cpus // cpus_per_worker) if cpus_per_worker > 0 else int(cpus)
    by_mem = int(float(res.get("memory", 0.0)) // (memory_budget + ACTOR_OVERHEAD))
    return max(1, min(by_cpu, by_mem) if by_mem > 0 else by_cpu)


class RayExecutor:
    def __init__(self, plan: Plan, staging: str, dispatch: Dispatch):
        import ray

        self.ray = ray
        self.dispatch = dispatch
        rt = plan.config.runtime
        if not ray.is_initialized():
            # RAY_ADDRESS (set by `ray job submit`) or a local cluster started for the run
            ray.init(log_to_driver=True, include_dashboard=False)
        gpus = rt.gpus_per_worker
        if gpus is None:
            gpus = 1.0 if dispatch.device == "cuda" else 0.0
        self.actor_cls = ray.remote(num_cpus=rt.cpus_per_worker, num_gpus=gpus)(_UnitWorker)
        self.plan_ref = ray.put(plan)
        self.staging = staging
        # the dispatch's device; auto (compute-bound merges) takes the actors' GPUs
        self.device = dispatch.device
        if self.device == "auto":
            self.device = "cuda" if gpus > 0 else "cpu"
        self.max_retries = rt.max_retries
        self.workers = rt.workers or auto_actors(ray, rt.cpus_per_worker, rt.memory_budget)
        self.actors = [self._new_actor() for _ in range(self.workers)]
        self.peak_rss_workers: list[int] = []
        self.replaced = 0
        self.lost = 0  # workers given up (not scheduled in time)
        self.start_timeout = rt.worker_start_timeout
        # workers not known to be started yet: ref of their first call -> (slot, since,
        # held: no units until started). The first ones take units at once (queued by
        # Ray until they start) and are watched all the same: a cluster with no room
        # for them (a resume after a lost node) gives them up after
        # worker_start_timeout, their units going to the others, instead of waiting.
        now = time.monotonic()
        self._starting: dict = {a.pid.remote(): (s, now, False) for s, a in enumerate(self.actors)}

    def _new_actor(self):
        actor = self.actor_cls.options(max_restarts=0)
        dispatch = replace(self.dispatch, device=self.device)
        return actor.remote(self.plan_ref, self.staging, dispatch)

    def _map(self, method: str, items: list[tuple[int, object]], on_result: Callable) -> None:
        """Run `method` over items on the actors, one item per actor at a time.

        An actor that dies (its process, or its node) is replaced and its item
        rerun (max_retries per item). An actor, first or replacement, that is not
        started within worker_start_timeout (a lost node takes its CPUs along) is
        given up: its slot closes and its items go to the other actors. With none
        left the merge stops with MergeRuntimeError (exit 4), its finished units
        logged.
        """
        ray = self.ray
        queue = list(reversed(items))
        tries: dict[int, int] = {}
        in_flight: dict = {}  # ref -> (actor slot, item)
        # workers not yet started (kept across rounds): ref of their first call ->
        # (slot, since, held); held (replacements) take no units until started
        starting = self._starting
        waiting = {slot for slot, _, held in starting.values() if held}
        idle = [s for s, a in enumerate(self.actors) if a is not None and s not in waiting]
        timeout = self.start_timeout

        def submit(slot: int, item) -> None:
            unit_id, arg = item
            ref = getattr(self.actors[slot], method).remote(unit_id, arg)
            in_flight[ref] = (slot, item)

        def lose(slot: int, why: str) -> None:
            actor, self.actors[slot] = self.actors[slot], None
            self.lost += 1
            log.warning("worker %d given up (%s); its units go to the others", slot, why)
            for ref, (s, item) in list(in_flight.items()):  # queued on it, never run
                if s == slot:
                    del in_flight[ref]
                    queue.append(item)
            if slot in idle:
                idle.remove(slot)
            try:
                ray.kill(actor)
            except Exception:  # already gone with its node
                pass

        while queue or in_flight:
            while queue and idle:
                submit(idle.pop(), queue.pop())
            if not in_flight and not starting:
                raise MergeRuntimeError(
                    f"all {len(self.actors)} Ray workers were lost and none could be "
                    f"started within runtime.worker_start_timeout ({timeout:g}s); "
                    f"{len(queue)} unit(s) left: rerun with --resume once the cluster has room"
                )
            now = time.monotonic()
            wait = min((since + timeout - now for _, since, _ in starting.values()), default=None)
            ready, _ = ray.wait(
                [*in_flight, *starting],
                num_returns=1,
                timeout=None if wait is None else max(0, wait),
            )
            if not ready:  # a worker waited too long to be started
                now = time.monotonic()
                for ref, (slot, since, _) in list(starting.items()):
                    if now - since >= timeout:
                        del starting[ref]
                        lose(slot, f"not scheduled within {timeout:g}s")
                continue
            ref = ready[0]
            if ref in starting:
                slot, _, held = starting.pop(ref)
                try:
                    ray.get(ref)
                except ray.exceptions.RayError as e:
                    lose(slot, f"it failed to start: {type(e).__name__}")
                else:
                    if held:
                        idle.append(slot)
                continue
            slot, item = in_flight.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                cause = e.as_instanceof_cause()
                if isinstance(cause, TadmergeError):
                    raise _unwrap(cause) from None
                raise MergeRuntimeError(f"unit {item[0]} failed on a worker: {cause}") from None
            except ray.exceptions.RayError as e:  # the actor, its process or its node died
                tries[item[0]] = tries.get(item[0], 0) + 1
                if tries[item[0]] > self.max_retries:
                    raise MergeRuntimeError(
                        f"unit {item[0]} failed {tries[item[0]]} times (worker died): "
                        f"{str(e).splitlines()[0][:300]}"
                    ) from None
                log.warning("worker died on unit %d; replacing it and rerunning", item[0])
                queue.append(item)
                for r, (s, *_) in list(starting.items()):  # (the dead one's own start)
                    if s == slot:
                        del starting[r]
                self.actors[slot] = self._new_actor()
                self.replaced += 1
                starting[self.actors[slot].pid.remote()] = (slot, time.monotonic(), True)
                continue
            idle.append(slot)
            on_result(item[0], result)

    def map_stats(self, label: str, items: list[tuple[int, StatsRequest]], on_result) -> None:
        self._map("stats", items, on_result)

    def run_units(
        self, unit_ids: list[int], resolved: dict, on_done: Callable[[UnitRecord], None]
    ) -> None:
        self._map("run", [(u, resolved.get(u)) for u in unit_ids], lambda _k, r: on_done(r))

    def close(self) -> None:
        # workers never started count as lost, and are not asked anything
        starting = self._starting
        if starting:
            done, _ = self.ray.wait(list(starting), num_returns=len(starting), timeout=0)
            for ref in done:  # started after all (or failed: asked below, in a try)
                del starting[ref]
        unscheduled = {slot for slot, _, _ in starting.values()}
        self.lost += len(unscheduled)
        self._starting = {}
        for slot in unscheduled:
            try:
                self.ray.kill(self.actors[slot])
            except Exception:
                pass
        live = [a for s, a in enumerate(self.actors) if a is not None and s not in unscheduled]
        self.actors = []
        if not live:
            return
        ray = self.ray
        try:
            self.peak_rss_workers = ray.get([a.peak_rss.remote() for a in live], timeout=60)
            ray.get([a.close.remote() for a in live], timeout=60)
        except Exception:  # a dead actor at shutdown must not mask the merge's own result
            pass
        for a in live:
            try:
                ray.kill(a)
            except Exception:
                pass


def _unwrap(err: TadmergeError) -> TadmergeError:
    """Ray wraps the worker's exception in a subclass; give the user the original type."""
    for cls in type(err).__mro__:
        if cls.__module__.startswith("tadmerge"):
            new = cls.__new__(cls)
            new.__dict__.update(err.__dict__)
            new.args = err.args
            return new
    return err
