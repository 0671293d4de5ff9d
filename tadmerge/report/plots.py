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
        hint = (
            ""
            if p.name == REPORT_NAME
            else " (give a merge output directory or its merge_report.json)"
        )
        raise InputError(
            InputProblem(str(p), None, f"unreadable merge report: {exc}{hint}")
        ) from exc
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
#
# Every figure is sized from its content so that it reads at its natural size (1 inch = DPI
# pixels): heat-map cells wide enough for their number, long layer axes wrapped into several
# rows of panels, titles wrapped to the figure's width, and tick labels that would overlap
# another thinned out after layout (measured with the renderer, not guessed).

DPI = 110
MAX_LAYER_COLUMNS = 16  # columns (layers) per row of panels in droprate_by_layer.png
CELL_W, CELL_H = 0.46, 0.28  # inches per heat-map cell: room for "0.17" at CELL_FONT
CELL_FONT = 7.5
TITLE_FONT = 11


def _matplotlib():
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - exercised only without matplotlib
        raise ImportError(
            "drawing merge reports needs matplotlib: pip install 'tadmerge[plots]' "
            "(or pip install matplotlib)"
        ) from exc
    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def new_figure(**kw: Any) -> Any:
        fig = Figure(layout="constrained", dpi=DPI, **kw)
        FigureCanvasAgg(fig)
        return fig

    return new_figure


def _wrap(text: str, width_in: float, fontsize: float) -> str:
    """`text` broken into lines that fit `width_in` inches at `fontsize` points."""
    import textwrap

    chars = max(20, int(width_in * 72 / (fontsize * 0.6)))
    return "\n".join(textwrap.wrap(text, chars, break_on_hyphens=False)) or text


def _suptitle(fig: Any, head: str, what: str) -> None:
    """The figure's title on its first line, the merge it describes below, both wrapped
    to the figure's width."""
    width = fig.get_figwidth() - 0.3
    fig.suptitle(
        _wrap(head, width, TITLE_FONT) + "\n" + _wrap(what, width, TITLE_FONT),
        fontsize=TITLE_FONT,
    )


def _thin_ticklabels(fig: Any) -> None:
    """Hide every tick label that would overlap the previous one kept, on every axis of
    every panel, measured in pixels after the layout has run."""
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
            kept = None
            for lab in labels:
                if not lab.get_visible() or not lab.get_text():
                    continue
                box = lab.get_window_extent(renderer).expanded(1.0, 1.0).padded(2)
                if kept is not None and box.overlaps(kept):
                    lab.set_visible(False)
                else:
                    kept = box


def _save(fig: Any, path: Path) -> None:
    fig.savefig(path, dpi=DPI)


def _columns(dr: DropRates) -> list[str]:
    present = {k.column for k in dr.kinds.values()}
    return (
        (["emb"] if "emb" in present else [])
        + [str(i) for i in dr.layers]
        + (["top"] if "top" in present else [])
    )


def _chunks(cols: list[str], most: int) -> list[list[str]]:
    """`cols` in rows of at most `most`, as even as possible (33 layers: 17 + 16)."""
    n = max(1, math.ceil(len(cols) / most))
    size = math.ceil(len(cols) / n)
    return [cols[i : i + size] for i in range(0, len(cols), size)]


def _heatmap_by_layer(new_figure, dr: DropRates, what: str) -> Any:
    """Fig. 6 / appendix figure: tensor type x layer, one panel per task (stacked), each
    panel's layers wrapped into rows of at most MAX_LAYER_COLUMNS, every cell numbered."""
    rows = sorted({k.label for k in dr.kinds.values()}, key=_type_rank)
    chunks = _chunks(_columns(dr), MAX_LAYER_COLUMNS)
    width_cols = max(len(c) for c in chunks)
    label_w = 0.2 + 0.075 * max(len(r) for r in rows)
    panel_h = CELL_H * len(rows) + 0.75
    fig = new_figure(
        figsize=(
            max(5.5, label_w + CELL_W * width_cols + 1.1),
            panel_h * len(dr.tasks) * len(chunks) + 0.9,
        )
    )
    axes = fig.subplots(len(dr.tasks) * len(chunks), 1, squeeze=False)[:, 0]
    im = None
    for i, task in enumerate(dr.tasks):
        cell: dict[tuple[str, str], list[float]] = defaultdict(list)
        for n, d in dr.rate[task].items():
            k = dr.kinds[n]
            cell[(k.label, k.column)].append(d)
        for j, cols in enumerate(chunks):
            ax = axes[i * len(chunks) + j]
            padded = cols + [""] * (width_cols - len(cols))  # equal cell widths in every row
            grid = [
                [sum(cell[(r, c)]) / len(cell[(r, c)]) if cell.get((r, c)) else math.nan
                 for c in padded]
                for r in rows
            ]  # fmt: skip
            im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
            part = f", layers {cols[0]} to {cols[-1]}" if len(chunks) > 1 else ""
            ax.set_title(f"{task} (overall {dr.overall(task):.0%}){part}", fontsize=9, loc="left")
            ax.set_xticks(range(len(padded)), padded, fontsize=8)
            ax.set_yticks(range(len(rows)), rows, fontsize=8)
            if j == len(chunks) - 1:
                ax.set_xlabel("layer", fontsize=8)
            for r in range(len(rows)):
                for c in range(len(padded)):
                    v = grid[r][c]
                    if not math.isnan(v):
                        ax.text(c, r, f"{v:.2f}", ha="center", va="center",
                                fontsize=CELL_FONT, color="w" if v < 0.6 else "k")  # fmt: skip
    if im is not None:
        fig.colorbar(im, ax=list(axes), shrink=min(0.9, 4.0 / fig.get_figheight()),
                     label="drop rate", aspect=30)  # fmt: skip
    _suptitle(fig, "Drop rate per tensor type and layer", what)
    return fig


def _heatmap_by_task(new_figure, dr: DropRates, what: str) -> Any:
    """Fig. 5: task x tensor (model order), the inter-task 'landscape'. Layer groups are
    marked by lines and labelled at their middle (labels that would collide thinned)."""
    grid = [[dr.rate[t].get(n, math.nan) for n in dr.names] for t in dr.tasks]
    name_w = 0.3 + 0.075 * max(len(t) for t in dr.tasks)
    fig = new_figure(
        figsize=(
            min(16.0, max(7.0, name_w + 1.6 + 0.05 * len(dr.names))),
            1.9 + 0.4 * len(dr.tasks),
        )  # fmt: skip
    )
    ax = fig.subplots()
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(dr.tasks)), dr.tasks, fontsize=8)
    starts: list[tuple[int, str]] = []
    for i, n in enumerate(dr.names):
        col = dr.kinds[n].column
        if not starts or starts[-1][1] != col:
            starts.append((i, col))
    ends = [s for s, _ in starts[1:]] + [len(dr.names)]
    ticks = [(s + e - 1) / 2 for (s, _), e in zip(starts, ends, strict=True)]
    ax.set_xticks(ticks, [c for _, c in starts], fontsize=8)
    ax.tick_params(axis="x", length=0)
    for s, _ in starts[1:]:
        ax.axvline(s - 0.5, color="w", lw=0.8)
    ax.set_xlabel("tensor in model order, grouped by layer (emb: embeddings, top: after the "
                  "blocks)", fontsize=8)  # fmt: skip
    fig.colorbar(im, ax=ax, label="drop rate", shrink=0.9)
    _suptitle(fig, "Drop rate per task and tensor", what)
    return fig


def _by_type(new_figure, dr: DropRates, what: str) -> Any:
    """Mean drop rate per tensor type, one bar per task (how consistent the pattern is).
    Horizontal bars: the type names read level, however many there are."""
    types = sorted({k.label for k in dr.kinds.values()}, key=_type_rank)
    k = max(1, len(dr.tasks))
    height = 0.8 / k
    label_w = 0.3 + 0.075 * max(len(t) for t in types)
    fig = new_figure(figsize=(max(7.0, label_w + 5.5), 1.6 + len(types) * (0.12 + 0.13 * k)))
    ax = fig.subplots()
    top = 0.0
    for j, task in enumerate(dr.tasks):
        means = []
        for ty in types:
            v = [d for n, d in dr.rate[task].items() if dr.kinds[n].label == ty]
            means.append(sum(v) / len(v) if v else math.nan)
        top = max([top] + [m for m in means if not math.isnan(m)])
        ax.barh(
            [i + (j - (k - 1) / 2) * height for i in range(len(types))],
            means,
            height=height,
            label=task,
        )
    ax.set_yticks(range(len(types)), types, fontsize=8)
    ax.invert_yaxis()  # model order, top to bottom
    ax.set_xlim(0, min(1.0, max(0.05, top * 1.15)))  # the bars' own range, not 0..1
    ax.set_xlabel("mean drop rate over the tensors of the type")
    ax.grid(axis="x", lw=0.4, alpha=0.5)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="task")
    _suptitle(fig, "Mean drop rate per tensor type", what)
    return fig


def _distribution(new_figure, dr: DropRates, what: str) -> Any:
    """Spread of per-tensor drop rates per task (box) and all tasks together (histogram)."""
    fig = new_figure(figsize=(max(6.0, 1.0 + 0.8 * len(dr.tasks)) + 4.0, 4.0))
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
    _suptitle(fig, "Distribution of drop rates", what)
    return fig


def _emr_rescalers(new_figure, report: dict[str, Any], what: str) -> Any | None:
    resc = (report.get("emr") or {}).get("rescalers") or {}
    if not resc:
        return None
    fig = new_figure(figsize=(max(5.0, 0.7 * len(resc) + 1.5), 3.4))
    ax = fig.subplots()
    ax.bar(list(resc), [float(v) for v in resc.values()], color="tab:green")
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_ylabel("EMR rescaler lambda_k")
    ax.tick_params(axis="x", labelrotation=30)
    _suptitle(fig, "EMR rescalers", what)
    return fig


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


NO_SPARSIFIER = "no sparsifier: no drop-rate plots (every entry of every task vector was kept)"


def has_sparsifier(report: dict[str, Any]) -> bool:
    sp = (report.get("config") or {}).get("sparsify") or {}
    return sp.get("method", "none") != "none"


def figures(report: dict[str, Any]) -> dict[str, Any]:
    """The report's figures, {file name: matplotlib Figure}, laid out but not saved:
    the drop-rate figures when a sparsifier ran, the EMR rescalers for EMR."""
    new_figure = _matplotlib()
    what = _describe(report)
    out: dict[str, Any] = {}
    dr = drop_rates(report)
    if has_sparsifier(report) and dr.tasks:
        out["droprate_by_layer.png"] = _heatmap_by_layer(new_figure, dr, what)
        out["droprate_by_task.png"] = _heatmap_by_task(new_figure, dr, what)
        out["droprate_by_type.png"] = _by_type(new_figure, dr, what)
        out["droprate_distribution.png"] = _distribution(new_figure, dr, what)
    emr = _emr_rescalers(new_figure, report, what)
    if emr is not None:
        out["emr_rescalers.png"] = emr
    for fig in out.values():
        _thin_ticklabels(fig)
    return out


@dataclass
class Rendered:
    """What `tadmerge report` wrote: the PNGs, the HTML page, and notes for the user."""

    pngs: list[str]
    html: str
    notes: list[str]


def default_dir(output_dir: str | Path) -> Path:
    """Beside the output, not in it (OUT-report): an output holds exactly the files its
    manifest lists, so that `--overwrite` may replace it and `verify` checks it whole."""
    src = Path(output_dir)
    base = src.parent if src.is_file() else src
    base = base.resolve()
    return base.parent / f"{base.name}-report"


def render_report(output_dir: str, to: str | None = None) -> Rendered:
    """Draw the figures of one merge into `to` (default OUT-report, beside the output)
    and write report.html, which shows them with the report's key numbers.

    A merge without a sparsifier gets no drop-rate figures (a note says so). Raises
    InputError if the report is missing or unreadable, or a sparsifier ran but the report
    records no drop rate; ImportError without matplotlib.
    """
    from tadmerge.errors import InputError, InputProblem

    report = load_report(output_dir)
    dr = drop_rates(report)
    notes: list[str] = []
    if not has_sparsifier(report):
        notes.append(NO_SPARSIFIER)
    elif not dr.tasks:
        raise InputError(
            InputProblem(
                str(output_dir),
                None,
                "the report records no drop rates (merge without sparsification?); nothing to plot",
            )
        )
    figs = figures(report)
    out = Path(to) if to else default_dir(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pngs = []
    for name, fig in figs.items():
        _save(fig, out / name)
        pngs.append(str(out / name))
    html = out / "report.html"
    html.write_text(_html(report, output_dir, list(figs), notes), encoding="utf-8")
    return Rendered(pngs, str(html), notes)


def draw_report(output_dir: str, to: str | None = None) -> list[str]:
    """Draw the figures of one merge and return the PNG paths (render_report also
    writes report.html). Default destination: OUT-report, beside the output."""
    return render_report(output_dir, to).pngs


_CAPTIONS = {
    "droprate_by_layer.png": "Mean drop rate per tensor type (rows) and layer (columns), per task.",
    "droprate_by_task.png": "Drop rate of every merged tensor (model order) for every task.",
    "droprate_by_type.png": "Mean drop rate per tensor type, one bar per task.",
    "droprate_distribution.png": "Per-tensor drop rates: spread per task, and all together.",
    "emr_rescalers.png": "EMR rescaler of each task (1 = the task vector's own mean |τ|).",
}


def _html(report: dict[str, Any], output_dir: str, pngs: list[str], notes: list[str]) -> str:
    """report.html: the key numbers of the report, then the figures at natural size."""
    from html import escape

    cfg = report.get("config") or {}
    mib = 2**20
    facts: list[tuple[str, str]] = [("output", str(Path(output_dir).resolve()))]
    facts.append(("method", _describe(report)))
    if cfg.get("base"):
        facts.append(("base", str(cfg["base"])))
    models = cfg.get("models") or []
    if models:
        facts.append(
            ("models", ", ".join(f"{m.get('name')} (weight {m.get('weight')})" for m in models))
        )
    kinds: dict[str, int] = defaultdict(int)
    for t in (report.get("tensors") or {}).values():
        kinds[t.get("kind", "?")] += 1
    words = {"merge": "merged", "copy": "copied", "exclude": "excluded"}
    facts.append(("tensors", ", ".join(f"{n} {words.get(k, k)}" for k, n in sorted(kinds.items()))))
    for key, label in (("input_bytes", "inputs"), ("output_bytes", "output")):
        if report.get(key):
            facts.append((label, f"{report[key] / mib:.2f} MiB"))
    t = (report.get("timings") or {}).get("total_s")
    if t is not None:
        rss = report.get("peak_rss_bytes")
        facts.append(
            ("merge time", f"{t:.1f} s" + (f", peak RSS {rss / mib:.0f} MiB" if rss else ""))
        )
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in facts)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>tadmerge report: {escape(Path(output_dir).name)}</title>",
        "<style>body{font-family:sans-serif;margin:1.5em;max-width:none}"
        "table{border-collapse:collapse;margin:0.5em 0 1.5em}"
        "th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}"
        "td.n{text-align:right;font-variant-numeric:tabular-nums}"
        "figure{margin:1.5em 0}img{max-width:none}</style></head><body>",
        f"<h1>Merge report: {escape(Path(output_dir).name)}</h1>",
        f"<table>{rows}</table>",
    ]
    parts += [f"<p><b>{escape(n)}</b></p>" for n in notes]
    dr = drop_rates(report)
    if has_sparsifier(report) and dr.tasks:
        summary = summarize(report)["tasks"]
        resc = (report.get("emr") or {}).get("rescalers") or {}
        head = "<tr><th>task</th><th>overall drop</th><th>min</th><th>mean</th><th>max</th>"
        head += "<th>EMR rescaler</th></tr>" if resc else "</tr>"
        body = ""
        for task in dr.tasks:
            s = summary[task]
            body += (
                f"<tr><td>{escape(task)}</td><td class=n>{s['overall_drop']:.1%}</td>"
                f"<td class=n>{s['min']:.3f}</td><td class=n>{s['mean_tensor_drop']:.3f}</td>"
                f"<td class=n>{s['max']:.3f}</td>"
                + (f"<td class=n>{float(resc[task]):.4f}</td>" if task in resc else "")
                + "</tr>"
            )
        parts += [
            "<h2>Drop rates per task</h2>",
            "<p>overall: size-weighted over every merged entry; min / mean / max: over tensors."
            "</p>",
            f"<table>{head}{body}</table>",
        ]
    for name in pngs:
        parts.append(
            f"<figure><img src='{escape(name)}' alt='{escape(name)}'>"
            f"<figcaption>{escape(_CAPTIONS.get(name, name))}</figcaption></figure>"
        )
    parts.append("</body></html>\n")
    return "\n".join(parts)
