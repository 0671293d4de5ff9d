"""The driver: plan → statistics → apply → finalize → atomic publish.

Everything the driver decides is written to the staging directory's `.tadmerge/`
folder as it goes: the plan fingerprint, the resolved statistics, and one line
per finished unit (appended only after the unit's bytes were written). A killed
merge therefore resumes with `--resume`: same fingerprint required, finished
units and statistics reused, the rest recomputed; the result is the same bytes.
The state folder is removed just before the manifest is written and the
directory is renamed into place.

The engine's modules (torch, numba) are imported where a merge needs them: the
statistics, EMR's masks, selections read back on --resume. A merge whose units
all stream (task arithmetic and averaging on CPU, engine/stream.py) never
imports torch, which saves ~2 s of start-up.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field

from .. import __version__
from ..config import MergeConfig
from ..engine.spec import TaskStats
from ..errors import InputError, InputProblem, MergeRuntimeError, OutputError, TadmergeError
from ..io.block_io import close_all, create_shard_files, index_json
from ..io.digest import StreamingDigests
from ..io.publish import Staging
from ..planners.inventory import MERGE
from ..planners.plan import Plan, make_plan
from .progress import Progress
from .worker import MASKS_DIR, TASKS_DIR, UnitRecord, start_kernels, unit_output_range

log = logging.getLogger("tadmerge")
STATE_DIR = ".tadmerge"
REPORT_NAME = "merge_report.json"
CONFIG_NAME = "merge_config.yaml"
EMR_NAME = "emr.json"


@dataclass
class MergeResult:
    output: str
    plan: Plan
    report: dict = field(default_factory=dict)


class RunState:
    """The resume log inside the staging directory."""

    def __init__(self, staging: str):
        self.dir = os.path.join(staging, STATE_DIR)
        with writing(self.dir):
            os.makedirs(self.dir, exist_ok=True)
        self.units_path = os.path.join(self.dir, "units.jsonl")

    def check_or_write_fingerprint(self, fingerprint: str, resume: bool) -> None:
        path = os.path.join(self.dir, "fingerprint")
        if resume and os.path.exists(path):
            with open(path) as f:
                old = f.read().strip()
            if old != fingerprint:
                raise OutputError(
                    "--resume: the inputs or the config changed since the interrupted merge "
                    f"(plan {old[:12]} != {fingerprint[:12]}); remove the staging directory "
                    "or restore them"
                )
            return
        _atomic_write(path, fingerprint.encode())

    def load_stats(self) -> dict | None:
        path = os.path.join(self.dir, "stats.json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            doc = json.load(f)
        if not doc:  # a merge without statistics: no engine import
            return {}
        from .stats import resolved_from_json

        return resolved_from_json(doc)

    def save_stats(self, resolved: dict) -> None:
        doc = b"{}"
        if resolved:
            from .stats import resolved_to_json

            doc = json.dumps(resolved_to_json(resolved)).encode()
        _atomic_write(os.path.join(self.dir, "stats.json"), doc)

    def finished(self) -> dict[int, UnitRecord]:
        out: dict[int, UnitRecord] = {}
        if not os.path.exists(self.units_path):
            return out
        with open(self.units_path) as f:
            for line in f:
                try:
                    rec = record_from_json(json.loads(line))
                except (json.JSONDecodeError, KeyError, TypeError):
                    break  # a line cut short by the kill: that unit is redone
                out[rec.unit] = rec
        return out

    def append(self, rec: UnitRecord) -> None:
        line = json.dumps(record_to_json(rec)) + "\n"
        with writing(self.units_path), open(self.units_path, "a") as f:
            f.write(line)
            f.flush()

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class writing:
    """Turn an OSError while writing `path` into a MergeRuntimeError naming it."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ, exc, tb) -> bool:
        if isinstance(exc, OSError):
            raise MergeRuntimeError(
                f"writing {self.path} failed: {exc.strerror or exc}; the staging directory "
                "is kept: fix the cause and rerun with --resume"
            ) from exc
        return False


def _atomic_write(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with writing(path):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def _selection_json(sel) -> dict:  # an engine.selection.Selection
    # vars() of the flat dataclasses: dataclasses.asdict deep-copies, and this runs
    # for every task of every unit
    return {**vars(sel), "lo": dict(vars(sel.lo)), "hi": dict(vars(sel.hi))}


def _stats_json(st) -> dict:
    return {
        "kept": st.kept,
        "selection": None if st.selection is None else _selection_json(st.selection),
        "tau_sq": st.tau_sq,
        "t_sq": st.t_sq,
    }


def record_to_json(rec: UnitRecord) -> dict:
    return {
        "unit": rec.unit,
        "tasks": [_stats_json(t) for t in rec.tasks],
        "emr_abs_t": None if rec.emr_abs_t is None else [s.to_json() for s in rec.emr_abs_t],
        "emr_abs_uni": None if rec.emr_abs_uni is None else [s.to_json() for s in rec.emr_abs_uni],
        "ties": None if rec.ties is None else list(rec.ties),
    }


def record_from_json(d: dict) -> UnitRecord:
    tasks = []
    for t in d["tasks"]:
        sel = t["selection"]
        if sel is not None:
            from ..engine.histogram import Cut
            from ..engine.selection import Selection

            sel = Selection(**{**sel, "lo": Cut(**sel["lo"]), "hi": Cut(**sel["hi"])})
        tasks.append(
            TaskStats(
                kept=t["kept"],
                selection=sel,
                tau_sq=t["tau_sq"],
                t_sq=t["t_sq"],
            )
        )

    def conv(v: list | None) -> list | None:
        if v is None:
            return None
        from ..engine.exact import ExactSum

        return [ExactSum.from_json(x) for x in v]

    ties = None if d.get("ties") is None else tuple(d["ties"])
    return UnitRecord(d["unit"], tasks, conv(d["emr_abs_t"]), conv(d["emr_abs_uni"]), ties)


def make_executor(plan: Plan, staging: str):
    rt = plan.config.runtime
    if rt.executor == "ray":
        from .ray_executor import RayExecutor

        return RayExecutor(plan, staging)
    from .local import LocalExecutor
    from .worker import resolve_device

    return LocalExecutor(plan, staging, rt.local_workers(), resolve_device(rt.device))


def unit_bytes(plan: Plan, unit_id: int) -> int:
    u = plan.units[unit_id]
    tp = plan.tensors[u.tensor]
    rows = u.row_end - u.row_start
    return sum(rows * tp.row_numel * e.itemsize for e in tp.sources)


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
    start_kernels(cfg)
    plan = plan or make_plan(cfg)
    start_kernels(cfg, plan)  # (what only the plan tells: a large streamed merge)
    timings["plan_s"] = time.monotonic() - t0
    staging = Staging(cfg.output.path, overwrite=overwrite, resume=resume)
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
    try:
        state = RunState(staging.path)
        state.check_or_write_fingerprint(plan.fingerprint, resume)
        with writing(staging.path):
            _prepare_outputs(plan, staging.path)
        digests = _start_digests(plan, staging.path)
        executor = make_executor(plan, staging.path)
        t1 = time.monotonic()
        resolved = state.load_stats() if resume else None
        reads = {"input_bytes": plan.input_bytes, "stats_rounds": 0, "stats_read_bytes": 0}
        if resolved is None:
            resolved = _run_stats(plan, executor, reads)
            state.save_stats(resolved)
        timings["stats_s"] = time.monotonic() - t1

        t2 = time.monotonic()
        done = state.finished() if resume else {}
        reused = len(done)
        # output ranges go to the digests once final: split TIES blocks only after
        # the reruns below, which may rewrite them
        held: set[int] = set()

        def final(unit_id: int, reruns_done: bool = False) -> None:
            tp = plan.tensors[plan.units[unit_id].tensor]
            if not reruns_done and plan.config.merge.method == "ties" and tp.split:
                held.add(unit_id)
            elif (where := unit_output_range(plan, plan.units[unit_id])) is not None:
                digests.final(*where)

        for u in done:
            final(u)
        todo = [u.id for u in plan.units if u.id not in done]
        progress = Progress(
            "merge",
            len(plan.units),
            sum(unit_bytes(plan, u) for u in todo),
            cfg.runtime.progress,
        )
        progress.units = reused
        nonfinite: dict[tuple[str, str], int] = {}

        def on_done(rec: UnitRecord) -> None:
            if rec.nonfinite:
                note_nonfinite(plan, rec, nonfinite)
                return
            state.append(rec)
            done[rec.unit] = rec
            final(rec.unit)
            progress.update(1, unit_bytes(plan, rec.unit))

        try:
            executor.run_units(todo, resolved, on_done)
            if nonfinite:
                raise nonfinite_input_error(nonfinite)
            redo = ties_reruns(plan, done, resolved)
            if redo:
                log.info("TIES: %d block(s) rerun with their tensor's majority sign", len(redo))
                executor.run_units(redo, resolved, on_done)
            for u in held:
                final(u, reruns_done=True)
        finally:
            progress.close()
        timings["apply_s"] = time.monotonic() - t2
        t3 = time.monotonic()
        report = _finalize(plan, staging.path, done, resolved, reused, executor)
        timings["finalize_s"] = time.monotonic() - t3
        timings["total_s"] = time.monotonic() - t0
        report["timings"] = timings
        # input bytes read besides the merge's own read: what exact statistics cost
        reads["extra_reads"] = reads["stats_read_bytes"] / max(1, plan.input_bytes)
        report["reads"] = reads
        report["peak_rss_bytes"] = peak_rss_bytes()
        executor.close()
        if getattr(executor, "peak_rss_workers", None):
            report["peak_rss_workers_bytes"] = executor.peak_rss_workers
        report["executor"] = {
            "kind": plan.config.runtime.executor,
            "workers": getattr(executor, "workers", plan.config.runtime.workers),
            "workers_replaced": getattr(executor, "replaced", 0),
        }
        _write_json(os.path.join(staging.path, REPORT_NAME), report)
        close_all()
        out = staging.publish(scratch=STATE_DIR, known=digests.finish())
        log.info("published %s in %.1fs", out, timings["total_s"])
        return MergeResult(out, plan, report)
    except InputError:
        # bad input found while reading: this staging can never be resumed (the
        # fixed input changes the plan), so leave nothing behind
        close_all()
        shutil.rmtree(staging.path, ignore_errors=True)
        raise
    except TadmergeError:
        close_all()
        raise
    except KeyboardInterrupt:
        close_all()
        raise
    except OSError as e:
        close_all()
        raise MergeRuntimeError(
            f"{e.filename or ''}: {e.strerror or e}; staging kept at {staging.path}, "
            "fix the cause and rerun with --resume"
        ) from e
    finally:
        if digests is not None:
            digests.abort()  # a no-op after finish()
        if executor is not None:
            executor.close()


def _start_digests(plan: Plan, staging: str) -> StreamingDigests:
    """Hash the output shards as they are written (io/digest.py); headers are final."""
    digests = StreamingDigests(staging, {s.filename: s.file_size for s in plan.shards})
    for s in plan.shards:
        digests.final(s.filename, 0, len(s.header))
    return digests


def note_nonfinite(plan: Plan, rec: UnitRecord, acc: dict[tuple[str, str], int]) -> None:
    tp = plan.tensors[plan.units[rec.unit].tensor]
    for i, n in rec.nonfinite or []:
        file = tp.sources[i].file if i >= 0 else tp.sources[-1].file
        acc[(file, tp.name)] = acc.get((file, tp.name), 0) + n


def nonfinite_input_error(acc: dict[tuple[str, str], int]) -> InputError:
    hint = "(set inputs.allow_nonfinite: true to merge anyway)"
    return InputError(
        [InputProblem(f, t, f"{n} NaN/Inf value(s) {hint}") for (f, t), n in sorted(acc.items())]
    )


def ties_reruns(plan: Plan, done: dict[int, UnitRecord], resolved: dict) -> list[int]:
    """Blocks of split TIES tensors that used the wrong provisional majority sign.

    The majority only decides entries whose weighted votes cancel exactly while
    some task moved; blocks without such entries are already right. Fills in
    the final sign in `resolved` for the reruns (and for a later --resume).
    """
    if plan.config.merge.method != "ties":
        return []
    redo = []
    for t in plan.tensors:
        if not (t.split and t.kind == MERGE):
            continue
        votes = sum(done[u].ties[0] for u in t.units)
        majority = -1 if votes < 0 else 1
        for u in t.units:
            _, cancel, used = done[u].ties
            if cancel and used != majority:
                resolved.setdefault(u, {})["majority"] = majority
                redo.append(u)
    return redo


from .memory import peak_rss_bytes  # noqa: E402  (re-exported for the report)


def _run_stats(plan: Plan, executor, reads: dict) -> dict:
    """The statistics stage; `reads` counts its rounds and the input bytes they read."""
    if not plan.needs_stats():
        return {}
    t = time.monotonic()

    times: list[str] = []

    def counted_map(label: str, items: list, on_result) -> None:
        reads["stats_rounds"] += 1
        reads.setdefault("round_kinds", []).append(label)
        reads["stats_read_bytes"] += sum(unit_bytes(plan, u) for u, _ in items)
        t_round = time.monotonic()
        executor.map_stats(label, items, on_result)
        times.append(f"{label} {time.monotonic() - t_round:.1f}s")

    from .stats import run_stats_stage

    resolved = run_stats_stage(plan, counted_map)
    log.info(
        "statistics stage done in %.1fs: %d round(s) (%s) read %.2f of the inputs again",
        time.monotonic() - t,
        reads["stats_rounds"],
        ", ".join(times),
        reads["stats_read_bytes"] / max(1, plan.input_bytes),
    )
    return resolved


def _prepare_outputs(plan: Plan, staging: str) -> None:
    create_shard_files(staging, plan.shards)
    for name, shards in plan.task_shards.items():
        d = os.path.join(staging, TASKS_DIR, name)
        os.makedirs(d, exist_ok=True)
        create_shard_files(d, shards)
    if plan.is_emr:
        from ..emr.store import MaskStore

        MaskStore.create(
            os.path.join(staging, MASKS_DIR),
            plan.config.task_names,
            [(t.index, t.name, t.shape, t.rng_rows) for t in plan.tensors if t.kind == MERGE],
        )


def _write_json(path: str, doc: dict) -> None:
    with writing(path), open(path, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=False, default=_json_default)
        f.write("\n")


def _json_default(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    raise TypeError(type(v))


def _finalize(
    plan: Plan, staging: str, done: dict[int, UnitRecord], resolved: dict, reused: int, executor
) -> dict:
    cfg = plan.config
    missing = [u.id for u in plan.units if u.id not in done]
    if missing:
        raise MergeRuntimeError(f"{len(missing)} unit(s) did not finish: {missing[:10]}")
    if len(plan.shards) > 1:
        _atomic_write(
            os.path.join(staging, "model.safetensors.index.json"), index_json(plan.shards)
        )
    for name, shards in plan.task_shards.items():
        if len(shards) > 1:
            index_path = os.path.join(staging, TASKS_DIR, name, "model.safetensors.index.json")
            _atomic_write(index_path, index_json(shards))
    for src in plan.inputs[0].extra_files:
        dest = os.path.join(staging, os.path.basename(src))
        with writing(dest):
            shutil.copyfile(src, dest)
    _atomic_write(os.path.join(staging, CONFIG_NAME), cfg.to_yaml().encode())
    from ..report.figures import tensor_report

    tensors, emr = tensor_report(plan, done, resolved)
    report: dict = {
        "format": "tadmerge-report/1",
        "tadmerge_version": __version__,
        "plan_fingerprint": plan.fingerprint,
        "config": cfg.to_dict(),
        "tasks": cfg.task_names,
        "units": {"total": len(plan.units), "reused": reused},
        "input_bytes": plan.input_bytes,
        "output_bytes": plan.output_bytes,
        "tensors": tensors,
    }
    glob = resolved.get("_global")
    if glob:
        report["global"] = {cfg.task_names[int(k)]: v for k, v in glob.get("groups", {}).items()}
    if plan.is_emr:
        report["emr"] = emr
        _write_json(os.path.join(staging, EMR_NAME), _emr_doc(plan, emr))
    return report


def _emr_doc(plan: Plan, emr: dict) -> dict:
    base = plan.inputs[0]
    cfg = plan.config
    return {
        "format": "tadmerge-emr/1",
        "tasks": cfg.task_names,
        "rescalers": emr["rescalers"],
        "base": {"source": cfg.base, "root": base.root, "revision": base.revision},
        "delta": {
            "dtype": cfg.emr.delta_dtype,
            "files": [s.filename for s in plan.shards],
            "meaning": "tau_uni; task k = base + rescaler_k * mask_k * tau_uni",
        },
        "masks": {"store": MASKS_DIR, "bitorder": "little"},
        "excluded_per_task": {
            name: [s.filename for s in shards] for name, shards in plan.task_shards.items()
        },
        "tensors": {
            t.name: {
                "kind": t.kind,
                "shape": list(t.shape),
                "dtype": t.dtype,
                "block_rows": t.rng_rows,
            }
            for t in plan.tensors
        },
    }
