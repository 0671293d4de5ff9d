"""Plan and merge a checkpoint of very many tiny tensors under /usr/bin/time -v.

    python benchmarks/many_tensors.py --data /tmp/many --tensors 1000000 \
        [--methods ta tadrop] [--stages plan merge] [--out benchmarks/results/many_tensors.json]

Generates the checkpoint (benchmarks/make_many_tensors.py: base + K fine-tunes of N
tensors of 4..16 elements) unless it is there, then runs, each in its own process,
``tadmerge plan CONFIG`` and ``tadmerge merge CONFIG`` (task arithmetic; TADrop with
a per-tensor magnitude selection), records each one's peak RSS (``Maximum resident
set size``) and wall time, runs ``tadmerge verify`` on the output and compares a few
tensors of the task-arithmetic output with their closed-form values
(make_many_tensors.value), and of the TADrop output with tests/reference.py's
independent whole-tensor reference. Results go to benchmarks/results/many_tensors.json, set
against runtime.memory_budget (512 MB by default).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import make_many_tensors as gen

REPO = Path(__file__).resolve().parents[1]
METHODS = {
    "ta": {"merge": {"method": "task_arithmetic", "scale": 0.5}},
    "tadrop": {
        "sparsify": {"method": "tadrop", "scope": "tensor"},
        "merge": {"method": "task_arithmetic", "scale": 0.5},
    },
}


def write_config(data: Path, tasks: int, method: str, work: Path) -> Path:
    doc = {
        "base": str(data / "base"),
        "models": [{"path": str(data / f"ft_{k}"), "name": f"t{k}"} for k in range(1, tasks + 1)],
        **METHODS[method],
        "output": {"path": str(work / f"out-{method}")},
        "runtime": {"progress": "none"},
    }
    path = work / f"{method}.yaml"
    path.write_text(json.dumps(doc))  # (JSON is YAML)
    return path


def timed(cmd: list[str]) -> dict:
    """Run `cmd` under /usr/bin/time -v: rc, wall seconds, peak RSS, last output."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t = time.monotonic()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    wall = time.monotonic() - t
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    return {
        "command": " ".join(cmd),
        "rc": p.returncode,
        "wall_s": round(wall, 1),
        "peak_rss_bytes": int(m.group(1)) * 1024 if m else None,
        "tail": (p.stdout + p.stderr)[-800:] if p.returncode else "",
    }


def read_output_tensors(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    """A few float32 tensors of a safetensors file, read with the header's own JSON."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        head = json.loads(f.read(n))
        out = {}
        for name in names:
            e = head[name]
            b, end = e["data_offsets"]
            f.seek(8 + n + b)
            out[name] = np.frombuffer(f.read(end - b), dtype="<f4")
    return out


def check_ta(out: Path, tensors: int, tasks: int, scale: float) -> dict:
    """Task arithmetic, a few tensors: base + scale * sum_k (ft_k - base), float32 in
    the engine's order (the sum of τ_k first, then scaled, then added)."""
    picks = sorted({0, 1, tensors // 2, tensors - 1})
    got = read_output_tensors(out / "model.safetensors", [f"t.{i:07d}" for i in picks])
    bad = []
    for i in picks:
        size = int(gen.sizes(i, i + 1)[0])
        ii, jj = np.full(size, i), np.arange(size)
        base = gen.value(0, ii, jj)
        acc = np.zeros(size, np.float32)
        for k in range(1, tasks + 1):
            acc = acc + (gen.value(k, ii, jj) - base)
        want = base + np.float32(scale) * acc
        if not np.array_equal(got[f"t.{i:07d}"], want):
            bad.append(i)
    return {"checked": picks, "mismatched": bad}


def check_reference(out: Path, cfg: Path, tensors: int, tasks: int) -> dict:
    """Any method, a few tensors: the independent reference of tests/reference.py
    (sparsify each τ_k as a whole tensor, then combine) on the closed-form values."""
    sys.path.insert(0, str(REPO / "tests"))
    import reference as ref  # tests/reference.py
    import torch

    from tadmerge.config import load_config

    doc = load_config(str(cfg)).to_dict()
    sp, merge = doc["sparsify"], doc["merge"]
    weights = [m.get("weight", 1.0) for m in doc["models"]]
    picks = sorted({0, 1, tensors // 2, tensors - 1})
    got = read_output_tensors(out / "model.safetensors", [f"t.{i:07d}" for i in picks])
    bad = []
    for i in picks:
        size = int(gen.sizes(i, i + 1)[0])
        ii, jj = np.full(size, i), np.arange(size)
        base = torch.from_numpy(gen.value(0, ii, jj))
        thetas = [torch.from_numpy(gen.value(k, ii, jj)) for k in range(1, tasks + 1)]
        name = f"t.{i:07d}"
        ts = [
            ref.sparsify(th - base, sp, task=k, name=name, seed=doc.get("seed", 0), block_rows=size)
            for k, th in enumerate(thetas)
        ]
        want = ref.combine(merge["method"], base, thetas, ts, weights, merge.get("scale", 1.0))
        if not np.array_equal(got[name], want.numpy()):
            bad.append(i)
    return {"checked": picks, "mismatched": bad, "against": "tests/reference.py"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--tensors", type=int, default=1_000_000)
    ap.add_argument("--tasks", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=["ta", "tadrop"], choices=list(METHODS))
    ap.add_argument("--stages", nargs="+", default=["plan", "merge"], choices=["plan", "merge"])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/many_tensors.json")
    a = ap.parse_args(argv)
    if not (a.data / "manifest.json").exists():
        gen.generate(a.data, a.tensors, a.tasks, "F32")
    work = a.data / "runs"
    work.mkdir(exist_ok=True)
    results: dict = {
        "tensors": a.tensors,
        "tasks": a.tasks,
        "memory_budget_bytes": 512 * 10**6,
        "runs": {},
    }
    tad = [sys.executable, "-m", "tadmerge.cli"]
    for method in a.methods:
        cfg = write_config(a.data, a.tasks, method, work)
        run: dict = {}
        if "plan" in a.stages:
            run["plan"] = timed([*tad, "plan", str(cfg)])
        if "merge" in a.stages:
            run["merge"] = timed([*tad, "merge", str(cfg), "--overwrite"])
            if run["merge"]["rc"] == 0:
                out = work / f"out-{method}"
                v = subprocess.run([*tad, "verify", str(out)], capture_output=True, text=True)
                run["verify_rc"] = v.returncode
                if method == "ta":
                    run["reference"] = check_ta(out, a.tensors, a.tasks, 0.5)
                else:
                    run["reference"] = check_reference(out, cfg, a.tensors, a.tasks)
        results["runs"][method] = run
        print(method, json.dumps(run, indent=1))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
