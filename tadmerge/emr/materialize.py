"""Write one EMR task's full model in Hugging Face layout, out-of-core.

Row blocks sized by a memory budget are computed with the same function as the
in-memory API (artifacts.EmrOutput.task_rows) and written at offsets fixed in
advance, into a staging directory published atomically with a manifest.
"""

from __future__ import annotations

import math
import os
import shutil

from ..config import parse_size
from ..io.block_io import OutputTensor, close_all, create_shard_files, index_json, layout_shards
from ..io.publish import Staging
from .artifacts import open_emr


def materialize(
    path: str,
    task: str,
    to: str,
    *,
    overwrite: bool = False,
    memory_budget: str | int = "1GB",
    shard_size: int = 5 * 10**9,
) -> str:
    emr = open_emr(path)
    emr.task_index(task)
    budget = parse_size(memory_budget, "--memory-budget")
    excluded = emr.excluded(task)
    tensors = []
    for name in emr.tensor_names():
        e = emr.base.tensors[name]
        tensors.append(OutputTensor(name, e.dtype, tuple(e.shape)))
    shards = layout_shards(tensors, shard_size, {"tadmerge_emr_task": task})
    staging = Staging(to, overwrite=overwrite)
    create_shard_files(staging.path, shards)
    from ..io.block_io import write_at

    for shard in shards:
        for t in shard.tensors:
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
                    os.path.join(staging.path, shard.filename),
                    shard.tensor_offset(t.name) + r0 * row_numel * itemsize,
                    block,
                )
    if len(shards) > 1:
        with open(os.path.join(staging.path, "model.safetensors.index.json"), "wb") as f:
            f.write(index_json(shards))
    for src in emr.base.extra_files:
        shutil.copyfile(src, os.path.join(staging.path, os.path.basename(src)))
    close_all()
    return staging.publish()
