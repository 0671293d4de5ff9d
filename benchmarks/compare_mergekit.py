"""tadmerge vs mergekit vs the I/O limit, on the same checkpoints.

    bash benchmarks/setup_envs.sh mergekit
    python benchmarks/make_checkpoints.py --params 271M --tasks 3 --dtype bf16 \
        --out /work/bench-data/llama-271M-k3-bf16 --shard-size 256MB
    nice -n 10 python benchmarks/compare_mergekit.py \
        --data /work/bench-data/llama-271M-k3-bf16 --reps 3 --tag 271M-k3-bf16
    python benchmarks/make_table.py          # -> docs/benchmarks.md

For every repetition: the I/O limit is measured first (io_limit.py), then the
tools run one after the other, ALTERNATING their order from one repetition to
the next (A B, then B A, ...) so drift in the machine's load hits both alike.
Before every measured run the inputs are read once (warm page cache, the same
condition for every run), and after it the tool's output is fsynced (flush_s,
charged to the tool). Medians over the repetitions. In the first repetition
the outputs of the two tools are compared number by number
(compare_outputs.py) before they are deleted.

Tools (--tools):
  mergekit        mergekit-yaml with `dtype: float32` (float32 math, like
                  tadmerge) and `out_dtype` = the checkpoints' dtype
  mergekit-native mergekit-yaml with no dtype (math in the checkpoints' dtype,
                  bf16: what a user gets without setting dtype)
  tadmerge        tadmerge merge, default settings unless --memory-budget /
                  --workers are given
  tadmerge:512MB  the same with runtime.memory_budget 512MB (any size)
Methods (--methods): task_arithmetic, ties (scope: tensor), dare_ties, and the
tadmerge-only tadrop_ta, tadrop_ties, tadrop_emr (configs.py).

Results: benchmarks/results/compare_mergekit_TAG.json; make_table.py turns
them into the tables of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

from benchmarks import io_limit
from benchmarks.common import (
    DEFAULT_ENVS,
    clear_output,
    code_version,
    dir_bytes,
    drop_caches,
    median,
    warm_cache,
    write_result,
)
from benchmarks.compare_outputs import compare_dirs
from benchmarks.configs import (
    MERGEKIT_FLAGS,
    SHARED_METHODS,
    TADMERGE_ONLY,
    mergekit_config,
    tadmerge_config,
)
from benchmarks.runner import measure, to_dict

MEDIAN_KEYS = (
    "wall_s",
    "cpu_s",
    "user_s",
    "sys_s",
    "peak_rss_bytes",
    "peak_anon_bytes",
    "hwm_bytes",
    "ru_maxrss_bytes",
    "flush_s",
    "wall_flushed_s",
)


def tadmerge_exe() -> list[str]:
    exe = os.environ.get("TADMERGE")
    if exe:
        return exe.split()
    cand = Path(sys.executable).with_name("tadmerge")
    if cand.exists():
        return [str(cand)]
    return [sys.executable, "-m", "tadmerge.cli"]


def mergekit_exe(envs: Path) -> Path:
    return Path(os.environ.get("MERGEKIT_YAML", envs / "mergekit" / "bin" / "mergekit-yaml"))


class Job:
    """One tool on one method: writes its config, knows its command."""

    def __init__(self, tool: str, method: str, data: Path, work: Path, args):
        self.tool, self.method = tool, method
        manifest = json.loads((data / "manifest.json").read_text())
        self.dtype = manifest["dtype"]
        base = data / "base"
        fts = [data / m for m in manifest["models"][1:]][: args.tasks or None]
        safe = tool.replace(":", "-")
        self.out = work / f"out-{safe}-{method}"
        self.cfg_path = work / f"{safe}-{method}.yaml"
        if tool.startswith("tadmerge"):
            # "tadmerge" (--memory-budget or the tool's default) or "tadmerge:512MB"
            budget = tool.partition(":")[2] or args.memory_budget
            cfg = tadmerge_config(
                method,
                base,
                fts,
                self.out,
                density=args.density,
                memory_budget=budget,
                workers=args.workers,
                seed=args.seed,
            )
            self.cmd = [
                *tadmerge_exe(),
                "merge",
                str(self.cfg_path),
                "--out",
                str(self.out),
                "--overwrite",
                *args.tadmerge_arg,
            ]
        else:
            dtype = "float32" if tool == "mergekit" else None
            out_dtype = self.dtype if tool == "mergekit" else None
            cfg = mergekit_config(
                method, base, fts, density=args.density, dtype=dtype, out_dtype=out_dtype
            )
            self.cmd = [
                str(mergekit_exe(args.envs)),
                str(self.cfg_path),
                str(self.out),
                *MERGEKIT_FLAGS,
                "--random-seed",
                str(args.seed),
                *args.mergekit_arg,
            ]
        self.cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))

    @classmethod
    def for_yaml(cls, tool: str, method: str, cfg: dict, work: Path, args) -> Job:
        """The same mergekit YAML for either tool (tadmerge reads it through its
        front end): `tool` is "tadmerge" or "mergekit" (compare_methods.py)."""
        job = cls.__new__(cls)
        job.tool, job.method = tool, method
        job.out = work / f"out-{tool}-{method}"
        job.cfg_path = work / f"{tool}-{method}.yaml"
        if tool == "tadmerge":
            job.cmd = [*tadmerge_exe(), "merge", str(job.cfg_path), "--out", str(job.out)]
            job.cmd += ["--overwrite", *args.tadmerge_arg]
        else:
            job.cmd = [str(mergekit_exe(args.envs)), str(job.cfg_path), str(job.out)]
            job.cmd += [*MERGEKIT_FLAGS, "--random-seed", str(args.seed), *args.mergekit_arg]
        job.cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return job

    def run(self, dirs, log_dir: Path, tag: str, cold: bool = False) -> dict:
        clear_output(self.out)
        version = code_version()
        if cold:
            drop_caches()
        else:
            warm_cache(dirs)
        m = measure(
            self.cmd, log_dir=log_dir, name=f"{self.cfg_path.stem}-{tag}", flush_dir=self.out
        )
        d = to_dict(m, timeline=True)
        d["wall_flushed_s"] = m.wall_s + (m.flush_s or 0.0)
        d["code_version"] = version
        d["output_bytes"] = dir_bytes(self.out) if self.out.exists() else 0
        report = self.out / "merge_report.json"
        if report.exists():
            try:
                rep = json.loads(report.read_text())
                d["tool_report"] = {
                    k: rep.get(k) for k in ("timings", "peak_rss_bytes", "reads") if k in rep
                }
            except (OSError, json.JSONDecodeError):
                pass
        if not m.ok:
            print(
                f"[compare] {self.tool} {self.method} FAILED rc={m.returncode}\n"
                f"{m.stderr_tail[-2000:]}",
                file=sys.stderr,
            )
        return d


def summarize(runs: list[dict]) -> dict:
    ok = [r for r in runs if r["returncode"] == 0]
    out = {k: median([r.get(k) for r in ok]) for k in MEDIAN_KEYS}
    out["reps_ok"] = len(ok)
    out["reps"] = len(runs)
    return out


def ratios(res: dict, io: dict) -> dict:
    """Each tool vs the I/O limit; each tadmerge variant vs each mergekit variant
    (keys `TD:speedup_vs_MK`, `TD:rss_ratio_vs_MK`, ...)."""
    out = {}
    for tool, r in res.items():
        med = r["median"]
        if med["wall_flushed_s"] and io.get("total_s"):
            out[f"{tool}_vs_io_limit"] = med["wall_flushed_s"] / io["total_s"]
    for td_tool in (t for t in res if t.startswith("tadmerge")):
        td = res[td_tool]["median"]
        for ref in (t for t in res if t.startswith("mergekit")):
            mk = res[ref]["median"]
            if not (td["wall_s"] and mk["wall_s"]):
                continue
            out[f"{td_tool}:speedup_vs_{ref}"] = mk["wall_s"] / td["wall_s"]
            out[f"{td_tool}:cpu_ratio_vs_{ref}"] = td["cpu_s"] / mk["cpu_s"]
            out[f"{td_tool}:rss_ratio_vs_{ref}"] = td["peak_rss_bytes"] / mk["peak_rss_bytes"]
            out[f"{td_tool}:anon_ratio_vs_{ref}"] = (
                td["peak_anon_bytes"] / mk["peak_anon_bytes"] if mk["peak_anon_bytes"] else None
            )
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="a make_checkpoints.py set")
    ap.add_argument("--methods", default=",".join(SHARED_METHODS))
    ap.add_argument("--tools", default="mergekit,tadmerge")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tasks", type=int, help="use the first K fine-tunes of the set (default all)")
    ap.add_argument("--tag", help="results name suffix (default: the data dir name)")
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--memory-budget", help="tadmerge runtime.memory_budget (default: its own)")
    ap.add_argument("--workers", type=int, help="tadmerge runtime.workers (default: its own)")
    ap.add_argument(
        "--tadmerge-arg",
        action="append",
        default=[],
        help="extra argument for `tadmerge merge` (repeatable)",
    )
    ap.add_argument(
        "--mergekit-arg",
        action="append",
        default=[],
        help="extra argument for mergekit-yaml (repeatable)",
    )
    ap.add_argument("--envs", type=Path, default=DEFAULT_ENVS)
    ap.add_argument("--work", type=Path, help="scratch dir (default DATA/work)")
    ap.add_argument("--no-agreement", action="store_true", help="skip comparing outputs")
    ap.add_argument(
        "--cold",
        action="store_true",
        help="drop the page cache before every measured run and before the I/O limit "
        "(needs root): inputs come from disk, as for checkpoints larger than RAM",
    )
    ap.add_argument("--keep-outputs", action="store_true")
    a = ap.parse_args(argv)

    data = a.data.resolve()
    manifest = json.loads((data / "manifest.json").read_text())
    dirs = io_limit.model_dirs(data)[: (a.tasks + 1) if a.tasks else None]
    work = (a.work or data / "work").resolve()
    work.mkdir(parents=True, exist_ok=True)
    log_dir = work / "logs"
    tools = [t for t in a.tools.split(",") if t]
    methods = [m for m in a.methods.split(",") if m]
    tag = a.tag or data.name

    jobs = {}
    for method in methods:
        for tool in tools:
            if tool.startswith("mergekit") and method in TADMERGE_ONLY:
                continue
            jobs[(tool, method)] = Job(tool, method, data, work, a)

    io_runs: list[dict] = []
    runs: dict = {(t, m): [] for (t, m) in jobs}
    agreement: dict = {}
    t_start = time.time()
    for rep in range(a.reps):
        if a.cold:
            drop_caches()
        # the O_DIRECT read every repetition too: the TADrop target is held against
        # its median, not against one sample of a quantity that varies by 2x here
        io_runs.append(io_limit.measure_once(dirs, work, warm=not a.cold, direct=True))
        print(f"[compare] rep {rep}: I/O limit {io_runs[-1]['total_s']:.2f}s", file=sys.stderr)
        for method in methods:
            order = [t for t in tools if (t, method) in jobs]
            if rep % 2:
                order.reverse()
            for tool in order:
                job = jobs[(tool, method)]
                d = job.run(dirs, log_dir, f"rep{rep}", cold=a.cold)
                d["rep"], d["position"] = rep, order.index(tool)
                runs[(tool, method)].append(d)
                print(
                    f"[compare] rep {rep} {method:16s} {tool:16s} rc={d['returncode']} "
                    f"wall={d['wall_s']:.2f}s flush={d.get('flush_s') or 0:.2f}s "
                    f"cpu={d['cpu_s']:.2f}s rss={d['peak_rss_bytes'] / 1e9:.3f}GB "
                    f"anon={d['peak_anon_bytes'] / 1e9:.3f}GB",
                    file=sys.stderr,
                )
            if rep == 0 and not a.no_agreement:
                outs = [
                    (t, jobs[(t, method)].out)
                    for t in order
                    if runs[(t, method)][-1]["returncode"] == 0
                ]
                td = [(t, o) for t, o in outs if t.startswith("tadmerge")]
                for t, o in outs:
                    if td and not t.startswith("tadmerge"):
                        key = f"{method}:{td[0][0]}_vs_{t}"
                        try:
                            agreement[key] = compare_dirs(td[0][1], o)
                        except Exception as e:  # report, do not lose the timings
                            agreement[key] = {"error": repr(e)}
            if not a.keep_outputs:
                for t in order:
                    clear_output(jobs[(t, method)].out)

    io = io_limit.summarize(io_runs)
    results: dict = {}
    for method in methods:
        res = {}
        for tool in tools:
            if (tool, method) in jobs:
                res[tool] = {
                    "median": summarize(runs[(tool, method)]),
                    "runs": runs[(tool, method)],
                    "config": yaml.safe_load(jobs[(tool, method)].cfg_path.read_text()),
                    "cmd": jobs[(tool, method)].cmd,
                }
        results[method] = {"tools": res, "ratios": ratios(res, io)}
    payload = {
        "dataset": {
            "path": str(data),
            **{
                k: manifest[k]
                for k in ("params", "params_human", "dtype", "shards", "seed", "shape")
            },
            "tasks": len(dirs) - 1,
            "unchanged_fraction_per_task": manifest["unchanged_fraction_per_task"][: len(dirs) - 1],
        },
        "settings": {
            "reps": a.reps,
            "density": a.density,
            "memory_budget": a.memory_budget,
            "workers": a.workers,
            "tools": tools,
            "methods": methods,
            "page_cache": (
                "cold (page cache dropped before every measured run and the I/O limit)"
                if a.cold
                else "warm (inputs read once before every measured run)"
            ),
            "output_flush": "fsync of the output dir after each run (flush_s)",
            "mergekit_flags": MERGEKIT_FLAGS,
            "nice": os.nice(0),
            "elapsed_s": time.time() - t_start,
        },
        "io_limit": {**io, "runs": io_runs},
        "methods": results,
        "agreement": agreement,
    }
    path = write_result(f"compare_mergekit_{tag}", payload)
    print(f"[compare] wrote {path}", file=sys.stderr)
    for method, r in results.items():
        print(method, json.dumps({k: round(v, 3) for k, v in r["ratios"].items() if v is not None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
