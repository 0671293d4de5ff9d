"""How tadmerge's wall time and peak RSS grow with model size and with K.

    nice -n 10 python benchmarks/scaling.py --sizes 100M,271M,1B --ks 2,4,8 \
        --k-at-size 4 --k-sweep-size 271M --memory-budget 1GB --reps 1

Two sweeps, both under one fixed `runtime.memory_budget`:
- size sweep: every size in --sizes at K = --k-at-size;
- K sweep: K in --ks at size --k-sweep-size;
for each of the methods (default: task_arithmetic, tadrop_ties, tadrop_emr).
Checkpoint sets are generated on demand under --data-root (one set per size,
with max(K) fine-tunes; smaller K use its first fine-tunes, which the generator
makes bit-identical to a set generated with that K). For every point the I/O
limit of exactly those files is measured too, so each wall time is also given
as a multiple of it. Warm page cache as in compare_mergekit.py; datasets whose
inputs exceed the free memory are marked `cache: partial`.

The claim checked: peak RSS stays flat (within the budget plus a fixed
overhead) as the model grows. Results: benchmarks/results/scaling_TAG.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil
import yaml

from benchmarks import io_limit
from benchmarks.common import (
    DEFAULT_DATA,
    RESULTS_DIR,
    checkpoint_files,
    clear_output,
    code_version,
    median,
    parse_bytes,
    parse_count,
    warm_cache,
    write_result,
)
from benchmarks.compare_mergekit import tadmerge_exe
from benchmarks.configs import tadmerge_config
from benchmarks.make_checkpoints import generate, shape_for
from benchmarks.runner import measure, to_dict

DEFAULT_METHODS = "task_arithmetic,tadrop_ties,tadrop_emr"


def ensure_dataset(
    root: Path, size: str, tasks: int, dtype: str, seed: int, shard_size: str
) -> Path:
    """A generated set with at least `tasks` fine-tunes (generated if missing)."""
    for cand in sorted(root.glob(f"llama-{size}-k*-{dtype}")):
        mf = cand / "manifest.json"
        if mf.exists():
            m = json.loads(mf.read_text())
            if m["tasks"] >= tasks and m["seed"] == seed:
                return cand
    out = root / f"llama-{size}-k{tasks}-{dtype}"
    print(f"[scaling] generating {out}", file=sys.stderr)
    generate(
        out,
        tasks=tasks,
        dtype=dtype,
        seed=seed,
        shard_size=parse_bytes(shard_size),
        shape=shape_for(parse_count(size)),
        quiet=True,
    )
    return out


def run_point(data: Path, k: int, method: str, work: Path, a) -> dict:
    manifest = json.loads((data / "manifest.json").read_text())
    dirs = [data / "base"] + [data / f"ft_{i + 1}" for i in range(k)]
    in_bytes = sum(f.stat().st_size for d in dirs for f in checkpoint_files(d))
    avail = psutil.virtual_memory().available
    out = work / f"out-{data.name}-k{k}-{method}"
    cfg_path = work / f"{data.name}-k{k}-{method}.yaml"
    cfg = tadmerge_config(
        method,
        dirs[0],
        dirs[1:],
        out,
        memory_budget=a.memory_budget,
        workers=a.workers,
        seed=a.seed,
    )
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [
        *tadmerge_exe(),
        "merge",
        str(cfg_path),
        "--out",
        str(out),
        "--overwrite",
        *a.tadmerge_arg,
    ]
    runs, ios = [], []
    for rep in range(a.reps):
        ios.append(io_limit.measure_once(dirs, work))
        clear_output(out)
        version = code_version()
        warm_cache(dirs)
        m = measure(
            cmd, log_dir=work / "logs", name=f"{data.name}-k{k}-{method}-{rep}", flush_dir=out
        )
        d = to_dict(m, timeline=True)
        d["wall_flushed_s"] = m.wall_s + (m.flush_s or 0.0)
        d["code_version"] = version
        rep_path = out / "merge_report.json"
        if rep_path.exists():
            try:
                rj = json.loads(rep_path.read_text())
                d["tool_report"] = {x: rj.get(x) for x in ("timings", "peak_rss_bytes")}
            except (OSError, json.JSONDecodeError):
                pass
        runs.append(d)
        clear_output(out)
        print(
            f"[scaling] {manifest['params_human']:>6} K={k} {method:16s} rc={m.returncode} "
            f"wall={m.wall_s:.2f}s rss={m.peak_rss_bytes / 1e9:.3f}GB "
            f"anon={m.peak_anon_bytes / 1e9:.3f}GB io={ios[-1]['total_s']:.2f}s",
            file=sys.stderr,
        )
        if not m.ok:
            print(m.stderr_tail[-2000:], file=sys.stderr)
    ok = [r for r in runs if r["returncode"] == 0]
    io = io_limit.summarize(ios)
    wall = median([r["wall_s"] for r in ok])
    wf = median([r["wall_flushed_s"] for r in ok])
    return {
        "params": manifest["params"],
        "params_human": manifest["params_human"],
        "dtype": manifest["dtype"],
        "k": k,
        "method": method,
        "input_bytes": in_bytes,
        "cache": "warm" if in_bytes < 0.8 * avail else "partial",
        "reps_ok": len(ok),
        "reps": len(runs),
        "wall_s": wall,
        "wall_flushed_s": wf,
        "cpu_s": median([r["cpu_s"] for r in ok]),
        "peak_rss_bytes": median([r["peak_rss_bytes"] for r in ok]),
        "peak_anon_bytes": median([r["peak_anon_bytes"] for r in ok]),
        "hwm_bytes": median([r.get("hwm_bytes") for r in ok]),
        "io_limit_s": io["total_s"],
        "io_read_s": io["read_s"],
        "vs_io_limit": (wf / io["total_s"]) if wf and io["total_s"] else None,
        "throughput_params_per_s": manifest["params"] * k / wall if wall else None,
        "code_versions": sorted({r.get("code_version") or "?" for r in runs}),
        "config": cfg,
        "runs": runs,
        "io_runs": ios,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100M,271M,1B")
    ap.add_argument("--ks", default="2,4,8")
    ap.add_argument("--k-at-size", type=int, default=4, help="K of the size sweep")
    ap.add_argument("--k-sweep-size", default="271M", help="model size of the K sweep")
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--memory-budget", default="1GB")
    ap.add_argument("--workers", type=int)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-size", default="512MB")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--tadmerge-arg", action="append", default=[])
    ap.add_argument("--tag", default="default")
    ap.add_argument("--only", choices=["size", "k"], help="run one sweep only")
    a = ap.parse_args(argv)

    sizes = [s for s in a.sizes.split(",") if s]
    ks = [int(k) for k in a.ks.split(",") if k]
    methods = [m for m in a.methods.split(",") if m]
    work = a.data_root / "scaling-work"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    points: dict = {"size": [], "k": []}
    measured: dict = {}  # (dataset, K, method) -> point: a point both sweeps need runs once

    def point(data: Path, k: int, method: str) -> dict:
        key = (data.name, k, method)
        if key not in measured:
            measured[key] = run_point(data, k, method, work, a)
        return measured[key]

    def save(sweep: str, p: dict) -> None:
        points[sweep].append(p)
        rss = [q["peak_rss_bytes"] for q in points["size"] if q["peak_rss_bytes"]]
        payload = {
            "settings": {
                "sizes": sizes,
                "ks": ks,
                "k_at_size": a.k_at_size,
                "k_sweep_size": a.k_sweep_size,
                "methods": methods,
                "memory_budget": a.memory_budget,
                "memory_budget_bytes": parse_bytes(a.memory_budget),
                "workers": a.workers,
                "dtype": a.dtype,
                "reps": a.reps,
                "elapsed_s": time.time() - t0,
            },
            "size_sweep": points["size"],
            "k_sweep": points["k"],
            "rss_flat": {
                "min_bytes": min(rss) if rss else None,
                "max_bytes": max(rss) if rss else None,
                "max_over_min": (max(rss) / min(rss)) if rss else None,
            },
        }
        # written after every point, so an interrupted sweep keeps what it measured
        write_result(f"scaling_{a.tag}", payload)

    if a.only in (None, "size"):
        for size in sizes:
            need = max(a.k_at_size, max(ks) if size == a.k_sweep_size else 0)
            data = ensure_dataset(a.data_root, size, need, a.dtype, a.seed, a.shard_size)
            for m in methods:
                save("size", point(data, a.k_at_size, m))
    if a.only in (None, "k"):
        data = ensure_dataset(a.data_root, a.k_sweep_size, max(ks), a.dtype, a.seed, a.shard_size)
        for k in ks:
            for m in methods:
                save("k", point(data, k, m))
    path = RESULTS_DIR / f"scaling_{a.tag}.json"
    print(f"[scaling] wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
