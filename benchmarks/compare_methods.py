"""Every mergekit method, tadmerge beside mergekit, on the same mergekit YAML.

    python benchmarks/make_checkpoints.py --params 271M --tasks 3 --dtype bf16 \
        --out /work/bench-data/llama-271M-k3-bf16 --shard-size 512MB --seed 0
    nice -n 10 python benchmarks/compare_methods.py \
        --data /work/bench-data/llama-271M-k3-bf16 --reps 3
    python benchmarks/make_table.py          # -> docs/benchmarks.md ("methods")

One mergekit YAML per method (method_yaml: K fine-tunes of the set, the base
where the method takes one, `dtype: float32` and `out_dtype` the checkpoints'
dtype, so that both tools compute in float32 and cast once). Both tools run
that same file: mergekit-yaml, and `tadmerge merge` through its mergekit front
end. Whether tadmerge takes a method is asked of its front end and config
parser at run time (no checkpoint read), so the table follows the methods as
they are added; a method it refuses is listed as not supported, with the reason,
and only mergekit runs it.

Per repetition the two tools ALTERNATE (mergekit first for even methods of even
repetitions, then the other way, so each tool runs first as often as second),
each run on a warm page cache (inputs read once before it) and its output fsynced
(compare_mergekit.Job, runner.measure): wall time, CPU time, peak RSS. Medians
over the repetitions. In the first repetition the two outputs are compared
number by number (compare_outputs.compare_dirs); random methods (DARE, DELLA)
never agree bit for bit (docs/semantics.md).

Results: benchmarks/results/methods_vs_mergekit.json (--name for another).
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

from benchmarks import io_limit
from benchmarks.common import DEFAULT_ENVS, clear_output, median, tool_missing, write_result
from benchmarks.compare_mergekit import MEDIAN_KEYS, Job
from benchmarks.compare_outputs import compare_dirs

# mergekit 0.1.5's merge methods, in the order of the table
MERGEKIT_METHODS = (
    "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
    "breadcrumbs_ties", "della", "della_linear", "slerp", "nuslerp", "multislerp",
    "karcher", "model_stock", "sce", "nearswap", "arcee_fusion", "passthrough", "ram",
    "ramplus_tl",
)  # fmt: skip
RANDOM = {"dare_ties", "dare_linear", "della", "della_linear"}  # never bit-comparable
DENSITY = 0.2
TOOLS = ("mergekit", "tadmerge")


def method_yaml(
    method: str,
    base: Path,
    fts: list[Path],
    layers: int,
    out_dtype: str,
    density: float = DENSITY,
    tadmerge: dict | None = None,
) -> dict:
    """The mergekit YAML of `method` on this set (mergekit 0.1.5's parameters)."""
    b, ms = str(base), [str(f) for f in fts]

    def models(**params) -> list[dict]:
        return [{"model": m, "parameters": {"weight": 1.0, **params}} for m in ms]

    cfg: dict = {"merge_method": method}
    if method == "linear":
        cfg["models"] = models()
    elif method in ("task_arithmetic",):
        cfg.update(base_model=b, models=models(), parameters={"lambda": 0.3})
    elif method in ("ties", "dare_ties", "dare_linear"):
        cfg.update(base_model=b, models=models(density=density))
    elif method.startswith("breadcrumbs"):
        cfg.update(base_model=b, models=models(density=density, gamma=0.01))
    elif method.startswith("della"):
        cfg.update(base_model=b, models=models(density=density, epsilon=0.1))
    elif method in ("slerp", "nearswap"):  # two models: the base and the first fine-tune
        cfg.update(base_model=b, models=[{"model": b}, {"model": ms[0]}], parameters={"t": 0.5})
    elif method == "arcee_fusion":
        cfg.update(base_model=b, models=[{"model": b}, {"model": ms[0]}])
    elif method == "nuslerp":  # two fine-tunes, slerped around the base
        cfg.update(base_model=b, models=models()[:2])
    elif method == "multislerp":
        cfg.update(base_model=b, models=models())
    elif method == "karcher":
        cfg["models"] = [{"model": m} for m in ms]
    elif method in ("model_stock", "ram", "ramplus_tl"):
        cfg.update(base_model=b, models=[{"model": m} for m in ms])
    elif method == "sce":
        cfg.update(base_model=b, models=[{"model": m} for m in ms])
        cfg["parameters"] = {"select_topk": 0.1}
    elif method == "passthrough":  # a frankenmerge: 1.25x the layers
        h, q = layers // 2, layers // 4
        cfg["slices"] = [
            {"sources": [{"model": ms[0], "layer_range": [0, h]}]},
            {"sources": [{"model": ms[-1], "layer_range": [q, layers]}]},
        ]
    else:
        raise ValueError(f"no YAML for {method!r}")
    if method != "passthrough":
        cfg.update(dtype="float32", out_dtype=out_dtype)
    if tadmerge:
        cfg["tadmerge"] = tadmerge  # (mergekit ignores it)
    return cfg


def tadmerge_refuses(cfg: dict, cwd: Path) -> str | None:
    """Why tadmerge does not take this YAML (its front end and config parser, no
    checkpoint read), or None when it does."""
    from tadmerge.config import parse_config
    from tadmerge.errors import ConfigError
    from tadmerge.frontends import mergekit

    try:
        native, _ = mergekit.translate(cfg, cwd)
        parse_config(native, cwd)
    except ConfigError as e:
        return str(e)
    return None


def summarize(runs: list[dict]) -> dict:
    ok = [r for r in runs if r["returncode"] == 0]
    out = {k: median([r.get(k) for r in ok]) for k in MEDIAN_KEYS}
    out["reps_ok"], out["reps"] = len(ok), len(runs)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="a make_checkpoints.py set")
    ap.add_argument("--methods", default=",".join(MERGEKIT_METHODS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tasks", type=int, default=3, help="fine-tunes of the set used (K)")
    ap.add_argument("--density", type=float, default=DENSITY)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--memory-budget", help="tadmerge runtime.memory_budget (default: its own)")
    ap.add_argument("--workers", type=int, help="tadmerge runtime.workers (default: its own)")
    ap.add_argument("--tadmerge-arg", action="append", default=[])
    ap.add_argument("--mergekit-arg", action="append", default=[])
    ap.add_argument("--envs", type=Path, default=DEFAULT_ENVS)
    ap.add_argument("--work", type=Path, help="scratch dir (default DATA/work-methods)")
    ap.add_argument("--name", default="methods_vs_mergekit", help="results file name")
    ap.add_argument("--results", type=Path, help="results dir (default benchmarks/results)")
    ap.add_argument("--no-agreement", action="store_true", help="skip comparing outputs")
    a = ap.parse_args(argv)

    if a.envs != DEFAULT_ENVS:  # (--envs: mergekit's environment under that folder)
        os.environ.setdefault(
            "TADMERGE_MERGEKIT_PYTHON", str(a.envs / "mergekit" / "bin" / "python")
        )
    missing = tool_missing("mergekit", "benchmarks/compare_methods.py")
    if missing:
        print(f"[methods] {missing}", file=sys.stderr)
        return 2
    data = a.data.resolve()
    manifest = json.loads((data / "manifest.json").read_text())
    base = data / "base"
    fts = [data / m for m in manifest["models"][1:]][: a.tasks]
    dirs = io_limit.model_dirs(data)[: len(fts) + 1]
    work = (a.work or data / "work-methods").resolve()
    work.mkdir(parents=True, exist_ok=True)
    log_dir = work / "logs"
    layers = manifest["shape"]["num_hidden_layers"]
    out_dtype = manifest["dtype"]
    runtime = {k: v for k, v in (("memory_budget", a.memory_budget), ("workers", a.workers)) if v}
    ext = {"runtime": runtime} if runtime else None

    methods = [m for m in a.methods.split(",") if m]
    yamls = {m: method_yaml(m, base, fts, layers, out_dtype, a.density, ext) for m in methods}
    refused = {m: tadmerge_refuses(cfg, work) for m, cfg in yamls.items()}
    jobs: dict[tuple[str, str], Job] = {}
    for m in methods:
        for tool in TOOLS:
            if tool == "tadmerge" and refused[m] is not None:
                continue
            jobs[(tool, m)] = Job.for_yaml(tool, m, yamls[m], work, a)
    for m, why in refused.items():
        if why:
            print(f"[methods] {m}: not supported by tadmerge ({why[:160]})", file=sys.stderr)

    runs: dict[tuple[str, str], list[dict]] = {key: [] for key in jobs}
    agreement: dict[str, dict] = {}
    t_start = time.time()
    for rep in range(a.reps):
        for i, m in enumerate(methods):
            order = [t for t in TOOLS if (t, m) in jobs]
            if (rep + i) % 2:
                order.reverse()  # each tool first as often as second
            for tool in order:
                d = jobs[(tool, m)].run(dirs, log_dir, f"rep{rep}")
                d["rep"], d["position"] = rep, order.index(tool)
                runs[(tool, m)].append(d)
                print(
                    f"[methods] rep {rep} {m:16s} {tool:9s} rc={d['returncode']} "
                    f"wall={d['wall_s']:.2f}s cpu={d['cpu_s']:.2f}s "
                    f"rss={d['peak_rss_bytes'] / 1e9:.3f}GB",
                    file=sys.stderr,
                )
            both = len(order) == 2 and all(runs[(t, m)][-1]["returncode"] == 0 for t in order)
            if rep == 0 and both and not a.no_agreement:
                try:
                    agreement[m] = compare_dirs(
                        jobs[("tadmerge", m)].out, jobs[("mergekit", m)].out
                    )
                except Exception as e:  # report, do not lose the timings
                    agreement[m] = {"error": repr(e)}
            for tool in order:
                clear_output(jobs[(tool, m)].out)

    results: dict[str, dict] = {}
    for m in methods:
        row: dict = {"supported": refused[m] is None, "random": m in RANDOM, "tools": {}}
        if refused[m] is not None:
            row["not_supported"] = refused[m]
        for tool in TOOLS:
            if (tool, m) in jobs:
                row["tools"][tool] = {
                    "median": summarize(runs[(tool, m)]),
                    "runs": runs[(tool, m)],
                    "cmd": jobs[(tool, m)].cmd,
                }
        td, mk = (row["tools"].get(t, {}).get("median", {}) for t in ("tadmerge", "mergekit"))
        if td.get("wall_s") and mk.get("wall_s"):
            row["speedup"] = mk["wall_s"] / td["wall_s"]
            row["rss_ratio"] = td["peak_rss_bytes"] / mk["peak_rss_bytes"]
        row["yaml"] = yamls[m]
        if m in agreement:
            row["agreement"] = {k: v for k, v in agreement[m].items() if k != "tensors"}
        results[m] = row
    payload = {
        "dataset": {
            "path": str(data),
            **{k: manifest[k] for k in ("params", "params_human", "dtype", "shards", "shape")},
            "tasks": len(fts),
        },
        "settings": {
            "reps": a.reps,
            "density": a.density,
            "memory_budget": a.memory_budget,
            "workers": a.workers,
            "order": "alternating per repetition and method",
            "page_cache": "warm (inputs read once before every measured run)",
            "output_flush": "fsync of the output dir after each run (flush_s)",
            "nice": os.nice(0),
            "elapsed_s": time.time() - t_start,
        },
        "methods": results,
    }
    kw = {"results_dir": a.results} if a.results else {}
    path = write_result(a.name, payload, **kw)
    print(f"[methods] wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
