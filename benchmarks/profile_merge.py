"""Profile one tadmerge merge with py-spy and say where the time goes.

    nice -n 10 python benchmarks/profile_merge.py --data /work/bench-data/llama-271M-k8-bf16 \
        --tasks 3 --method ties --tag ties-271M [--native] [--svg]

Runs `py-spy record` (sampling, --rate 50 by default, all threads, idle
threads excluded) on `tadmerge merge` with the config of configs.py, writes the
collapsed stacks (benchmarks/work/profile_TAG.txt) and optionally a flame graph
SVG, then aggregates the samples:
- self: the innermost tadmerge/torch/safetensors frame of each sample
  (where the CPU actually is, attributed to the nearest named function);
- inclusive: every distinct tadmerge function on the stack;
- phase: the tadmerge-level call under the executor (read, compute, write...).
Results: benchmarks/results/profile_TAG.json (make_table.py does not render
them; docs/benchmarks.md quotes the top rows).

py-spy is installed into the tadmerge environment if missing
(`pip install py-spy`).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

from benchmarks.common import REPO, clear_output, tool_env, warm_cache, write_result
from benchmarks.compare_mergekit import tadmerge_exe
from benchmarks.configs import tadmerge_config

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]+?)(?::(?P<line>\d+))?\)$")


# the modules whose functions are a unit's phases
UNIT_FILES = ("tadmerge/cluster/worker.py", "tadmerge/cluster/engine_units.py")


def pyspy() -> str:
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=True)
        exe = str(Path(sys.executable).with_name("py-spy"))
    return exe


def parse_frame(f: str) -> tuple[str, str, str]:
    m = FRAME.match(f.strip())
    if not m:
        return f.strip(), "", ""
    return m.group("func"), m.group("file"), m.group("line") or ""


def short_file(path: str) -> str:
    for marker in ("tadmerge/", "torch/", "safetensors/", "numpy/", "zarr/"):
        i = path.find(marker)
        if i >= 0:
            return path[i:]
    return path.rsplit("/", 1)[-1]


# Innermost frames of threads that wait for work (py-spy's idle detection does
# not see these as idle): left out of the shares, counted as `waiting_samples`.
WAITING = {
    ("Condition.wait", "threading.py"),  # e.g. the digest thread between units
    ("_worker", "thread.py"),  # an idle ThreadPoolExecutor worker
}


def aggregate(raw: Path, top: int = 25) -> dict:
    self_t: collections.Counter = collections.Counter()
    self_line: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    phase: collections.Counter = collections.Counter()
    total = waiting = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = [parse_frame(f) for f in stack.split(";")]
        named = [(fn, short_file(fl)) for fn, fl, _ in frames]
        # innermost frame (with --native, the C/C++ symbol)
        leaf_fn, leaf_file = named[-1]
        if (leaf_fn, leaf_file) in WAITING:
            waiting += n
            continue
        total += n
        self_t[f"{leaf_fn} ({leaf_file})"] += n
        self_line[f"{leaf_fn} ({leaf_file}:{frames[-1][2]})"] += n
        seen = set()
        td = [f"{fn} ({fl})" for fn, fl in named if fl.startswith("tadmerge/")]
        for key in td:
            if key not in seen:
                incl[key] += n
                seen.add(key)
        # phase: the first tadmerge frame below the executor's unit loop, else the deepest
        ph = "other"
        for fn, fl in named:
            if fl.startswith(
                ("tadmerge/cluster/worker.py", "tadmerge/cluster/engine_units.py")
            ) and fn not in ("run_unit", "merge_unit"):
                ph = f"{fn} ({fl})"
                break
            if "_find_and_load" in fn:
                ph = "imports"
                break
        else:
            if td:
                ph = td[-1]
        phase[ph] += n

    def rows(c: collections.Counter) -> list[dict]:
        return [{"frame": k, "samples": v, "share": v / total} for k, v in c.most_common(top)]

    return {
        "samples": total,
        "waiting_samples": waiting,
        "self": rows(self_t),
        "self_lines": rows(self_line),
        "inclusive": rows(incl),
        "phase": rows(phase),
    }


def add_merge_args(ap: argparse.ArgumentParser, method: str) -> None:
    """The one merge a profiler runs (also perf_profile.py's)."""
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--method", default=method)
    ap.add_argument("--tag")
    ap.add_argument("--memory-budget")
    ap.add_argument("--workers", type=int)


def merge_tag(a: argparse.Namespace) -> str:
    return a.tag or f"{a.method}-{a.data.resolve().name}-k{a.tasks}"


def merge_to_profile(a: argparse.Namespace, prefix: str) -> tuple[list[Path], Path, dict, list]:
    """That merge's input dirs, output dir, config (written to
    benchmarks/work/PREFIX_TAG.yaml) and command line."""
    data = a.data.resolve()
    work = REPO / "benchmarks" / "work"
    work.mkdir(parents=True, exist_ok=True)
    dirs = [data / "base"] + [data / f"ft_{i + 1}" for i in range(a.tasks)]
    out = data / "work" / f"{prefix}-out-{a.method}"
    cfg = tadmerge_config(
        a.method, dirs[0], dirs[1:], out, memory_budget=a.memory_budget, workers=a.workers
    )
    cfg_path = work / f"{prefix}_{merge_tag(a)}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dirs, out, cfg, [*tadmerge_exe(), "-q", "merge", str(cfg_path), "--overwrite"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_merge_args(ap, "ties")
    ap.add_argument("--rate", type=int, default=50)
    ap.add_argument("--native", action="store_true", help="py-spy --native (C/C++ frames)")
    ap.add_argument("--svg", action="store_true", help="also write a flame graph SVG")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument(
        "--aggregate-only",
        action="store_true",
        help="re-aggregate the raw samples of an earlier run of this tag (no new run)",
    )
    a = ap.parse_args(argv)

    data = a.data.resolve()
    tag = merge_tag(a)
    if a.aggregate_only:
        path = REPO / "benchmarks" / "results" / f"profile_{tag}.json"
        doc = json.loads(path.read_text())
        doc.update(aggregate(Path(doc["raw"]), a.top))
        path.write_text(json.dumps(doc, indent=1, sort_keys=False, default=str) + "\n")
        print(f"[profile] re-aggregated {path}", file=sys.stderr)
        return 0
    dirs, out, _, cmd = merge_to_profile(a, "profile")
    work = REPO / "benchmarks" / "work"
    raw = work / f"profile_{tag}.txt"
    spy = [pyspy(), "record", "--rate", str(a.rate), "--format", "raw", "-o", str(raw)]
    if a.native:
        spy.append("--native")
    warm_cache(dirs)
    subprocess.run([*spy, "--", *cmd], check=True, env=tool_env())
    if a.svg:
        svg = work / f"profile_{tag}.svg"
        warm_cache(dirs)
        subprocess.run(
            [pyspy(), "record", "--rate", str(a.rate), "-o", str(svg), "--", *cmd],
            check=True,
            env=tool_env(),
        )
    report = {}
    rep_path = out / "merge_report.json"
    if rep_path.exists():
        report = json.loads(rep_path.read_text()).get("timings", {})
    clear_output(out)
    agg = aggregate(raw, a.top)
    path = write_result(
        f"profile_{tag}",
        {
            "method": a.method,
            "data": str(data),
            "tasks": a.tasks,
            "rate": a.rate,
            "native": a.native,
            "tool_timings": report,
            "raw": str(raw),
            **agg,
        },
    )
    print(f"[profile] {agg['samples']} samples -> {path}", file=sys.stderr)
    for sec in ("phase", "self", "self_lines", "inclusive"):
        print(f"== {sec}")
        for r in agg[sec][:15]:
            print(f"{r['share']:6.1%}  {r['frame']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
