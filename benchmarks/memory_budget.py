"""Peak RSS of a merge against runtime.memory_budget and against model size.

    python benchmarks/memory_budget.py                 # 4 x ~1 GB checkpoints, budgets 512MB..2GB
    python benchmarks/memory_budget.py --params 100M   # quick version

Generates base + 3 bf16 fine-tunes with benchmarks/make_checkpoints.py (once,
cached under --data), merges them with TIES + TADrop (exact statistics, the
heaviest per-element path) under several budgets, and a half-size model under
the smallest budget, measuring each run from outside (benchmarks/runner.py:
peak RSS of the process tree, private anonymous memory, wall, CPU). Writes
benchmarks/results/memory_budget.json. The claim it checks: peak RSS stays
within the budget plus a fixed overhead (the Python interpreter and torch,
measured as the peak RSS of importing tadmerge and loading its
statistics kernels), whatever the model size.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info, parse_bytes, parse_count, write_result
from benchmarks.runner import measure, to_dict

ROOT = Path(__file__).resolve().parents[1]
# the fixed part of a merge's RSS: interpreter, torch, tadmerge, the statistics kernels
IMPORTS = "import tadmerge.run.driver, torch; from tadmerge.engine import kernels; kernels.load()"


def ensure_checkpoints(data: Path, params: str, tasks: int) -> Path:
    out = data / f"budget-{params}-k{tasks}-bf16"
    if not (out / "base").exists():
        subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "make_checkpoints.py"), "--params", params,
             "--tasks", str(tasks), "--dtype", "bf16", "--out", str(out), "--quiet"],
            check=True,
        )  # fmt: skip
    return out


def config(ckpt: Path, out: Path, budget: str, tasks: int) -> Path:
    cfg = ckpt / f"merge-{out.name}.yaml"
    models = "\n".join(f"  - {{path: {ckpt}/ft_{i + 1}, name: t{i + 1}}}" for i in range(tasks))
    cfg.write_text(
        f"base: {ckpt}/base\nmodels:\n{models}\n"
        "sparsify: {method: tadrop}\nmerge: {method: ties}\n"
        f"output: {{path: {out}}}\n"
        f"runtime: {{memory_budget: {budget}, progress: none}}\n"
    )
    return cfg


def run(ckpt: Path, budget: str, tasks: int, work: Path) -> dict:
    out = work / f"out-{ckpt.name}-{budget}"
    cfg = config(ckpt, out, budget, tasks)
    cmd = [sys.executable, "-m", "tadmerge.cli", "-q", "merge", str(cfg), "--overwrite"]
    m = measure(cmd, name=f"budget-{budget}", log_dir=work)
    if not m.ok:
        raise SystemExit(f"merge failed: {m.stderr_tail}")
    d = to_dict(m)
    d.update(budget=budget, budget_bytes=parse_bytes(budget), model=ckpt.name)
    return d


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="500M", help="parameters per checkpoint (bf16: 2 B each)")
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--budgets", default="512MB,1GB,2GB")
    ap.add_argument("--data", default="/work/bench-data")
    args = ap.parse_args(argv)
    data = Path(args.data)
    work = data / "budget-work"
    work.mkdir(parents=True, exist_ok=True)
    overhead = measure([sys.executable, "-c", IMPORTS],
                       name="import", log_dir=work)  # fmt: skip
    big = ensure_checkpoints(data, args.params, args.tasks)
    half = ensure_checkpoints(data, f"{parse_count(args.params) // 2 // 10**6}M", args.tasks)
    budgets = args.budgets.split(",")
    runs = [run(big, b, args.tasks, work) for b in budgets]
    runs.append(run(half, budgets[0], args.tasks, work))
    rows = []
    for r in runs:
        bound = r["budget_bytes"] + overhead.peak_rss_bytes
        rows.append({
            "model": r["model"], "budget": r["budget"], "wall_s": r["wall_s"],
            "peak_rss_bytes": r["peak_rss_bytes"], "peak_anon_bytes": r["peak_anon_bytes"],
            "bound_bytes": bound, "within_bound": r["peak_rss_bytes"] <= bound,
        })  # fmt: skip
    payload = {
        "machine": machine_info(),
        "import_overhead_rss_bytes": overhead.peak_rss_bytes,
        "rows": rows,
        "runs": runs,
    }
    path = write_result("memory_budget", payload)
    for row in rows:
        print(f"{row['model']:28s} budget {row['budget']:>6s}  peak RSS "
              f"{row['peak_rss_bytes'] / 2**20:7.0f} MiB  bound {row['bound_bytes'] / 2**20:7.0f} "
              f"MiB  {'OK' if row['within_bound'] else 'OVER'}  {row['wall_s']:.0f}s")  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
