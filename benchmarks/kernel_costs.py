"""Per-element costs of the engine's inner passes, on one real tensor of a set.

    python benchmarks/kernel_costs.py [--data DIR] [--tensor NAME] [--tasks 3]

The docs quote these figures. This script measures them on one tensor of a
checkpoint set made by make_checkpoints.py, with one torch thread and medians
of several runs:
- task arithmetic of one block: merge_block's float32 path (widen K+1 blocks,
  then whole-block passes: the torch reference) against the streamed merge
  (engine/stream.py: the C stream kernel);
- the statistics of one task vector: the coarse pass with exact moments plus
  the fine pass of three buckets, against one counting pass that sets the
  keys with low bits aside (kernels.coarse_sparse) and the fine histograms
  made from those keys (histogram.KeysAside);
- task arithmetic + TADrop of one block that resolves its own selection:
  merge_block's float32 path (widen, τ in place, count, resolve, cut, combine)
  against the raw bf16 path (engine/raw.py), with the raw path's three kernels
  timed alone (counting, a full tie scan, cut + combine);
- TIES (with its magnitude trim) and EMR of one block: merge_block with the C
  kernels against the torch reference (runtime.kernels: torch);
- the report's ‖τ‖ as a float32 pass (block.square_sum) against the exact value;
- the exit of a process after a task arithmetic merge of the set: Python's
  normal exit against cli.exit_now (os._exit).
Results: benchmarks/results/kernel_costs.json.
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import yaml

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import DEFAULT_DATA, tool_env, write_result
from benchmarks.configs import tadmerge_config
from tadmerge import methods
from tadmerge.engine import kernels, native
from tadmerge.engine.block import BlockContext, MergeSpec, merge_block, square_sum
from tadmerge.engine.exact import coarse_stats
from tadmerge.engine.histogram import SQ_SCALE_BITS, KeysAside, RankIndex, scaled_to_float
from tadmerge.engine.keys import SparseKeys, magnitude_keys
from tadmerge.engine.raw import merge_raw_sparse
from tadmerge.engine.selection import own_norms, resolve_selection, run_locally
from tadmerge.engine.spec import SparsifySpec
from tadmerge.engine.stream import merge_raw
from tadmerge.io.block_io import read_rows
from tadmerge.io.checkpoint import open_checkpoint


def median_s(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def load(path: Path, name: str) -> torch.Tensor:
    entry = open_checkpoint(str(path)).tensors[name]
    return read_rows(entry, 0, entry.rows)


_EXIT_CHILD = """
import sys, time
from tadmerge import cli
code = cli.main(["-q", "merge", sys.argv[1], "--overwrite"])
print(repr(time.time()), file=sys.stderr, flush=True)
if sys.argv[2] == "fast":
    cli.exit_now(code)
sys.exit(code)
"""


def exit_cost(data: Path, tasks: int, reps: int) -> dict:
    """Seconds from the end of a task arithmetic merge's main() to the process's
    end, with Python's normal exit and with cli.exit_now (os._exit)."""
    work = Path(tempfile.mkdtemp(prefix="kernel_costs_"))
    try:
        fts = [data / f"ft_{k}" for k in range(1, tasks + 1)]
        cfg = tadmerge_config("task_arithmetic", data / "base", fts, work / "out")
        cfg_path = work / "ta.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        out: dict = {}
        for mode in ("normal", "fast"):
            times = []
            for _ in range(reps):
                r = subprocess.run(
                    [sys.executable, "-c", _EXIT_CHILD, str(cfg_path), mode],
                    check=True, env=tool_env(), capture_output=True, text=True,
                )  # fmt: skip
                times.append(time.time() - float(r.stderr.strip().splitlines()[-1]))
            out[f"{mode}_exit_s"] = statistics.median(times)
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


# the compiled backend (the results keep a level per implementation, as when
# numba's kernels were timed beside the C ones)
IMPLEMENTATIONS = {"c": "c"}


def _raw_costs(np_raws, np_out, td, ctx, reps: int, per: int) -> tuple[float, dict] | None:
    """ns per element and task of the raw TA + TADrop path (engine/raw.py) and
    of each of its kernels, with the kernels the backend takes; None when the
    block's keys are not sparse."""
    n = np_raws[0].size
    stats = merge_raw_sparse(np_raws[0], np_raws[1:], np_out, td, ctx)
    if stats is None:
        return None
    whole = median_s(lambda: merge_raw_sparse(np_raws[0], np_raws[1:], np_out, td, ctx), reps)
    cuts = [(st.selection.lo.key, 0, st.selection.hi.key, 0, st.selection.scale) for st in stats]
    base, tasks = np_raws[0], np_raws[1:]
    w = [1.0] * len(tasks)
    kernel_ns = {
        "coarse_sparse_raw": lambda: [kernels.coarse_sparse_raw(base, m) for m in tasks],
        "tie_end_raw_full_scan": lambda: [
            kernels.tie_end_raw(np_raws[0], m, 1, n + 1) for m in np_raws[1:]
        ],
        "cut_combine_raw": lambda: kernels.cut_combine_raw(
            np_raws[0], np_raws[1:], cuts, w, 0.3, False, np_out
        ),
    }
    return whole / per * 1e9, {k: median_s(fn, reps) / per * 1e9 for k, fn in kernel_ns.items()}


def _resolver_ms(np_raws, sp: SparsifySpec, reps: int) -> float | None:
    """ms per task of what the raw path does in Python and numpy between its
    counting pass and its cut (engine/raw.py): the exact moments of the keys
    set aside, the rank index, the selection and the report's norms. A fixed
    cost per tensor and task, serialised by the GIL across the workers."""
    base, n = np_raws[0], np_raws[0].size
    counted = [kernels.coarse_sparse_raw(base, m) for m in np_raws[1:]]
    if any(c is None for c in counted):
        return None

    def resolve():
        for got in counted:
            keys = SparseKeys(n, *got)
            index = RankIndex(coarse_stats(keys, moments=2))
            own_norms(index, run_locally(resolve_selection(index, sp, None), keys, index))

    return median_s(resolve, reps) / len(counted) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA / "llama-271M-k8-bf16")
    ap.add_argument("--tensor", default="model.layers.3.mlp.down_proj.weight")
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args()
    torch.set_num_threads(1)
    if not native.available():
        sys.exit("kernel_costs: the C kernels cannot be built here (no C compiler?)")

    raws = [load(a.data / "base", a.tensor)]
    raws += [load(a.data / f"ft_{k}", a.tensor) for k in range(1, a.tasks + 1)]
    n, k_tasks = raws[0].numel(), a.tasks
    per = n * k_tasks

    # 1. task arithmetic of one block
    ta = MergeSpec(SparsifySpec(method="none"), "task_arithmetic", 0.3, weights=(1.0,) * k_tasks)
    ctx = BlockContext(tensor=a.tensor, shape=(n,), row_start=0, row_end=n, rng_rows=n, whole=True)
    blocks = [torch.empty(n) for _ in raws]
    out = torch.empty(n, dtype=raws[0].dtype)

    def block_path():
        for blk, raw in zip(blocks, raws, strict=True):
            blk.copy_(raw)
        out.copy_(merge_block(blocks[0], blocks[1:], ta, ctx).merged)

    ta_block = median_s(block_path, a.reps) / per * 1e9
    # the streamed merge works on numpy arrays (bf16: its bit patterns)
    np_raws = [r.view(torch.int16).numpy().view(np.uint16) for r in raws]
    np_out = np.empty(n, np.uint16)
    ta_kernel = {}
    for impl in IMPLEMENTATIONS:  # (the stream kernel is C: no backend to pass)
        ta_kernel[impl] = median_s(
            lambda: merge_raw(np_raws[0], np_raws[1:], np_out, ta), a.reps
        ) / per * 1e9  # fmt: skip

    # 2. the statistics of one task vector
    tau = raws[1].float() - raws[0].float()
    keys = magnitude_keys(tau)
    order = torch.sort(keys).values
    wanted = sorted({int(order[int(q * (n - 1))]) >> 16 for q in (0.3, 0.5, 0.95)})
    low_share = float(((keys & 0xFFFF) != 0).double().mean())

    def binned():
        list(kernels.coarse_pieces(tau, 2))
        kernels.fine_histogram_rows(tau, wanted)

    def counted():
        counts, side = kernels.coarse_sparse(tau)
        if side.size:
            list(kernels.coarse_pieces(side, 2))
        aside = KeysAside.from_counts(counts, side, only=wanted)
        for b in wanted:
            aside.fine(b)

    sparse = kernels.coarse_sparse(tau) is not None
    stats_binned = median_s(binned, a.reps) / n * 1e9
    stats_counted = median_s(counted, a.reps) / n * 1e9 if sparse else None

    # 3. task arithmetic + TADrop of one whole block
    # the config's rescale for tadrop (l2): the exact moments are part of the cost
    rescale = methods.sparsifier("tadrop").param("rescale").default
    sp = SparsifySpec(method="tadrop", rescale=rescale)
    td = MergeSpec(sp, "task_arithmetic", 0.3, weights=(1.0,) * k_tasks)

    def tadrop_block():
        for blk, raw in zip(blocks, raws, strict=True):
            blk.copy_(raw)
        out.copy_(merge_block(blocks[0], blocks[1:], td, ctx).merged)

    tadrop: dict = {"merge_block": median_s(tadrop_block, a.reps) / per * 1e9}
    if raws[0].dtype == torch.bfloat16:  # (the raw path takes numpy arrays of the patterns)
        for impl, backend in IMPLEMENTATIONS.items():
            got = _raw_costs(np_raws, np_out, td, replace(ctx, backend=backend), a.reps, per)
            if got is not None:
                tadrop.setdefault("raw", {})[impl] = got[0]
                tadrop.setdefault("raw_kernels", {})[impl] = got[1]
        tadrop["resolver_ms_per_task"] = _resolver_ms(np_raws, sp, a.reps)

    # 4. TIES (trimmed to the default density) and EMR of one whole block
    def block_of(spec: MergeSpec, backend: str):
        on = replace(ctx, backend=backend)

        def run():
            for blk, raw in zip(blocks, raws, strict=True):
                blk.copy_(raw)
            merge_block(blocks[0], blocks[1:], spec, on)

        return run

    trim = SparsifySpec(method="magnitude")
    combiners = {
        "ties": MergeSpec(trim, "ties", 1.0, weights=(1.0,) * k_tasks),
        "emr": MergeSpec(SparsifySpec(method="none"), "emr", weights=(1.0,) * k_tasks),
    }
    combined: dict = {}
    for name, spec in combiners.items():
        for impl, backend in (*IMPLEMENTATIONS.items(), ("torch", "torch")):
            got = median_s(block_of(spec, backend), a.reps) / per * 1e9
            combined.setdefault(name, {})[impl] = got

    # 5. the report's norm
    exact = math.sqrt(scaled_to_float(coarse_stats(tau, moments=2).total(2), SQ_SCALE_BITS))
    approx = math.sqrt(square_sum(tau))

    result = {
        "data": str(a.data),
        "tensor": a.tensor,
        "numel": n,
        "tasks": k_tasks,
        "torch_threads": 1,
        "reps": a.reps,
        "task_arithmetic_ns_per_element_task": {
            "merge_block": ta_block,
            "streamed_kernel": ta_kernel,
        },
        "statistics_ns_per_element": {
            "coarse_moments_plus_fine": stats_binned,
            "counting_with_keys_aside": stats_counted,
            "keys_with_low_bits_share": low_share,
            "wanted_buckets": wanted,
        },
        "task_arithmetic_tadrop_ns_per_element_task": tadrop,
        "merge_block_ns_per_element_task": combined,
        "report_norm": {
            "exact": exact,
            "float32_pass": approx,
            "relative_error": abs(approx - exact) / exact if exact else 0.0,
        },
        "exit": exit_cost(a.data, k_tasks, min(a.reps, 3)),
    }
    path = write_result("kernel_costs", result)
    kernel_s = ", ".join(f"{impl} {v:.2f}" for impl, v in ta_kernel.items())
    print(f"task arithmetic: merge_block {ta_block:.2f} ns, streamed ({kernel_s}) ns "
          "per element and task")  # fmt: skip
    print(f"statistics: coarse + fine {stats_binned:.2f} ns, counting with keys aside "
          f"{stats_counted if stats_counted is None else round(stats_counted, 2)} ns per "
          f"element ({low_share:.2%} of keys have low bits)")  # fmt: skip
    for impl, ns in tadrop.get("raw", {}).items():
        parts = ", ".join(f"{k} {v:.2f}" for k, v in tadrop["raw_kernels"][impl].items())
        print(f"task arithmetic + TADrop ({impl}): raw path {ns:.2f} ns per element and task "
              f"(merge_block {tadrop['merge_block']:.2f}); its kernels: {parts}")  # fmt: skip
    if tadrop.get("resolver_ms_per_task") is not None:
        print(f"task arithmetic + TADrop: {tadrop['resolver_ms_per_task']:.2f} ms per task "
              "in Python and numpy between counting and cut")  # fmt: skip
    for name, by in combined.items():
        parts = ", ".join(f"{impl} {v:.2f}" for impl, v in by.items())
        print(f"{name} of one block (merge_block): {parts} ns per element and task")
    print(f"report norm: float32 pass off by {result['report_norm']['relative_error']:.1e}")
    ex = result["exit"]
    print(f"exit after a merge: {ex['normal_exit_s']:.2f} s normal, "
          f"{ex['fast_exit_s']:.2f} s exit_now")  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
