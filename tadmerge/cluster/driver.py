"""The driver: plan → statistics → apply → finalize → atomic publish.

Everything the driver decides is written to the staging directory's `.tadmerge/`
folder as it goes: the plan fingerprint, the resolved statistics, and one line
per finished unit, with the byte ranges it wrote and their crc32 (appended in
batches, each only after the data of its units was fdatasync'ed: see
cluster/integrity.py). A killed merge therefore resumes with `--resume`: same
fingerprint required, statistics reused, finished units reused once their
bytes on disk are read back and match their checksums, the rest recomputed;
the result is the same bytes. The state folder is left out of the manifest,
travels with the rename into place and is removed from the output right after
(io/publish.py), so a staging directory never lacks its fingerprint.

The inputs read are those planned with (io/identity.py): the version of every
input file is recorded in the plan, in the fingerprint and in `.tadmerge/
inputs.json` (so that a refused `--resume` names the files that changed);
workers read through descriptors checked against it, and before anything is
published every input is re-stat'ed and its header re-read.

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
from ..errors import (
    InputChangedError,
    InputError,
    InputProblem,
    MergeRuntimeError,
    OutputError,
    TadmergeError,
    printable,
)
from ..io.block_io import changed_problem, close_all, create_shard_files, index_json
from ..io.digest import StreamingDigests
from ..io.identity import recheck
from ..io.publish import STATE_DIR, Staging, fsync_dir
from ..planners.inventory import MERGE
from ..planners.plan import Plan, input_versions, make_plan
from .dispatch import Dispatch, decide
from .integrity import UnitLog, check_finished, out_from_json, out_to_json
from .progress import Progress
from .worker import MASKS_DIR, TASKS_DIR, UnitRecord, start_kernels, unit_output_range

log = logging.getLogger("tadmerge")
REPORT_NAME = "merge_report.json"
CONFIG_NAME = "merge_config.yaml"
INPUTS_NAME = "inputs.json"  # in STATE_DIR: the input versions the staging was made from
EMR_NAME = "emr.json"


@dataclass
class MergeResult:
    output: str
    plan: Plan
    report: dict = field(default_factory=dict)
    up_to_date: bool = False  # --if-changed found nothing changed: nothing was merged


class RunState:
    """The resume log inside the staging directory."""

    def __init__(self, staging: str):
        self.dir = os.path.join(staging, STATE_DIR)
        with writing(self.dir):
            os.makedirs(self.dir, exist_ok=True)
        self.units_path = os.path.join(self.dir, "units.jsonl")
        self.log = UnitLog(self.units_path, staging)

    def check_or_write_fingerprint(self, fingerprint: str, resume: bool) -> None:
        path = os.path.join(self.dir, "fingerprint")
        staging = os.path.dirname(self.dir)
        if resume and not os.path.exists(path) and set(os.listdir(staging)) - {STATE_DIR}:
            # files no fingerprint vouches for (a staging directory that an older
            # tadmerge left mid-publish): they may belong to another plan
            raise OutputError(
                f"--resume: {staging} holds files but no plan fingerprint, so they cannot "
                "be matched to this merge; remove it and rerun without --resume"
            )
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
        with writing(self.dir):  # durable before any file it vouches for exists
            fsync_dir(self.dir)

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
        """Log a finished unit: batched, written once its data is durable (UnitLog)."""
        self.log.add(rec, json.dumps(record_to_json(rec)) + "\n")

    def flush(self) -> None:
        self.log.flush()

    def close(self, flush: bool) -> None:
        """Stop logging; with `flush`, first log what finished (best effort: the
        merge is failing already, and an unlogged unit is only redone)."""
        if flush:
            try:
                self.log.flush()
            except MergeRuntimeError as exc:
                log.warning("%s", exc)
        self.log.close()

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
        "out": out_to_json(rec.out),
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
    return UnitRecord(
        d["unit"],
        tasks,
        conv(d["emr_abs_t"]),
        conv(d["emr_abs_uni"]),
        ties,
        out=out_from_json(d.get("out")),
    )


def make_executor(plan: Plan, staging: str, dispatch: Dispatch):
    rt = plan.config.runtime
    if rt.executor == "ray":
        from .ray_executor import RayExecutor

        return RayExecutor(plan, staging, dispatch)
    from .local import LocalExecutor

    return LocalExecutor(plan, staging, rt.local_workers(), dispatch)


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
    dispatch = decide(cfg)
    if_changed = cfg.runtime.if_changed and not resume
    if not if_changed:
        start_kernels(cfg, dispatch)
    plan = plan or make_plan(cfg, device=dispatch.device)
    if if_changed:
        why = changed_since(plan)
        if why is None:  # (the caller says so: one line)
            return MergeResult(cfg.output.path, plan, up_to_date=True)
        log.info("merging: %s", why)
        # (the published output is replaced atomically, as --overwrite does)
        overwrite = True
        start_kernels(cfg, dispatch)
    start_kernels(cfg, dispatch, plan)  # (what only the plan tells: a large streamed merge)
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
            rebuilt = _prepare_outputs(plan, staging.path)
        digests = _start_digests(plan, staging.path)
        executor = make_executor(plan, staging.path, dispatch)
        t1 = time.monotonic()
        resolved = state.load_stats() if resume else None
        reads = {"input_bytes": plan.input_bytes, "stats_rounds": 0, "stats_read_bytes": 0}
        if resolved is None:
            resolved = _run_stats(plan, executor, reads)
            state.save_stats(resolved)
        timings["stats_s"] = time.monotonic() - t1

        t2 = time.monotonic()
        done = state.finished() if resume else {}
        if done:  # reuse only units whose bytes on disk match their records
            done = check_finished(staging.path, done, rebuilt)
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
            reused=reused,
        )
        nonfinite: dict[tuple[str, str], int] = {}
        overflow: dict[str, int] = {}  # output tensor -> NaN/Inf made by the merge

        def on_done(rec: UnitRecord) -> None:
            if rec.nonfinite:
                note_nonfinite(plan, rec, nonfinite)
                return
            if rec.nonfinite_out:
                name = plan.tensors[plan.units[rec.unit].tensor].name
                overflow[name] = overflow.get(name, 0) + rec.nonfinite_out
                return
            state.append(rec)
            done[rec.unit] = rec
            final(rec.unit)
            progress.update(rec.unit, unit_bytes(plan, rec.unit))

        try:
            executor.run_units(todo, resolved, on_done)
            if nonfinite or overflow:
                raise nonfinite_error(plan, nonfinite, overflow)
            redo = ties_reruns(plan, done, resolved)
            if redo:
                log.info("TIES: %d block(s) rerun with their tensor's majority sign", len(redo))
                executor.run_units(redo, resolved, on_done)
                if nonfinite or overflow:
                    raise nonfinite_error(plan, nonfinite, overflow)
            for u in held:
                final(u, reruns_done=True)
            state.flush()
        finally:
            progress.close()
        # every byte is read: were they all of the planned versions of the inputs?
        check_inputs_unchanged(plan)
        timings["apply_s"] = time.monotonic() - t2
        t3 = time.monotonic()
        report = _finalize(plan, staging.path, done, resolved, reused, executor, base_pin)
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
        report["inputs"] = inputs_record(plan)
        report["dispatch"] = dispatch.to_json()
        report["executor"] = {
            "kind": plan.config.runtime.executor,
            "workers": getattr(executor, "workers", plan.config.runtime.workers),
            "workers_replaced": getattr(executor, "replaced", 0),
            "workers_lost": getattr(executor, "lost", 0),
        }
        _write_json(os.path.join(staging.path, REPORT_NAME), report)
        close_all()
        state.close(flush=False)
        out = staging.publish(known=digests.finish())
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


def _wind_down(state: RunState | None, flush: bool = True) -> None:
    """A failing merge: log the units that did finish (their data made durable
    first), so that --resume reuses them, and close the output files."""
    if state is not None:
        state.close(flush)
    close_all()


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


def nonfinite_error(
    plan: Plan, inputs: dict[tuple[str, str], int], outputs: dict[str, int]
) -> InputError:
    """NaN/Inf in the inputs (per file and tensor), and NaN/Inf that the merge
    made from finite inputs (per output tensor): one error."""
    hint = "(set inputs.allow_nonfinite: true to merge anyway)"
    problems = [
        InputProblem(f, t, f"{n} NaN/Inf value(s) {hint}") for (f, t), n in sorted(inputs.items())
    ]
    for name, n in sorted(outputs.items()):
        tp = next(t for t in plan.tensors if t.name == name)
        where = plan.shard_of(name)
        file = os.path.join(plan.config.output.path, where[0] if where else "")
        problems.append(
            InputProblem(
                file,
                name,
                f"{n} NaN/Inf value(s) in the merged {tp.out_dtype} output: the merged values "
                f"overflow {tp.out_dtype} (likely merge.scale or a model's weight too large, "
                "or an output dtype narrower than the values) (set inputs.allow_nonfinite: "
                "true to publish anyway)",
            )
        )
    return InputError(problems)


def record_inputs(state_dir: str, plan: Plan) -> None:
    """Record the input versions this staging is made from (once)."""
    path = os.path.join(state_dir, INPUTS_NAME)
    if not os.path.exists(path):
        _atomic_write(path, json.dumps(input_versions(plan), sort_keys=True).encode())


def refuse_changed_inputs(state_dir: str, plan: Plan, staging: str) -> None:
    """--resume: refuse, naming them, inputs that are not the versions the
    interrupted merge read (the fingerprint alone would only say "changed")."""
    try:
        with open(os.path.join(state_dir, INPUTS_NAME)) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return  # none recorded (an older staging): the fingerprint decides
    if not isinstance(old, dict):
        return
    now = input_versions(plan)
    changed = []
    for key in sorted(set(old) | set(now)):
        a, b = old.get(key), now.get(key)
        if a != b:
            changed.append(f"{printable(key, 500)} ({_what_changed(a, b)})")
    if changed:
        raise OutputError(
            "--resume: the inputs changed since the interrupted merge: "
            + "; ".join(changed[:20])
            + (f"; and {len(changed) - 20} more" if len(changed) > 20 else "")
            + f". Its finished work was read from the old versions and cannot be reused "
            f"(even a file restored to its old bytes and mtime has another ctime): remove "
            f"the staging directory {staging} and rerun"
        )


def _what_changed(a: dict | None, b: dict | None) -> str:
    if a is None:
        return "not an input of the interrupted merge"
    if b is None:
        return "no longer an input"
    if a.get("ino") != b.get("ino"):
        return "replaced by another file"
    if a.get("size") != b.get("size"):
        return f"size {a.get('size')} -> {b.get('size')} bytes"
    if a.get("header_sha256") != b.get("header_sha256"):
        return "its header changed"
    if a.get("mtime_ns") != b.get("mtime_ns"):
        return "modified: mtime changed"
    return "rewritten in place or its metadata changed: ctime moved, size and mtime kept"


def _extra_versions(plan: Plan) -> dict[str, dict]:
    """The files copied into the output beside the weights (config.json, tokenizer):
    inode, size, mtime and ctime, which no rewrite keeps (io/identity.py)."""
    out = {}
    for src in plan.inputs[0].extra_files:
        st = os.stat(src)
        out[src] = {
            "ino": st.st_ino,
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns,
        }
    return out


def inputs_record(plan: Plan) -> dict:
    """What the output is made from, in its merge_report.json (covered by the manifest):
    the plan fingerprint (the config, every input file's version: local files by inode,
    size, mtime, ctime and header digest, Hub files by commit; the layout; the tadmerge
    version) and, per input, its source, revision (a Hub commit) and file versions.
    `--if-changed` compares it; people read which inputs and revisions made an output."""
    files = input_versions(plan)
    return {
        "plan_fingerprint": plan.fingerprint,
        "checkpoints": [
            {
                "source": ck.source,
                "revision": ck.revision,
                "files": {
                    k: v
                    for k, v in files.items()
                    if k in ck.files or (ck.revision and k.startswith(f"{ck.source}@"))
                },
            }
            for ck in plan.inputs
        ],
        "extra_files": _extra_versions(plan),
    }


def changed_since(plan: Plan) -> str | None:
    """--if-changed: None when the published output at output.path was made from these
    inputs and this config (its merge_report.json, checked against its manifest, records
    the same fingerprint and extra files), else why a merge is needed. Reads headers
    (done by the plan already) and the output's manifest and report, no tensor data."""
    out = plan.config.output.path
    if not os.path.lexists(out):
        return f"no output at {out} yet"
    from ..io.publish import MANIFEST_NAME, _read_manifest

    doc = _read_manifest(out)
    if doc is None:
        return f"{out} has no tadmerge {MANIFEST_NAME}"
    entry = next(
        (e for e in doc["files"] if isinstance(e, dict) and e.get("path") == REPORT_NAME), None
    )
    path = os.path.join(out, REPORT_NAME)
    try:
        with open(path, "rb") as f:
            data = f.read(64 * 2**20)
        old = json.loads(data)
    except (OSError, ValueError):
        return f"{path} is missing or unreadable"
    import hashlib

    if entry is None or entry.get("sha256") != hashlib.sha256(data).hexdigest():
        return f"{path} does not match the output's {MANIFEST_NAME}"
    rec = old.get("inputs") if isinstance(old, dict) else None
    if not isinstance(rec, dict) or old.get("plan_fingerprint") != plan.fingerprint:
        return _what_differs(rec, plan)
    if rec.get("extra_files") != _extra_versions(plan):
        return "a file copied beside the weights (config, tokenizer) changed"
    return None


def _what_differs(rec: dict | None, plan: Plan) -> str:
    """A short why for a changed fingerprint: the input files that changed, else the
    config or tadmerge."""
    if not isinstance(rec, dict) or not isinstance(rec.get("checkpoints"), list):
        return "the output does not record its inputs (made by an older tadmerge)"
    old: dict = {}
    for ck in rec["checkpoints"]:
        if isinstance(ck, dict) and isinstance(ck.get("files"), dict):
            old.update(ck["files"])
    now = input_versions(plan)

    def what(a: dict | None, b: dict | None) -> str:
        if a is None:
            return "a new input"
        return "no longer an input" if b is None else _what_changed(a, b)

    changed = [
        f"{printable(k, 200)} ({what(old.get(k), now.get(k))})"
        for k in sorted(set(old) | set(now))
        if old.get(k) != now.get(k)
    ]
    if changed:
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        return f"{len(changed)} input file(s) changed: " + "; ".join(changed[:5]) + more
    return "the config or the tadmerge version changed"


def check_inputs_unchanged(plan: Plan) -> None:
    """Re-stat every input and re-read its header (io/identity.recheck): an input
    that is not the version planned with fails the merge, naming every such file,
    before anything is published."""
    problems = [
        changed_problem(path, None, why)
        for path, ident in sorted(plan.identities.items())
        if (why := recheck(ident)) is not None
    ]
    if problems:
        raise InputChangedError(problems)


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

    def counted_map(label: str, items: list, on_result) -> None:
        reads["stats_rounds"] += 1
        reads.setdefault("round_kinds", []).append(label)
        reads["stats_read_bytes"] += sum(unit_bytes(plan, u) for u, _ in items)
        t_round = time.monotonic()
        executor.map_stats(label, items, on_result)
        reads.setdefault("round_seconds", []).append(round(time.monotonic() - t_round, 3))

    from .stats import run_stats_stage

    resolved = run_stats_stage(plan, counted_map)
    # one short line whatever the number of rounds: each round's kind and time are
    # in merge_report.json (reads.round_kinds, reads.round_seconds)
    log.info(
        "statistics stage done in %.1fs: %d round(s), read %.2f of the inputs again "
        "(per round: %s reads)",
        time.monotonic() - t,
        reads["stats_rounds"],
        reads["stats_read_bytes"] / max(1, plan.input_bytes),
        REPORT_NAME,
    )
    return resolved


def _log_casts(plan: Plan) -> None:
    from ..planners.inventory import casts

    for name, groups in casts(plan.config, plan.inputs).items():
        what = ", ".join(f"{g['tensors']} from {g['from']} to {g['to']}" for g in groups)
        log.info("model '%s': tensors widened with the base's: %s", name, what)


def _prepare_outputs(plan: Plan, staging: str) -> list[str]:
    """Create the output files (keeping those of a resumed merge that still have
    their layout); returns those (re)created empty, relative to staging."""
    rebuilt = create_shard_files(staging, plan.shards)
    for name, shards in plan.task_shards.items():
        d = os.path.join(staging, TASKS_DIR, name)
        os.makedirs(d, exist_ok=True)
        rebuilt += [f"{TASKS_DIR}/{name}/{f}" for f in create_shard_files(d, shards)]
    if plan.is_emr:
        from ..emr.store import MaskStore

        root = os.path.join(staging, MASKS_DIR)
        arrays = [(t.index, t.name, t.shape, t.rng_rows) for t in plan.tensors if t.kind == MERGE]
        try:
            MaskStore.create(root, plan.config.task_names, arrays)
        except OSError:
            raise
        except Exception as exc:  # zarr metadata damaged by a crash: start the store anew
            log.warning("mask store %s unreadable (%s); recreating it", root, exc)
            shutil.rmtree(root, ignore_errors=True)
            MaskStore.create(root, plan.config.task_names, arrays)  # units: checksums fail
    return rebuilt


def _write_json(path: str, doc: dict) -> None:
    with writing(path), open(path, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=False, default=_json_default)
        f.write("\n")


def _json_default(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    raise TypeError(type(v))


def _finalize(
    plan: Plan,
    staging: str,
    done: dict[int, UnitRecord],
    resolved: dict,
    reused: int,
    executor,
    base_pin=None,
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
    from ..io.model_files import CARD_NAME, model_card, side_files

    for name, src in side_files(plan):  # (config.json: made to agree with the output)
        dest = os.path.join(staging, name)
        if isinstance(src, bytes):
            _atomic_write(dest, src)
            continue
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
    from ..planners.inventory import casts, vocab_trims

    cast = casts(cfg, plan.inputs)
    if cast:  # fine-tunes saved in another float dtype than the base's
        report["casts"] = cast
    trims = vocab_trims(cfg, plan.inputs)
    if trims:  # added tokens: rows beyond the base's vocabulary, dropped
        report["vocabulary"] = {"source": "base", "dropped": trims}
    glob = resolved.get("_global")
    if glob:
        report["global"] = {cfg.task_names[int(k)]: v for k, v in glob.get("groups", {}).items()}
    if plan.is_emr:
        report["emr"] = emr
        pins = base_pin.result() if base_pin is not None else None
        _write_json(os.path.join(staging, EMR_NAME), _emr_doc(plan, emr, pins))
    _atomic_write(os.path.join(staging, CARD_NAME), model_card(plan, report))
    return report


def _emr_doc(plan: Plan, emr: dict, base_pins: list[dict] | None = None) -> dict:
    """emr.json. `base_pins` (emr/pin.py): size and header and content SHA-256 of
    every base file, checked when the output is read (the base is not copied)."""
    base = plan.inputs[0]
    cfg = plan.config
    pinned = {"source": cfg.base, "root": base.root, "revision": base.revision}
    if base_pins is not None:
        pinned["files"] = base_pins
    return {
        "format": "tadmerge-emr/1",
        "tasks": cfg.task_names,
        "rescalers": emr["rescalers"],
        "base": pinned,
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
