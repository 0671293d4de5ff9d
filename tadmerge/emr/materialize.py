"""Write one EMR task's full model in Hugging Face layout, out-of-core.

Row blocks sized by a memory budget are computed with the same function as the
in-memory API (artifacts.EmrOutput.task_rows) and written at offsets fixed in
advance, into a staging directory published atomically with a manifest.

An interrupted materialize leaves its staging directory; the rerun then needs
`--resume` (tensors already written, listed in the staging's `.tadmerge/` log
under the same key, are kept; the rest is written) or `--overwrite` (the staging
is emptied and everything written again). Either way the published bytes are
those of an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil

from ..config import parse_size
from ..errors import OutputError
from ..io.block_io import (
    OutputTensor,
    close_all,
    create_shard_files,
    index_json,
    layout_shards,
    write_at,
)
from ..io.model_files import EMR_NAME, untied_config
from ..io.publish import STATE_DIR, Staging
from .artifacts import open_emr

log = logging.getLogger("tadmerge")
_KEY_NAME = "materialize.key"
_DONE_NAME = "materialize.done"


def staging_path(to: str) -> str:
    """The staging directory Staging(to) uses (io/publish.py)."""
    out = os.path.abspath(os.path.expanduser(to))
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.tadmerge-staging")


def _open_staging(to: str, overwrite: bool, resume: bool) -> Staging:
    left = staging_path(to)
    if not os.path.lexists(left):
        # (--resume with nothing to resume starts afresh: there is nothing to lose)
        return Staging(to, overwrite=overwrite)
    if not (resume or overwrite):
        raise OutputError(
            f"an interrupted materialize left {left}; rerun with --resume to finish it or "
            "--overwrite to start again"
        )
    staging = Staging(to, overwrite=overwrite, resume=True)
    if not resume:  # --overwrite: what the interrupted run wrote is discarded
        _empty(staging.path)
    return staging


def _empty(path: str) -> None:
    """What an interrupted run wrote (its lock, held by this run now, stays)."""
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if name == STATE_DIR:
            for log_name in (_KEY_NAME, _DONE_NAME):
                if os.path.exists(os.path.join(full, log_name)):
                    os.remove(os.path.join(full, log_name))
            continue
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full)
        else:
            os.remove(full)


def _run_key(path: str, task: str, shards, budget: int) -> str:
    """What decides the bytes written: emr.json (rescalers, base pins), the task, the
    layout and the row blocks (from the budget)."""
    with open(os.path.join(path, EMR_NAME), "rb") as f:
        doc = f.read()
    h = hashlib.sha256(doc)
    h.update(json.dumps([os.path.abspath(path), task, budget]).encode())
    for s in shards:
        h.update(s.header)
    return h.hexdigest()


def _done_log(staging: str, key: str, resume: bool) -> tuple[set[str], str]:
    """Tensors already written under this key (resume), and the log's path."""
    state = os.path.join(staging, STATE_DIR)
    os.makedirs(state, exist_ok=True)
    key_path, done_path = os.path.join(state, _KEY_NAME), os.path.join(state, _DONE_NAME)
    done: set[str] = set()
    old = None
    if resume and os.path.exists(key_path):
        with open(key_path) as f:
            old = f.read().strip()
    if old == key and os.path.exists(done_path):
        with open(done_path, encoding="utf-8") as f:
            for line in f:
                if line.endswith("\n"):  # a line cut short by the kill: redone
                    done.add(json.loads(line))
    else:
        if old is not None:
            log.info("materialize --resume: another output/task/budget; starting again")
        with open(done_path, "w"):
            pass
        with open(key_path, "w") as f:
            f.write(key)
    return done, done_path


def materialize(
    path: str,
    task: str,
    to: str,
    *,
    overwrite: bool = False,
    resume: bool = False,
    memory_budget: str | int = "1GB",
    shard_size: int = 5 * 10**9,
    verify_base: bool = True,
) -> str:
    """Write task `task` of the EMR output `path` as a full checkpoint at `to`.

    `verify_base` (default): check the whole base against emr.json's SHA-256 pins
    first (a read of the base, which materialize reads whole anyway).
    """
    emr = open_emr(path, verify_base=verify_base)
    emr.task_index(task)
    budget = parse_size(memory_budget, "--memory-budget")
    excluded = emr.excluded(task)
    tensors = []
    for name in emr.tensor_names():
        e = emr.base.tensors[name]
        tensors.append(OutputTensor(name, e.dtype, tuple(e.shape)))
    shards = layout_shards(tensors, shard_size, {"tadmerge_emr_task": task})
    staging = _open_staging(to, overwrite, resume)
    done, done_path = _done_log(staging.path, _run_key(path, task, shards, budget), resume)
    create_shard_files(staging.path, shards)
    with open(done_path, "a", encoding="utf-8") as log_file:
        for shard in shards:
            for t in shard.tensors:
                if t.name in done:
                    continue
                _write_tensor(emr, task, t, shard, staging.path, budget, excluded)
                log_file.write(json.dumps(t.name) + "\n")
                log_file.flush()
    if len(shards) > 1:
        with open(os.path.join(staging.path, "model.safetensors.index.json"), "wb") as f:
            f.write(index_json(shards))
    untied = untied_config(emr.base) if emr.base.aliases else None  # (a tied base's head)
    for src in emr.base.extra_files:
        dest = os.path.join(staging.path, os.path.basename(src))
        if untied is not None and os.path.basename(src) == "config.json":
            with open(dest, "wb") as f:
                f.write(untied)
        else:
            shutil.copyfile(src, dest)
    close_all()
    return staging.publish()  # (the log in STATE_DIR is left out and removed)


def _write_tensor(emr, task, t, shard, staging: str, budget: int, excluded) -> None:
    rows = t.shape[0] if t.shape else 1
    row_numel = math.prod(t.shape[1:]) if len(t.shape) > 1 else 1
    per_row = max(1, row_numel * 24)  # base, delta, mask, output in float32
    step = max(1, budget // per_row)
    info = emr.doc["tensors"][t.name]
    if info["kind"] == "merge":  # whole mask blocks per read
        br = info["block_rows"]
        step = max(br, (step // br) * br)
    itemsize = t.nbytes // max(1, t.numel) if t.numel else 0
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        block = emr.task_rows(task, t.name, r0, r1, excluded)
        write_at(
            os.path.join(staging, shard.filename),
            shard.tensor_offset(t.name) + r0 * row_numel * itemsize,
            block,
        )
