"""The output's files besides the units' bytes: laid out before, completed after.

Before any unit runs, `prepare_outputs` creates the shard files at their planned
sizes (keeping those of a resumed merge that still have their layout), EMR's
per-task shards and mask store, and `start_digests` starts hashing the shards
as units write them (io/digest.py). Once every unit is final, `finalize` writes
the rest: the index JSON, the base's side files, the config, the report's
figures (report/figures.py), EMR's emr.json and the model card; the driver adds
the run's own facts (timings, reads, executor) and `write_report` writes
merge_report.json. Publishing is io/publish.py's.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

from .. import __version__
from ..cluster.worker import MASKS_DIR, TASKS_DIR, UnitRecord
from ..errors import MergeRuntimeError
from ..io.block_io import create_shard_files, index_json
from ..io.checkpoint import INDEX_NAME
from ..io.digest import StreamingDigests
from ..io.model_files import CARD_NAME, CONFIG_NAME, EMR_NAME, REPORT_NAME, model_card, side_files
from ..io.publish import STATE_DIR
from ..planners.inventory import MERGE, casts, vocabulary_report
from ..planners.plan import Plan
from ..report.figures import tensor_report
from .files import _json_default, atomic_write, dumps_indented, write_json, writing

log = logging.getLogger("tadmerge")


def prepare_outputs(plan: Plan, staging: str) -> list[str]:
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


def start_digests(plan: Plan, staging: str) -> StreamingDigests:
    """Hash the output shards as they are written (io/digest.py); headers are final."""
    digests = StreamingDigests(staging, {s.filename: s.file_size for s in plan.shards})
    for s in plan.shards:
        digests.final(s.filename, 0, s.file_size - s.data_size)  # (its header)
    return digests


def finalize(
    plan: Plan,
    staging: str,
    done: dict[int, UnitRecord],
    resolved: dict,
    reused: int,
    base_pin=None,
) -> dict:
    """Write every file of the output but the report, whose data it returns.
    `base_pin`: EMR's emr/pin.BasePinner, hashing the base beside the merge."""
    cfg = plan.config
    missing = [u.id for u in plan.units if u.id not in done]
    if missing:
        raise MergeRuntimeError(f"{len(missing)} unit(s) did not finish: {missing[:10]}")
    if len(plan.shards) > 1:
        atomic_write(os.path.join(staging, INDEX_NAME), index_json(plan.shards))
    for name, shards in plan.task_shards.items():
        if len(shards) > 1:
            atomic_write(os.path.join(staging, TASKS_DIR, name, INDEX_NAME), index_json(shards))
    for name, src in side_files(plan):  # (config.json: made to agree with the output)
        dest = os.path.join(staging, name)
        if isinstance(src, bytes):
            atomic_write(dest, src)
            continue
        with writing(dest):
            shutil.copyfile(src, dest)
    atomic_write(os.path.join(staging, CONFIG_NAME), cfg.to_yaml().encode())
    log_path = os.path.join(staging, STATE_DIR, "units.jsonl")
    tensors, emr = tensor_report(plan, done, resolved, log_path)
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
    cast = casts(cfg, plan.inputs)
    if cast:  # fine-tunes saved in another float dtype than the base's
        report["casts"] = cast
    vocabulary = vocabulary_report(cfg, plan.inputs)
    if vocabulary:  # added tokens: dropped (tokenizer: base), or the output's vocabulary
        report["vocabulary"] = vocabulary
    glob = resolved.get("_global")
    if glob:
        report["global"] = {cfg.task_names[int(k)]: v for k, v in glob.get("groups", {}).items()}
    if plan.is_emr:
        report["emr"] = emr
        pins = base_pin.result() if base_pin is not None else None
        write_json(os.path.join(staging, EMR_NAME), emr_doc(plan, emr, pins))
    atomic_write(os.path.join(staging, CARD_NAME), model_card(plan, report))
    return report


def write_report(staging: str, report: dict) -> None:
    """merge_report.json; a tensors section that is not a dict (report/figures.py
    TensorSection: a plan with groups) is written entry by entry, with the text
    json.dump gives the whole document (indent 1)."""
    tensors = report.get("tensors")
    if isinstance(tensors, dict) or tensors is None:
        write_json(os.path.join(staging, REPORT_NAME), report)
        return
    path = os.path.join(staging, REPORT_NAME)
    text = json.dumps({**report, "tensors": _TENSORS}, indent=1, default=_json_default)
    head, tail = text.split(json.dumps(_TENSORS), 1)
    with writing(path), open(path, "w") as f:
        f.write(head)
        first = True
        for name, entry in tensors.items():
            body = dumps_indented(entry, 2)
            f.write(("{" if first else ",") + "\n  " + json.dumps(name) + ": " + body)
            first = False
        f.write("{}" if first else "\n }")
        f.write(tail)
        f.write("\n")


_TENSORS = "\x00tensors\x00"  # a placeholder no report value holds


def emr_doc(plan: Plan, emr: dict, base_pins: list[dict] | None = None) -> dict:
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
