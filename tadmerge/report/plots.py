"""Drop-rate figures of a merge, in the manner of the TADrop paper's Figures 5-7.

The merge writes, per mergeable tensor and task, the drop rate its sparsifier used
(``merge_report.json``, format ``tadmerge-report/1``). These figures show what the paper shows
with them: how the rate differs between tasks (inter-task adaptivity, Fig. 5), between tensor
types and layers of one model (intra-model adaptivity, Fig. 6 and the appendix figure), and how
the rates are distributed. They are drawn from the report alone, so they can be made for any merge
after the fact, without the checkpoints.

Tensor types are recognised from their names for BERT-, GPT-2-, CLIP/ViT- and Llama-style models
(query/key/value or fused attn_in, attn_out, mlp_in, mlp_out, the norms, embeddings, biases);
anything else is "other". matplotlib is imported only when drawing, so the engine does not need it.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPORT_NAME = "merge_report.json"
REPORT_FORMAT = "tadmerge-report/1"

_LAYER_RE = re.compile(r"(?:^|\.)(?:layer|layers|h|blocks|resblocks|block)\.(\d+)(?:\.|$)")
# Order matters: the first pattern that matches names the type.
_TYPE_RULES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(pat))
    for kind, pat in (
        (
            "attn_norm",
            r"(attention\.output\.LayerNorm|input_layernorm|\bln_1\b|\bnorm1\b|"
            r"attention_norm|ln_attn)",
        ),
        (
            "mlp_norm",
            r"(output\.LayerNorm|post_attention_layernorm|\bln_2\b|\bnorm2\b|"
            r"ffn_norm|ln_mlp)",
        ),
        ("norm", r"(LayerNorm|layernorm|layer_norm|\bln_\w+|\bnorm\b|\bln_f\b|final_norm)"),
        ("pos_embed", r"(position|\bwpe\b|positional_embedding)"),
        ("type_embed", r"token_type"),
        ("embed", r"(embed|\bwte\b|cls_token|class_embedding|patch|conv1)"),
        ("attn_in", r"(in_proj|c_attn|\bqkv\b|query_key_value|Wqkv)"),
        ("query", r"(\bquery\b|q_proj|\bq\b|\bwq\b)"),
        ("key", r"(\bkey\b|k_proj|\bk\b|\bwk\b)"),
        ("value", r"(\bvalue\b|v_proj|\bv\b|\bwv\b)"),
        (
            "attn_out",
            r"(attention\.output\.dense|o_proj|out_proj|attn\.c_proj|attn\.proj|"
            r"self_attn\.dense|attention\.dense|\bwo\b)",
        ),
        (
            "mlp_in",
            r"(intermediate\.dense|up_proj|gate_proj|c_fc|\bfc1\b|dense_h_to_4h|"
            r"\bw1\b|\bw3\b|mlp\.lin1)",
        ),
        (
            "mlp_out",
            r"(output\.dense|down_proj|mlp\.c_proj|\bfc2\b|dense_4h_to_h|\bw2\b|"
            r"mlp\.lin2)",
        ),
        ("pooler", r"pooler"),
        ("head", r"(lm_head|classifier|\bhead\b|score)"),
    )
)
TYPE_ORDER = (
    "embed",
    "pos_embed",
    "type_embed",
    "query",
    "key",
    "value",
    "attn_in",
    "attn_out",
    "attn_norm",
    "mlp_in",
    "mlp_out",
    "mlp_norm",
    "norm",
    "pooler",
    "head",
    "other",
)


@dataclass(frozen=True)
class TensorKind:
    """Where a tensor sits: its layer (None outside the blocks) and its type label."""

    layer: int | None
    kind: str  # e.g. "query", "mlp_in", "embed"
    part: str  # "w" (weight), "b" (bias) or "" (other)
    column: str  # figure column: the layer index, "emb" (before the blocks) or "top" (after)

    @property
    def label(self) -> str:
        return f"{self.kind}.{self.part}" if self.part else self.kind


def classify(name: str) -> TensorKind:
    """The layer and type of a tensor, from its name alone."""
    m = _LAYER_RE.search(name)
    layer = int(m.group(1)) if m else None
    kind = next((k for k, pat in _TYPE_RULES if pat.search(name)), "other")
    if kind in ("attn_norm", "mlp_norm") and layer is None:
        kind = "norm"
    leaf = name.rsplit(".", 1)[-1]
    part = (
        "w"
        if leaf in ("weight", "gamma") or leaf.endswith("_weight")
        else ("b" if leaf in ("bias", "beta") or leaf.endswith("_bias") else "")
    )
    if layer is not None:
        column = str(layer)
    elif kind.endswith("embed") or "embed" in name:
        column = "emb"  # embeddings and their LayerNorm come before the blocks
    else:
        column = "top"
    return TensorKind(layer, kind, part, column)


def _type_rank(label: str) -> tuple[int, int]:
    kind, _, part = label.partition(".")
    rank = TYPE_ORDER.index(kind) if kind in TYPE_ORDER else len(TYPE_ORDER)
    return (rank, {"w": 0, "b": 1}.get(part, 2))


# ---------------------------------------------------------------------------------------------
# Reading the report


def load_report(path: str | Path) -> dict[str, Any]:
    """A merge report from an output directory or the JSON file itself."""
    from tadmerge.errors import InputError, InputProblem

    p = Path(path)
    if p.is_dir():
        p = p / REPORT_NAME
    if not p.is_file():
        raise InputError(InputProblem(str(p), None, "no merge report here (merge_report.json)"))
    try:
        report = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(InputProblem(str(p), None, f"unreadable merge report: {exc}")) from exc
    if not isinstance(report, dict) or "tensors" not in report:
        raise InputError(InputProblem(str(p), None, "not a tadmerge merge report (no 'tensors')"))
    fmt = report.get("format")
    if fmt is not None and fmt != REPORT_FORMAT:
        raise InputError(
            InputProblem(str(p), None, f"report format {fmt!r}, expected {REPORT_FORMAT!r}")
        )
    return report


@dataclass
class DropRates:
    """Per task, per merged tensor: drop rate and size; the tensors in model order."""

    tasks: list[str]
    names: list[str]  # merged tensors with a drop rate, model order
    kinds: dict[str, TensorKind]
    rate: dict[str, dict[str, float]]  # task -> tensor -> drop rate
    size: dict[str, int]  # tensor -> n

    @property
    def layers(self) -> list[int]:
        return sorted({k.layer for k in self.kinds.values() if k.layer is not None})

    def overall(self, task: str) -> float:
        """Fraction of all merged entries of the task that were dropped (size-weighted)."""
        tot = sum(self.size[n] for n in self.rate[task])
        return sum(self.rate[task][n] * self.size[n] for n in self.rate[task]) / max(tot, 1)


def _model_order(name: str, kind: TensorKind) -> tuple:
    col = {"emb": -1, "top": 10**6}.get(kind.column, kind.layer)
    return (col, _type_rank(kind.label), name)


def drop_rates(report: dict[str, Any]) -> DropRates:
    """The drop rates of every merged tensor and task found in a report."""
    tensors: dict[str, Any] = report.get("tensors", {})
    tasks = list(report.get("tasks") or [])
    rate: dict[str, dict[str, float]] = defaultdict(dict)
    size: dict[str, int] = {}
    for name, info in tensors.items():
        if info.get("kind", "merge") != "merge":
            continue
        for task, st in (info.get("tasks") or {}).items():
            d = st.get("drop_rate") if isinstance(st, dict) else None
            if d is None or (isinstance(d, float) and math.isnan(d)):
                continue
            rate[task][name] = float(d)
            size[name] = int(info.get("n") or math.prod(info.get("shape") or [1]))
            if task not in tasks:
                tasks.append(task)
    tasks = [t for t in tasks if t in rate]
    kinds = {n: classify(n) for n in size}
    names = sorted(size, key=lambda n: _model_order(n, kinds[n]))
    return DropRates(tasks, names, kinds, dict(rate), size)


def _energy_kept(report: dict[str, Any], task: str, names: list[str]) -> float | None:
    """||tau_hat||^2 / ||tau||^2 over ``names`` before the L2 rescale, if the report says.

    With the L2 rescale the report's per-tensor ``scale`` is ||tau|| / ||tau_hat||, so the energy
    the drop removed can be read back; it tells how much of a task vector the drop really
    touched (dropping the smallest third of a Gaussian removes only ~2% of its energy).
    """
    sp = (report.get("config") or {}).get("sparsify") or {}
    if sp.get("rescale") != "l2":
        return None
    num = den = 0.0
    for n in names:
        st = report["tensors"][n]["tasks"].get(task) or {}
        norm, scale = st.get("norm"), st.get("scale")
        if norm is None or not scale:
            return None
        num += (norm / scale) ** 2
        den += norm**2
    return num / den if den else None


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """Numbers behind the figures: per task the overall drop, mean per type, spread over tensors.

    Used by the quality benchmark's analysis; needs no matplotlib.
    """
    dr = drop_rates(report)
    out: dict[str, Any] = {
        "tasks": {},
        "types": sorted({k.label for k in dr.kinds.values()}, key=_type_rank),
    }
    for t in dr.tasks:
        vals = list(dr.rate[t].values())
        by_type: dict[str, list[float]] = defaultdict(list)
        for n, d in dr.rate[t].items():
            by_type[dr.kinds[n].label].append(d)
        blocks = [n for n in dr.rate[t] if dr.kinds[n].layer is not None]
        nb = sum(dr.size[n] for n in blocks)
        out["tasks"][t] = {
            "overall_drop": dr.overall(t),
            # the same, over the transformer blocks only (no embeddings, final norm, head)
            "overall_drop_blocks": (
                sum(dr.rate[t][n] * dr.size[n] for n in blocks) / nb if nb else None
            ),
            "energy_kept_blocks": _energy_kept(report, t, blocks),
            "mean_tensor_drop": sum(vals) / len(vals),
            "min": min(vals),
            "max": max(vals),
            "by_type": {
                k: sum(v) / len(v)
                for k, v in sorted(by_type.items(), key=lambda kv: _type_rank(kv[0]))
            },
        }
    return out


# ---------------------------------------------------------------------------------------------
# Drawing


def _matplotlib():
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - exercised only without matplotlib
        raise ImportError(
            "drawing merge reports needs matplotlib: pip install 'tadmerge[plots]' "
            "(or pip install matplotlib)"
        ) from exc
    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 4)
    return math.ceil(n / cols), cols


def _columns(dr: DropRates) -> list[str]:
    present = {k.column for k in dr.kinds.values()}
    return (
        (["emb"] if "emb" in present else [])
        + [str(i) for i in dr.layers]
        + (["top"] if "top" in present else [])
    )


def _heatmap_by_layer(Figure, dr: DropRates, path: Path, title: str) -> None:
    """Fig. 6 / appendix figure: tensor type x layer, one panel per task."""
    rows = sorted({k.label for k in dr.kinds.values()}, key=_type_rank)
    cols = _columns(dr)
    nr, nc = _grid(len(dr.tasks))
    fig = Figure(
        figsize=(max(4.0, 0.45 * len(cols) + 2.2) * nc, (0.32 * len(rows) + 1.4) * nr),
        layout="constrained",
    )
    axes = fig.subplots(nr, nc, squeeze=False)
    im = None
    for i, task in enumerate(dr.tasks):
        ax = axes[i // nc][i % nc]
        cell: dict[tuple[int, int], list[float]] = defaultdict(list)
        for n, d in dr.rate[task].items():
            k = dr.kinds[n]
            cell[(rows.index(k.label), cols.index(k.column))].append(d)
        grid = [[math.nan] * len(cols) for _ in rows]
        for (r, c), v in cell.items():
            grid[r][c] = sum(v) / len(v)
        im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_title(f"{task} (overall {dr.overall(task):.0%})", fontsize=9)
        ax.set_xticks(range(len(cols)), cols, fontsize=7)
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        ax.set_xlabel("layer", fontsize=8)
        if len(rows) * len(cols) <= 300:
            for r in range(len(rows)):
                for c in range(len(cols)):
                    if not math.isnan(grid[r][c]):
                        ax.text(
                            c,
                            r,
                            f"{grid[r][c]:.2f}",
                            ha="center",
                            va="center",
                            fontsize=5,
                            color="w" if grid[r][c] < 0.6 else "k",
                        )
    for j in range(len(dr.tasks), nr * nc):
        axes[j // nc][j % nc].set_visible(False)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.6, label="drop rate")
    fig.suptitle(title)
    fig.savefig(path, dpi=130)


def _heatmap_by_task(Figure, dr: DropRates, path: Path, title: str) -> None:
    """Fig. 5: task x tensor (model order), the inter-task 'landscape'."""
    grid = [[dr.rate[t].get(n, math.nan) for n in dr.names] for t in dr.tasks]
    fig = Figure(
        figsize=(min(18.0, 3.0 + 0.06 * len(dr.names)), 1.2 + 0.35 * len(dr.tasks)),
        layout="constrained",
    )
    ax = fig.subplots()
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(dr.tasks)), dr.tasks, fontsize=8)
    # One tick per layer block: the first tensor of each column group.
    ticks, labels, last = [], [], None
    for i, n in enumerate(dr.names):
        col = dr.kinds[n].column
        if col != last:
            ticks.append(i)
            labels.append(col)
            last = col
    ax.set_xticks(ticks, labels, fontsize=7)
    ax.set_xlabel("tensor (model order; ticks mark layer starts)")
    fig.colorbar(im, ax=ax, label="drop rate", shrink=0.8)
    ax.set_title(title)
    fig.savefig(path, dpi=130)


def _by_type(Figure, dr: DropRates, path: Path, title: str) -> None:
    """Mean drop rate per tensor type, one bar per task (how consistent the pattern is)."""
    types = sorted({k.label for k in dr.kinds.values()}, key=_type_rank)
    width = 0.8 / max(1, len(dr.tasks))
    bars = len(types) * max(1, len(dr.tasks))
    fig = Figure(figsize=(min(16.0, max(6.0, 2.0 + 0.09 * bars)), 3.6), layout="constrained")
    ax = fig.subplots()
    for j, task in enumerate(dr.tasks):
        means = []
        for ty in types:
            v = [d for n, d in dr.rate[task].items() if dr.kinds[n].label == ty]
            means.append(sum(v) / len(v) if v else math.nan)
        ax.bar(
            [i + (j - (len(dr.tasks) - 1) / 2) * width for i in range(len(types))],
            means,
            width=width,
            label=task,
        )
    ax.set_xticks(range(len(types)), types, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean drop rate")
    ax.legend(fontsize=7, ncol=min(4, len(dr.tasks)))
    ax.set_title(title)
    fig.savefig(path, dpi=130)


def _distribution(Figure, dr: DropRates, path: Path, title: str) -> None:
    """Spread of per-tensor drop rates per task (box) and all tasks together (histogram)."""
    fig = Figure(figsize=(max(6.0, 1.0 + 0.8 * len(dr.tasks)) + 4.0, 3.6), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[max(1, len(dr.tasks)), 4])
    data = [list(dr.rate[t].values()) for t in dr.tasks]
    ax1.boxplot(data)
    ax1.set_xticks(range(1, len(dr.tasks) + 1), dr.tasks, rotation=30, ha="right", fontsize=8)
    ax1.plot(
        range(1, len(dr.tasks) + 1),
        [dr.overall(t) for t in dr.tasks],
        "r^",
        label="size-weighted overall",
    )
    ax1.set_ylim(0, 1)
    ax1.set_ylabel("drop rate per tensor")
    ax1.legend(fontsize=7)
    ax2.hist([d for v in data for d in v], bins=40, range=(0, 1), color="tab:blue")
    ax2.set_xlabel("drop rate")
    ax2.set_ylabel("tensors x tasks")
    fig.suptitle(title)
    fig.savefig(path, dpi=130)


def _emr_rescalers(Figure, report: dict[str, Any], path: Path, title: str) -> bool:
    resc = (report.get("emr") or {}).get("rescalers") or {}
    if not resc:
        return False
    fig = Figure(figsize=(max(4.0, 0.7 * len(resc) + 1.5), 3.0), layout="constrained")
    ax = fig.subplots()
    ax.bar(list(resc), [float(v) for v in resc.values()], color="tab:green")
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_ylabel("EMR rescaler lambda_k")
    ax.tick_params(axis="x", labelrotation=30)
    ax.set_title(title)
    fig.savefig(path, dpi=130)
    return True


def _describe(report: dict[str, Any]) -> str:
    cfg = report.get("config") or {}
    sp = cfg.get("sparsify") or {}
    mg = cfg.get("merge") or {}
    bits = [str(mg.get("method", "?"))]
    method = sp.get("method")
    if method and method != "none":
        extra = ""
        if method == "tadrop":
            extra = f" q{sp.get('low_q', 0.5)}/q{sp.get('high_q', 0.95)}"
        bits.append(
            f"{method}{extra} ({sp.get('scope', 'tensor')}, rescale {sp.get('rescale', 'default')})"
        )
    return " + ".join(bits)


def draw_report(output_dir: str, to: str | None = None) -> list[str]:
    """Draw the drop-rate figures of one merge and return the PNG paths.

    ``output_dir`` is a merge output directory (or its merge_report.json); the PNGs go to ``to``
    (default: ``<output_dir>/plots``). Raises InputError if the report is missing or records no
    drop rate (a merge without sparsifier has nothing to draw), ImportError without matplotlib.
    """
    from tadmerge.errors import InputError, InputProblem

    report = load_report(output_dir)
    dr = drop_rates(report)
    src = Path(output_dir)
    if not dr.tasks:
        raise InputError(
            InputProblem(
                str(src),
                None,
                "the report records no drop rates (merge without sparsification?); nothing to plot",
            )
        )
    Figure = _matplotlib()
    base = src.parent if src.is_file() else src
    out = Path(to) if to else base / "plots"
    out.mkdir(parents=True, exist_ok=True)
    what = _describe(report)
    paths = [
        out / "droprate_by_layer.png",
        out / "droprate_by_task.png",
        out / "droprate_by_type.png",
        out / "droprate_distribution.png",
    ]
    _heatmap_by_layer(Figure, dr, paths[0], f"Drop rate per tensor type and layer: {what}")
    _heatmap_by_task(Figure, dr, paths[1], f"Drop rate per task and tensor: {what}")
    _by_type(Figure, dr, paths[2], f"Mean drop rate per tensor type: {what}")
    _distribution(Figure, dr, paths[3], f"Distribution of drop rates: {what}")
    emr = out / "emr_rescalers.png"
    if _emr_rescalers(Figure, report, emr, f"EMR rescalers: {what}"):
        paths.append(emr)
    return [str(p) for p in paths]
