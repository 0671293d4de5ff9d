"""The same merge locally and on Ray with 1 and 2 workers: wall, peak RSS, bytes/s.

    python benchmarks/ray_workers.py --params 100M --tasks 3

Generates (once) base + K bf16 fine-tunes with make_checkpoints.py, then runs
TIES + TADrop with each executor in one process (a local Ray session with as
many CPUs as the machine has), measuring each merge's wall time and its
driver's and workers' peak RSS (reported by the merge itself: the driver's
ru_maxrss and each actor's). Checks that every run wrote the same model bytes.
Writes benchmarks/results/ray_workers.json.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info, write_result

ROOT = Path(__file__).resolve().parents[1]


def digest(out: str) -> str:
    h = hashlib.sha256()
    for f in sorted(os.listdir(out)):
        if f.endswith(".safetensors"):
            with open(os.path.join(out, f), "rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)
    return h.hexdigest()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="100M")
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--budget", default="1GB")
    ap.add_argument("--data", default="/work/bench-data")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    ckpt = Path(args.data) / f"ray-{args.params}-k{args.tasks}-bf16"
    if not (ckpt / "base").exists():
        subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "make_checkpoints.py"), "--params",
             args.params, "--tasks", str(args.tasks), "--dtype", "bf16", "--out", str(ckpt),
             "--quiet"],
            check=True,
        )  # fmt: skip
    import ray

    from tadmerge.config import parse_config
    from tadmerge.run.driver import run_merge

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    rows = []
    for executor, workers in (("local", 1), ("local", 2), ("ray", 1), ("ray", 2)):
        out = str(ckpt / f"out-{executor}-{workers}")
        cfg = parse_config(
            {
                "base": str(ckpt / "base"),
                "models": [
                    {"path": str(ckpt / f"ft_{i + 1}"), "name": f"t{i + 1}"}
                    for i in range(args.tasks)
                ],
                "sparsify": {"method": "tadrop"},
                "merge": {"method": "ties"},
                "output": {"path": out},
                "runtime": {
                    "executor": executor,
                    "workers": workers,
                    "memory_budget": args.budget,
                    "device": args.device,
                    "progress": "none",
                },
            }
        )
        t0 = time.perf_counter()
        res = run_merge(cfg, overwrite=os.path.exists(out))
        wall = time.perf_counter() - t0
        rep = res.report
        rows.append(
            {
                "executor": executor,
                "workers": workers,
                "wall_s": wall,
                "merge_total_s": rep["timings"]["total_s"],
                "input_bytes": rep["input_bytes"],
                "bytes_per_s": rep["input_bytes"] / wall,
                "driver_peak_rss_bytes": rep["peak_rss_bytes"],
                "worker_peak_rss_bytes": rep.get("peak_rss_workers_bytes", []),
                "model_sha256": digest(res.output),
            }
        )
        print(f"{executor:5s} x{workers}: {wall:6.1f}s  {rows[-1]['bytes_per_s'] / 1e6:7.1f} MB/s "
              f"driver RSS {rep['peak_rss_bytes'] / 2**20:.0f} MiB  workers "
              f"{[round(x / 2**20) for x in rows[-1]['worker_peak_rss_bytes']]} MiB")  # fmt: skip
    ray.shutdown()
    same = len({r["model_sha256"] for r in rows}) == 1
    print("identical model bytes across executors:", same)
    path = write_result(
        "ray_workers",
        {"machine": machine_info(), "params": args.params, "tasks": args.tasks,
         "budget": args.budget, "identical_bytes": same, "rows": rows},
    )  # fmt: skip
    print(f"wrote {path}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
