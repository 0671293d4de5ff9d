"""The driver: plan → statistics → apply → finalize → atomic publish.

One merge run, start to end; each step is its module's:

- the plan (planners/), and where the math runs (cluster/dispatch.py);
- the staging directory (io/publish.py) and its resume state (run/state.py: the
  plan fingerprint, the input versions of run/inputs.py, the statistics, and
  the resume log of run/unit_log.py);
- the output files laid out (run/outputs.py), then the statistics and apply
  stages (run/stages.py) on an executor (cluster/local.py or
  cluster/ray_executor.py);
- the inputs re-checked (run/inputs.py), the output completed (run/outputs.py)
  and published (io/publish.py).

A killed merge resumes with `--resume`: same fingerprint required, statistics
reused, finished units reused once their bytes on disk are read back and match
their checksums, the rest recomputed; the result is the same bytes. What a
failure leaves is decided here: an input problem found in the data removes the
staging directory (exit 3), anything else keeps it for `--resume` (exit 4).

The engine's modules (torch, the C kernels) are imported where a merge needs them:
the statistics, EMR's masks, selections read back on --resume. A merge whose units
all stream (task arithmetic and averaging on CPU, engine/stream.py) never imports
torch, which saves ~2 s of start-up.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field

from ..cluster.dispatch import Dispatch, decide
from ..cluster.memory import peak_rss_bytes
from ..cluster.worker import start_kernels
from ..config import MergeConfig
from ..errors import InputError, MergeRuntimeError, TadmergeError
from ..io.block_io import close_all
from ..io.publish import Staging
from ..planners.plan import Plan, make_plan
from .files import writing
from .inputs import (
    changed_since,
    check_inputs_unchanged,
    inputs_record,
    record_inputs,
    refuse_changed_inputs,
)
from .outputs import finalize, prepare_outputs, start_digests, write_report
from .stages import run_apply, run_stats
from .state import RunState
from .unit_log import check_finished

log = logging.getLogger("tadmerge")


@dataclass
class MergeResult:
    output: str
    plan: Plan
    report: dict = field(default_factory=dict)
    up_to_date: bool = False  # --if-changed found nothing changed: nothing was merged


def make_executor(plan: Plan, staging: str, dispatch: Dispatch):
    """The executor the config names: local threads or Ray actors (cluster/)."""
    rt = plan.config.runtime
    if rt.executor == "ray":
        from ..cluster.ray_executor import RayExecutor

        return RayExecutor(plan, staging, dispatch)
    from ..cluster.local import LocalExecutor

    return LocalExecutor(plan, staging, rt.local_workers(), dispatch)


def run_merge(
    cfg: MergeConfig,
    *,
    overwrite: bool = False,
    resume: bool = False,
    plan: Plan | None = None,
) -> MergeResult:
    """Run a whole merge. Raises before writing anything if the inputs are bad."""
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    dispatch = decide(cfg)
    if_changed = cfg.runtime.if_changed and not resume
    if not if_changed:
        start_kernels(dispatch)
    # (--if-changed: hub inputs planned from their headers, downloaded only if changed)
    plan = plan or make_plan(cfg, device=dispatch.device, fetch=not if_changed)
    if if_changed:
        why = changed_since(plan)
        if why is None:  # (the caller says so: one line)
            return MergeResult(cfg.output.path, plan, up_to_date=True)
        log.info("merging: %s", why)
        if not all(ck.fetched for ck in plan.inputs):
            plan = make_plan(cfg, device=dispatch.device)
        # (the published output is replaced atomically, as --overwrite does)
        overwrite = True
        start_kernels(dispatch)
    timings["plan_s"] = time.monotonic() - t0
    staging = Staging(cfg.output.path, overwrite=overwrite, resume=resume, keep=cfg.output.keep)
    _log_casts(plan)
    log.info(
        "plan %s: %d tensors, %d units, %.2f GB in, %.2f GB out",
        plan.fingerprint[:12],
        len(plan.tensors),
        len(plan.units),
        plan.input_bytes / 1e9,
        plan.output_bytes / 1e9,
    )
    executor = None
    digests = None
    base_pin = None
    if plan.is_emr:  # emr.json pins the base: hashed beside the merge (emr/pin.py)
        from ..emr.pin import BasePinner

        base_pin = BasePinner(plan.inputs[0])
    state = None
    try:
        state = RunState(staging.path)
        if resume:
            refuse_changed_inputs(state.dir, plan, staging.path)
        state.check_or_write_fingerprint(plan.fingerprint, resume)
        record_inputs(state.dir, plan)
        with writing(staging.path):
            rebuilt = prepare_outputs(plan, staging.path)
        digests = start_digests(plan, staging.path)
        executor = make_executor(plan, staging.path, dispatch)
        t1 = time.monotonic()
        resolved = state.load_stats() if resume else None
        reads = {"input_bytes": plan.input_bytes, "stats_rounds": 0, "stats_read_bytes": 0}
        if resolved is None:
            resolved = run_stats(plan, executor, reads)
            state.save_stats(resolved)
        timings["stats_s"] = time.monotonic() - t1

        t2 = time.monotonic()
        done = state.finished() if resume else {}
        if done:  # reuse only units whose bytes on disk match their records
            done = check_finished(staging.path, done, rebuilt, plan)
        reused = len(done)
        run_apply(plan, executor, state, resolved, done, digests)
        # every byte is read: were they all of the planned versions of the inputs?
        check_inputs_unchanged(plan)
        timings["apply_s"] = time.monotonic() - t2
        t3 = time.monotonic()
        report = finalize(plan, staging.path, done, resolved, reused, base_pin)
        timings["finalize_s"] = time.monotonic() - t3
        timings["total_s"] = time.monotonic() - t0
        report.update(_run_facts(plan, executor, dispatch, timings, reads))
        write_report(staging.path, report)
        close_all()
        state.close(flush=False)
        out = staging.publish(known=digests.finish())
        if not isinstance(report["tensors"], dict):  # (made from the log, now gone)
            from ..io.model_files import REPORT_NAME
            from ..report.figures import TensorsOnDisk

            report["tensors"] = TensorsOnDisk(os.path.join(out, REPORT_NAME))
        log.info("published %s in %.1fs", out, timings["total_s"])
        return MergeResult(out, plan, report)
    except InputError:
        # an input problem found while reading (NaN/Inf, non-float buffers that
        # differ, an overflow of the output dtype, an input that changed since it
        # was planned): whatever fixes it (another input, another config, or the
        # input's new version) changes the fingerprint, so --resume could never
        # reuse this staging: leave nothing behind
        _wind_down(state, flush=False)
        shutil.rmtree(staging.path, ignore_errors=True)
        raise
    except MergeRuntimeError as e:
        # (an OS error reading an input, writing, a lost worker: the finished work
        # is kept, and --resume tells a replaced input by its identity)
        _wind_down(state)
        if "--resume" in str(e):
            raise
        raise MergeRuntimeError(
            f"{e}; the staging directory {staging.path} is kept: fix the cause and rerun "
            "with --resume"
        ) from e
    except TadmergeError:
        _wind_down(state)
        raise
    except KeyboardInterrupt:
        _wind_down(state)
        raise
    except OSError as e:
        _wind_down(state)
        raise MergeRuntimeError(
            f"{e.filename or ''}: {e.strerror or e}; staging kept at {staging.path}, "
            "fix the cause and rerun with --resume"
        ) from e
    finally:
        if base_pin is not None:
            base_pin.cancel()  # a no-op once the pins are in emr.json
        if digests is not None:
            digests.abort()  # a no-op after finish()
        if executor is not None:
            executor.close()
        if state is not None:
            state.close(flush=False)  # (stopped already on every path but a crash)
        staging.close()


def _run_facts(plan: Plan, executor, dispatch: Dispatch, timings: dict, reads: dict) -> dict:
    """The report's account of the run itself (after the tensors' figures): times,
    reads, memory, what the output is made from, where the math ran, the workers.
    Closes the executor (a Ray actor's peak RSS is known once it stops)."""
    # input bytes read besides the merge's own read: what exact statistics cost
    reads["extra_reads"] = reads["stats_read_bytes"] / max(1, plan.input_bytes)
    facts = {"timings": timings, "reads": reads, "peak_rss_bytes": peak_rss_bytes()}
    executor.close()
    if getattr(executor, "peak_rss_workers", None):
        facts["peak_rss_workers_bytes"] = executor.peak_rss_workers
    facts["inputs"] = inputs_record(plan)
    facts["dispatch"] = dispatch.to_json()
    facts["executor"] = {
        "kind": plan.config.runtime.executor,
        "workers": getattr(executor, "workers", plan.config.runtime.workers),
        "workers_replaced": getattr(executor, "replaced", 0),
        "workers_lost": getattr(executor, "lost", 0),
    }
    return facts


def _wind_down(state: RunState | None, flush: bool = True) -> None:
    """A failing merge: log the units that did finish (their data made durable
    first), so that --resume reuses them, and close the output files."""
    if state is not None:
        state.close(flush)
    close_all()


def _log_casts(plan: Plan) -> None:
    from ..planners.inventory import casts

    for name, groups in casts(plan.config, plan.inputs).items():
        what = ", ".join(f"{g['tensors']} from {g['from']} to {g['to']}" for g in groups)
        log.info("model '%s': tensors widened with the base's: %s", name, what)
