"""What reading a unit's inputs costs: copied out of the page cache, or mapped.

    python benchmarks/io_map.py [--data DIR] [--layers 3,4] [--tasks 4] [--reps 5]

The streamed and raw bf16 merges take each unit's K+1 input blocks either
with `preadv` into a buffer (block_io.read_bytes: one copy, kernel -> process)
or as a map of the page cache (block_io.map_bytes: no copy, populated at once,
unmapped with the unit). This script reads the matrices of a few layers of a
set made by make_checkpoints.py, warm (the files are read once first), one
thread, both ways, and runs on each block:
- nothing (the read alone);
- task arithmetic's stream kernel (kernels.stream_raw, in C: one pass per task);
- TADrop's counting kernel (kernels.coarse_sparse_raw, once per task).
Figures are nanoseconds per element and task, medians of --reps runs over all
the layers' matrices; read and kernel together, since a kernel that reads a
map pays for the page-cache misses the copy paid before.
Results: benchmarks/results/io_map.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import DEFAULT_DATA, warm_cache, write_result
from tadmerge.engine import kernels
from tadmerge.io.block_io import map_bytes, read_bytes
from tadmerge.io.checkpoint import open_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA / "llama-1B-k4-bf16")
    ap.add_argument("--layers", default="3,4")
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    if not kernels.load():
        sys.exit("io_map: the C kernels cannot be built here (no C compiler?)")
    models = [a.data / "base"] + [a.data / f"ft_{k}" for k in range(1, a.tasks + 1)]
    ckpts = [open_checkpoint(str(m)) for m in models]
    layers = [f"model.layers.{i}." for i in a.layers.split(",")]
    names = [
        n
        for n, e in sorted(ckpts[0].tensors.items())
        if any(n.startswith(p) for p in layers) and len(e.shape) == 2
    ]
    entries = [[c.tensors[n] for c in ckpts] for n in names]
    if not entries:
        sys.exit(f"io_map: no matrices of layers {a.layers} in {a.data}")
    warm_cache(models)
    largest = max(e.nbytes for row in entries for e in row)
    bufs = [np.empty(largest, np.uint8) for _ in models]
    out = np.empty(largest // 2, np.uint16)
    weights = [1.0] * a.tasks

    def blocks(row, how: str) -> list[np.ndarray]:
        if how == "map":
            got = [map_bytes(e, 0, e.rows) for e in row]
            if any(g is None for g in got):
                sys.exit("io_map: map_bytes declined a block (small, misaligned or no populate)")
            return [g.view(np.uint16) for g in got]
        return [read_bytes(e, 0, e.rows, b).view(np.uint16) for e, b in zip(row, bufs, strict=True)]

    def read_only(raws):
        pass

    def stream(raws):
        kernels.stream_raw(raws[0], raws[1:], weights, 0.3, False, out[: raws[0].size])

    def count(raws):
        for t in raws[1:]:
            kernels.coarse_sparse_raw(raws[0], t)

    elems = sum(row[0].numel for row in entries) * a.tasks
    results: dict = {}
    for label, fn in (("read_only", read_only), ("stream_raw", stream), ("count", count)):
        for how in ("pread", "map"):
            times = []
            for _ in range(a.reps):
                t0 = time.perf_counter()
                for row in entries:
                    fn(blocks(row, how))
                times.append(time.perf_counter() - t0)
            results[f"{label}_{how}_ns"] = statistics.median(times) / elems * 1e9
            print(f"[io_map] {label:10s} {how:5s} {results[f'{label}_{how}_ns']:.3f} ns/elem-task")
    path = write_result(
        "io_map",
        {
            "dataset": str(a.data),
            "tensors": names,
            "tasks": a.tasks,
            "reps": a.reps,
            "elements_x_tasks": elems,
            "ns_per_element_task": results,
        },
    )
    print(f"[io_map] wrote {path}")


if __name__ == "__main__":
    main()
