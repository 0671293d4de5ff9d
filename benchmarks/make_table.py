"""Render the benchmark JSON results as the markdown tables of docs/benchmarks.md.

    python benchmarks/make_table.py [--results benchmarks/results] [--doc docs/benchmarks.md]

The document keeps its hand-written prose; only the blocks between
`<!-- BEGIN GENERATED: NAME -->` and `<!-- END GENERATED: NAME -->` are
replaced (NAME: compare, agreement, targets, scaling). `--print` writes the
tables to stdout instead.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, RESULTS_DIR

TOOL_LABEL = {
    "mergekit-native": "mergekit (bf16 math, its default)",
    "mergekit": "mergekit (`dtype: float32`)",
    "tadmerge": "**tadmerge**",
}
METHOD_LABEL = {
    "task_arithmetic": "task arithmetic",
    "ties": "TIES (per-tensor trim 20%)",
    "dare_ties": "DARE-TIES (p = 0.8)",
    "tadrop_ta": "TA + TADrop",
    "tadrop_ties": "TIES + TADrop",
    "tadrop_emr": "EMR + TADrop",
}


def gb(x) -> str:
    return "-" if x is None else f"{x / 1e9:.2f} GB"


def sec(x) -> str:
    if x is None:
        return "-"
    return f"{x:.1f} s" if x >= 10 else f"{x:.2f} s"


def ratio(x, fmt="{:.2f}x") -> str:
    return "-" if x is None else fmt.format(x)


def load(results: Path, prefix: str) -> list[dict]:
    out = []
    for p in sorted(results.glob(f"{prefix}*.json")):
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError:
            continue
        d["_file"] = p.name
        out.append(d)
    return out


def _machine(d: dict) -> str:
    m = d.get("machine", {})
    return (
        f"{m.get('cpu_model', '?')}, {m.get('cpu_affinity', '?')} cores, "
        f"{(m.get('mem_total_bytes') or 0) / 2**30:.0f} GiB RAM, torch {m.get('torch')}, "
        f"load average at start {tuple(round(x, 1) for x in m.get('loadavg_at_start', []))}"
    )


def _load(runs: list[dict]) -> str:
    """Mean 1-minute load average when the runs started (the machine is shared)."""
    loads = [x["loadavg_before"] for x in runs if x.get("loadavg_before") is not None]
    return f"{sum(loads) / len(loads):.1f}" if loads else "-"


def tool_label(tool: str) -> str:
    if tool.startswith("tadmerge:"):
        return f"**tadmerge** (memory_budget {tool.partition(':')[2]})"
    if tool == "tadmerge":
        return "**tadmerge** (defaults: memory_budget 512MB, workers auto)"
    return TOOL_LABEL.get(tool, tool)


def _is_cold(d: dict) -> bool:
    """Whether a comparison ran with the page cache dropped before every run."""
    return str(d["settings"].get("page_cache", "")).startswith("cold")


def _header(d: dict) -> str:
    ds, st = d["dataset"], d["settings"]
    cache = "cold page cache" if _is_cold(d) else "warm"
    return (
        f"**{ds['params_human']} parameters, K = {ds['tasks']} fine-tunes, {ds['dtype']}, "
        f"{cache}** (`{d['_file']}`, {st['reps']} repetition(s), medians; {d['created']}, "
        f"git {d.get('git_rev')}; {_machine(d)})\n"
    )


def compare_tables(runs: list[dict]) -> str:
    parts = []
    for d in runs:
        io = d["io_limit"]
        parts.append(_header(d))
        versions = sorted(
            {
                r.get("code_version") or "?"
                for m in d["methods"].values()
                for t, x in m["tools"].items()
                if t.startswith("tadmerge")
                for r in x["runs"]
            }
        )
        if versions:
            parts.append(
                f"tadmerge code measured: {', '.join(versions)}"
                + (" (MIXED: the engine changed during the run)" if len(versions) > 1 else "")
                + ".\n"
            )
        rd = f"; O_DIRECT read {sec(io.get('read_direct_s'))}" if io.get("read_direct_s") else ""
        cold = _is_cold(d)
        parts.append(
            f"I/O limit: {sec(io['total_s'])} = read {gb(io['input_bytes'])} "
            f"{sec(io['read_s'])} ({'after dropping the page cache' if cold else 'warm'}) "
            f"+ write {gb(io['output_bytes'])} {sec(io['write_s'])} "
            f"+ fsync {sec(io['fsync_s'])}{rd}.\n"
        )
        parts.append(
            "| method | tool | wall | + flush | CPU (user+sys) | peak RSS (tree) "
            "| peak anon RSS | vs I/O limit | load avg |"
        )
        parts.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        ratio_rows = []
        for method, r in d["methods"].items():
            rat = r["ratios"]
            for tool, t in r["tools"].items():
                m = t["median"]
                la = _load(t["runs"])
                fail = "" if m["reps_ok"] == m["reps"] else f" ({m['reps'] - m['reps_ok']} failed)"
                parts.append(
                    f"| {METHOD_LABEL.get(method, method)} | {tool_label(tool)}{fail} "
                    f"| {sec(m['wall_s'])} | {sec(m['flush_s'])} | {sec(m['cpu_s'])} "
                    f"| {gb(m['peak_rss_bytes'])} | {gb(m['peak_anon_bytes'])} "
                    f"| {ratio(rat.get(f'{tool}_vs_io_limit'), '{:.1f}x')} | {la} |"
                )
            for key, v in rat.items():
                if ":speedup_vs_" in key:
                    td, _, mk = key.partition(":speedup_vs_")
                    ratio_rows.append(
                        f"| {METHOD_LABEL.get(method, method)} | {tool_label(td)} "
                        f"| {tool_label(mk)} | {ratio(v)} "
                        f"| {ratio(rat.get(f'{td}:cpu_ratio_vs_{mk}'))} "
                        f"| {ratio(rat.get(f'{td}:rss_ratio_vs_{mk}'))} "
                        f"| {ratio(rat.get(f'{td}:anon_ratio_vs_{mk}'))} |"
                    )
        parts.append("")
        if ratio_rows:
            parts.append(
                "| method | tadmerge | vs | speedup (wall) | CPU ratio | peak RSS ratio "
                "| peak anon ratio |"
            )
            parts.append("|---|---|---|---:|---:|---:|---:|")
            parts += ratio_rows
            parts.append("")
    return "\n".join(parts) if parts else "_no results yet_\n"


def agreement_tables(runs: list[dict]) -> str:
    parts = []
    for d in runs:
        ag = d.get("agreement") or {}
        if not ag:
            continue
        parts.append(f"`{d['_file']}` ({d['dataset']['dtype']} checkpoints):\n")
        parts.append("| merge | entries | bit-identical | differ by > 1 bf16 ulp | max abs diff |")
        parts.append("|---|---:|---:|---:|---:|")
        for key, a in ag.items():
            if "error" in a or "n" not in a:
                parts.append(f"| {key} | {a.get('error', 'names differ')} | | | |")
                continue
            same = 1 - a["frac_differ"]
            b1 = a.get("n_beyond_1ulp")
            b1s = "-" if b1 is None else f"{b1:,} ({b1 / a['n']:.2e})"
            parts.append(f"| {key} | {a['n']:,} | {same:.4%} | {b1s} | {a['max_abs']:.3g} |")
        parts.append("")
    return "\n".join(parts) if parts else "_no results yet_\n"


def targets_table(runs: list[dict]) -> str:
    rows = ["| target | measured | met |", "|---|---|:-:|"]
    for d in runs:
        meth, io = d["methods"], d["io_limit"]
        tag = f"{d['dataset']['params_human']} K={d['dataset']['tasks']} {d['dataset']['dtype']}"
        if _is_cold(d):
            tag += " cold"
        ties = meth.get("ties", {}).get("ratios", {})
        for key, sp in ties.items():
            if ":speedup_vs_" not in key:
                continue
            td, _, mk = key.partition(":speedup_vs_")
            rs = ties.get(f"{td}:rss_ratio_vs_{mk}")
            rows.append(
                f"| {tag}: TIES, {tool_label(td)} >= 5x faster than {tool_label(mk)} "
                f"| {sp:.2f}x | {'yes' if sp >= 5 else 'NO'} |"
            )
            rows.append(
                f"| {tag}: TIES, {tool_label(td)} peak RSS <= 0.5x {tool_label(mk)} "
                f"| {rs:.2f}x | {'yes' if rs <= 0.5 else 'NO'} |"
            )
        ta = meth.get("task_arithmetic", {})
        for tool, t in ta.get("tools", {}).items():
            v = ta["ratios"].get(f"{tool}_vs_io_limit")
            if not tool.startswith("tadmerge") or v is None:
                continue
            rows.append(
                f"| {tag}: task arithmetic, {tool_label(tool)} <= 2x the I/O limit "
                f"({sec(io['total_s'])}) | {v:.2f}x ({sec(t['median']['wall_flushed_s'])}) "
                f"| {'yes' if v <= 2 else 'NO'} |"
            )
            t_td = meth.get("tadrop_ta", {}).get("tools", {}).get(tool)
            if t_td and t["median"]["wall_s"] and t_td["median"]["wall_s"]:
                extra = t_td["median"]["wall_s"] - t["median"]["wall_s"]
                one = io.get("read_direct_s") or io["read_s"]
                kind = "O_DIRECT, cold" if io.get("read_direct_s") else "warm"
                rows.append(
                    f"| {tag}: TADrop adds <= one read of the inputs ({kind}: {sec(one)}; "
                    f"buffered, {'cold' if _is_cold(d) else 'warm'}: {sec(io['read_s'])}) "
                    f"| +{sec(extra)} (TA {sec(t['median']['wall_s'])}"
                    f" -> TA + TADrop {sec(t_td['median']['wall_s'])}) "
                    f"| {'yes' if extra <= one else 'NO'} |"
                )
    return "\n".join(rows) + "\n" if len(rows) > 2 else "_no results yet_\n"


def scaling_tables(runs: list[dict]) -> str:
    parts = []
    for d in runs:
        st = d["settings"]
        parts.append(
            f"`{d['_file']}`: memory_budget {st['memory_budget']}, {st['dtype']}, "
            f"{st['reps']} repetition(s); {d['created']}, git {d.get('git_rev')}; "
            f"{_machine(d)}\n"
        )
        for title, key in (
            (f"Against model size (K = {st['k_at_size']})", "size_sweep"),
            (f"Against K ({st['k_sweep_size']})", "k_sweep"),
        ):
            pts = d.get(key) or []
            if not pts:
                continue
            parts.append(f"{title}:\n")
            parts.append(
                "| params | K | method | wall | vs I/O limit | CPU | peak RSS "
                "| peak anon RSS | inputs | cache | load avg |"
            )
            parts.append("|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---:|")
            for p in pts:
                label = METHOD_LABEL.get(p["method"], p["method"])
                parts.append(
                    f"| {p['params_human']} | {p['k']} | {label} "
                    f"| {sec(p['wall_s'])} | {ratio(p['vs_io_limit'], '{:.1f}x')} "
                    f"| {sec(p['cpu_s'])} | {gb(p['peak_rss_bytes'])} | {gb(p['peak_anon_bytes'])} "
                    f"| {gb(p['input_bytes'])} | {p['cache']} | {_load(p['runs'])} |"
                )
            parts.append("")
        versions = sorted(
            {
                v
                for key in ("size_sweep", "k_sweep")
                for p in d.get(key) or []
                for v in p.get("code_versions", [])
            }
        )
        if versions:
            parts.append(f"tadmerge code measured: {', '.join(versions)}.\n")
        fl = d.get("rss_flat") or {}
        if fl.get("max_bytes"):
            parts.append(
                f"Peak RSS over the size sweep: {gb(fl['min_bytes'])} .. "
                f"{gb(fl['max_bytes'])} (max/min {fl['max_over_min']:.2f}), "
                f"budget {st['memory_budget']}.\n"
            )
    return "\n".join(parts) if parts else "_no results yet_\n"


METHODS_COMMAND = (
    "nice -n 10 python benchmarks/compare_methods.py "
    "--data /work/bench-data/llama-271M-k3-bf16 --reps 3"
)


def _agreement(row: dict) -> str:
    """How the two outputs compare: equal, the share of entries that differ, or random."""
    ag = row.get("agreement")
    if row.get("random"):
        return "random draws (never bit-equal)"
    if not ag or "error" in ag or not ag.get("same_names", True):
        return "-" if not ag else "not compared"
    if ag.get("n_differ") == 0:
        return "bit-equal"
    return f"{100 * ag['frac_differ']:.2f}% of entries differ (max {ag['max_abs']:.2g})"


def methods_tables(runs: list[dict]) -> str:
    """compare_methods.py: every mergekit method, the two tools side by side."""
    if not runs:
        return f"_no results yet: `{METHODS_COMMAND}`, then `python benchmarks/make_table.py`_\n"
    parts = []
    for d in runs:
        ds, st = d["dataset"], d["settings"]
        parts.append(
            f"**{ds['params_human']} parameters, K = {ds['tasks']} fine-tunes, {ds['dtype']}, "
            f"warm** (`{d['_file']}`, {st['reps']} repetition(s), medians, the tools "
            f"alternating; {d['created']}, git {d.get('git_rev')}; {_machine(d)})\n"
        )
        parts.append(
            "| mergekit method | tadmerge | wall: tadmerge | wall: mergekit | speedup | "
            "peak RSS: tadmerge | peak RSS: mergekit | outputs |"
        )
        parts.append("|---|---|--:|--:|--:|--:|--:|---|")
        for method, row in d["methods"].items():
            td = row["tools"].get("tadmerge", {}).get("median", {})
            mk = row["tools"].get("mergekit", {}).get("median", {})
            parts.append(
                f"| `{method}` | {'yes' if row['supported'] else 'not supported yet'} | "
                f"{sec(td.get('wall_s'))} | {sec(mk.get('wall_s'))} | "
                f"{ratio(row.get('speedup'))} | {gb(td.get('peak_rss_bytes'))} | "
                f"{gb(mk.get('peak_rss_bytes'))} | {_agreement(row)} |"
            )
        parts.append("")
    return "\n".join(parts)


def render(results: Path) -> dict[str, str]:
    cmp_runs = load(results, "compare_mergekit_")
    return {
        "methods": methods_tables(load(results, "methods_vs_mergekit")),
        "compare": compare_tables(cmp_runs),
        "agreement": agreement_tables(cmp_runs),
        "targets": targets_table(cmp_runs),
        "scaling": scaling_tables(load(results, "scaling_")),
    }


def splice(doc: str, blocks: dict[str, str]) -> str:
    for name, body in blocks.items():
        pat = re.compile(
            rf"(<!-- BEGIN GENERATED: {name} -->\n).*?(<!-- END GENERATED: {name} -->)", re.S
        )
        if not pat.search(doc):
            doc += f"\n<!-- BEGIN GENERATED: {name} -->\n<!-- END GENERATED: {name} -->\n"
        doc = pat.sub(lambda m, b=body: m.group(1) + b.rstrip() + "\n" + m.group(2), doc)
    return doc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=RESULTS_DIR)
    ap.add_argument("--doc", type=Path, default=REPO / "docs" / "benchmarks.md")
    ap.add_argument("--print", action="store_true")
    a = ap.parse_args(argv)
    blocks = render(a.results)
    if a.print:
        for name, body in blocks.items():
            print(f"## {name}\n\n{body}")
        return 0
    doc = a.doc.read_text() if a.doc.exists() else "# Benchmarks\n"
    a.doc.write_text(splice(doc, blocks))
    print(f"[make_table] wrote {a.doc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
