"""Two source trees of tadmerge, the same merges, alternating runs: before/after.

    python benchmarks/ab_trees.py --a /path/to/old-checkout --b . \\
        --data /work/bench-data/llama-271M-k3-bf16 --tasks 3 --reps 3 \\
        --methods task_arithmetic,tadrop_ta,ties,dare_ties,tadrop_emr --tag NAME

Each repetition runs every (method, tree) pair once, in an order that alternates
A and B, so that drift of the machine (page cache, other load) falls on both.
A method is one of benchmarks/configs.py's (a native config: `python merge.py
CONFIG`) or a mergekit method name (compare_methods.py's YAML of it, through
the front end: `python merge.py merge YAML --out OUT`). Each run uses that
tree's merge.py (its own `tadmerge` first on sys.path), measured from the
outside by runner.py (wall, CPU, peak RSS of the process tree). Outputs of A
and B are compared by their manifests' SHA-256 of the model shards: the same
bytes are required, except for the methods given in --bytes-may-differ (a
documented change of definition). Writes
benchmarks/results/ab_<tag>.json and prints a table of medians.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.compare_methods import method_yaml
from benchmarks.configs import SHARED_METHODS, TADMERGE_ONLY, tadmerge_config
from benchmarks.runner import measure

RESULTS = Path(__file__).resolve().parent / "results"


def model_digests(out: Path) -> dict[str, str]:
    doc = json.loads((out / "manifest.json").read_text())
    return {e["path"]: e["sha256"] for e in doc["files"] if e["path"].endswith(".safetensors")}


def run_one(tree: Path, cfg: dict, work: Path, label: str) -> tuple[dict, dict[str, str]]:
    """One merge by `tree`'s merge.py: a native config (its output path set
    here) or a mergekit YAML (the output given as --out)."""
    out = work / f"out-{label}"
    shutil.rmtree(out, ignore_errors=True)
    cfg_path = work / f"{label}.yaml"
    cmd = [sys.executable, str(tree / "merge.py")]
    if "merge_method" in cfg:
        cmd += ["merge", str(cfg_path), "--out", str(out)]
    else:
        cfg = {**cfg, "output": {**cfg["output"], "path": str(out)}}
        cmd += [str(cfg_path)]
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env_path = str(tree)
    m = measure(cmd, env={"PYTHONPATH": env_path}, cwd=str(tree), log_dir=work, name=label)
    if m.returncode != 0:
        raise SystemExit(f"{label}: exit {m.returncode}\n{m.stderr_tail[-2000:]}")
    digests = model_digests(out)
    shutil.rmtree(out, ignore_errors=True)
    return {"wall_s": m.wall_s, "cpu_s": m.cpu_s, "peak_rss_bytes": m.peak_rss_bytes}, digests


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True, type=Path, help="the 'before' tree")
    ap.add_argument("--b", required=True, type=Path, help="the 'after' tree")
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--methods",
        default="task_arithmetic,tadrop_ta,ties,dare_ties,tadrop_emr",
        help="configs.py's methods, or mergekit method names (compare_methods.py's YAML)",
    )
    ap.add_argument("--bytes-may-differ", default="", help="methods whose definition changed")
    ap.add_argument("--tag", required=True)
    args = ap.parse_args(argv)
    base = args.data / "base"
    fts = [args.data / f"ft_{i}" for i in range(1, args.tasks + 1)]
    manifest = json.loads((args.data / "manifest.json").read_text())
    layers, out_dtype = manifest["shape"]["num_hidden_layers"], manifest["dtype"]

    def config(method: str) -> dict:
        if method in SHARED_METHODS + TADMERGE_ONLY:
            return tadmerge_config(method, base, fts, work / "unused")
        return method_yaml(method, base, fts, layers, out_dtype)

    trees = {"A": args.a.resolve(), "B": args.b.resolve()}
    methods = args.methods.split(",")
    may_differ = set(filter(None, args.bytes_may_differ.split(",")))
    runs: dict = {m: {"A": [], "B": []} for m in methods}
    same: dict = {}
    for tree in trees.values():  # each tree's C library built before any timed run
        subprocess.run([sys.executable, str(tree / "merge.py"), "kernels"], check=True, cwd=tree)
    with tempfile.TemporaryDirectory(prefix="ab-", dir="/work") as tmp:
        work = Path(tmp)
        for rep in range(args.reps):
            for i, method in enumerate(methods):
                order = ("A", "B") if (rep + i) % 2 == 0 else ("B", "A")
                digests = {}
                for side in order:
                    got, digests[side] = run_one(
                        trees[side], config(method), work, f"{method}-{side}"
                    )
                    runs[method][side].append(got)
                    print(f"rep {rep} {method} {side}: {got['wall_s']:.2f}s "
                          f"{got['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)  # fmt: skip
                same[method] = digests["A"] == digests["B"]
                if not same[method] and method not in may_differ:
                    raise SystemExit(f"{method}: the two trees wrote different bytes")
    table = {}
    for method, sides in runs.items():
        table[method] = {
            side: {
                "wall_s_median": statistics.median(r["wall_s"] for r in rs),
                "cpu_s_median": statistics.median(r["cpu_s"] for r in rs),
                "peak_rss_mib_median": statistics.median(r["peak_rss_bytes"] for r in rs) / 2**20,
            }
            for side, rs in sides.items()
        }
        table[method]["same_bytes"] = same[method]
    doc = {
        "trees": {k: str(v) for k, v in trees.items()},
        "commits": {k: _commit(v) for k, v in trees.items()},
        "data": str(args.data),
        "tasks": args.tasks,
        "reps": args.reps,
        "runs": runs,
        "medians": table,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"ab_{args.tag}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print("\n| method | A wall | B wall | A peak RSS | B peak RSS | same bytes |")
    print("|---|---|---|---|---|---|")
    for method, t in table.items():
        a, b = t["A"], t["B"]
        print(f"| {method} | {a['wall_s_median']:.2f} s | {b['wall_s_median']:.2f} s | "
              f"{a['peak_rss_mib_median']:.0f} MiB | {b['peak_rss_mib_median']:.0f} MiB | "
              f"{'yes' if t['same_bytes'] else 'no'} |")  # fmt: skip
    print(f"wrote {path}")


def _commit(tree: Path) -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "?"


if __name__ == "__main__":
    main()
