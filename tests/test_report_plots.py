"""The drop-rate figures (tadmerge.report) from a synthetic BERT-like merge report.

No engine and no checkpoints: the report is written here, so these tests pin the report schema
the plots read (format tadmerge-report/1) and the tensor-name classification behind the figures.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tadmerge.errors import InputError
from tadmerge.report import classify, draw_report, drop_rates, summarize

TASKS = ["news20", "bbc", "twsent"]


def _bert_names(layers: int = 2) -> list[tuple[str, list[int]]]:
    h, f = 8, 32
    names = [
        ("embeddings.word_embeddings.weight", [50, h]),
        ("embeddings.position_embeddings.weight", [16, h]),
        ("embeddings.token_type_embeddings.weight", [2, h]),
        ("embeddings.LayerNorm.weight", [h]),
        ("embeddings.LayerNorm.bias", [h]),
    ]
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for sub, shape in (
            ("attention.self.query", [h, h]),
            ("attention.self.key", [h, h]),
            ("attention.self.value", [h, h]),
            ("attention.output.dense", [h, h]),
            ("intermediate.dense", [f, h]),
            ("output.dense", [h, f]),
        ):
            names += [(p + sub + ".weight", shape), (p + sub + ".bias", shape[:1])]
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            names += [(p + ln + ".weight", [h]), (p + ln + ".bias", [h])]
    names += [("pooler.dense.weight", [h, h]), ("pooler.dense.bias", [h])]
    return names


def _llama_names(layers: int) -> list[tuple[str, list[int]]]:
    h, f = 8, 16
    names = [("model.embed_tokens.weight", [64, h])]
    for i in range(layers):
        p = f"model.layers.{i}."
        for sub, shape in (
            ("self_attn.q_proj", [h, h]),
            ("self_attn.k_proj", [h, h]),
            ("self_attn.v_proj", [h, h]),
            ("self_attn.o_proj", [h, h]),
            ("mlp.gate_proj", [f, h]),
            ("mlp.up_proj", [f, h]),
            ("mlp.down_proj", [h, f]),
            ("input_layernorm", [h]),
            ("post_attention_layernorm", [h]),
        ):
            names.append((p + sub + ".weight", shape))
    return names + [("model.norm.weight", [h]), ("lm_head.weight", [64, h])]


def make_report(
    path: Path,
    method: str = "emr",
    with_rates: bool = True,
    sparsify: str = "tadrop",
    names: list[tuple[str, list[int]]] | None = None,
    tasks: list[str] = TASKS,
) -> Path:
    """A merge_report.json shaped like the engine's, with made-up statistics."""
    rng = random.Random(0)
    tensors = {}
    for name, shape in names or _bert_names():
        n = 1
        for s in shape:
            n *= s
        if name.startswith("pooler"):
            tensors[name] = {"kind": "exclude", "shape": shape, "n": n, "tasks": {}}
            continue
        stats = {}
        for t in tasks:
            d = rng.uniform(0.2, 0.9) if sparsify != "none" else 0.0
            st = {
                "q_low": 0.01,
                "q_high": 0.02,
                "kept": n - int(d * n),
                "norm": 1.0,
                "norm_after": 1.0,
            }
            if with_rates:
                st["drop_rate"] = d
            stats[t] = st
        tensors[name] = {"kind": "merge", "shape": shape, "n": n, "tasks": stats}
    report = {
        "format": "tadmerge-report/1",
        "config": {
            "merge": {"method": method},
            "sparsify": {"method": sparsify, "low_q": 0.5, "high_q": 0.95},
        },
        "tasks": tasks,
        "timings": {"total_s": 1.0},
        "peak_rss_bytes": 1,
        "tensors": tensors,
    }
    if method == "emr":
        report["emr"] = {"rescalers": {t: 1.0 + 0.1 * i for i, t in enumerate(tasks)}}
    path.mkdir(parents=True, exist_ok=True)
    (path / "merge_report.json").write_text(json.dumps(report))
    return path


@pytest.mark.parametrize(
    "name, layer, label",
    [
        ("encoder.layer.3.attention.self.query.weight", 3, "query.w"),
        ("encoder.layer.0.attention.self.value.bias", 0, "value.b"),
        ("encoder.layer.5.attention.output.dense.weight", 5, "attn_out.w"),
        ("encoder.layer.5.attention.output.LayerNorm.bias", 5, "attn_norm.b"),
        ("encoder.layer.2.intermediate.dense.weight", 2, "mlp_in.w"),
        ("encoder.layer.2.output.dense.weight", 2, "mlp_out.w"),
        ("encoder.layer.2.output.LayerNorm.weight", 2, "mlp_norm.w"),
        ("embeddings.word_embeddings.weight", None, "embed.w"),
        ("embeddings.position_embeddings.weight", None, "pos_embed.w"),
        ("embeddings.token_type_embeddings.weight", None, "type_embed.w"),
        ("transformer.wpe.weight", None, "pos_embed.w"),
        ("embeddings.LayerNorm.weight", None, "norm.w"),
        ("pooler.dense.bias", None, "pooler.b"),
        ("model.layers.7.self_attn.q_proj.weight", 7, "query.w"),
        ("model.layers.7.mlp.down_proj.weight", 7, "mlp_out.w"),
        ("model.layers.7.post_attention_layernorm.weight", 7, "mlp_norm.w"),
        ("transformer.h.1.attn.c_attn.bias", 1, "attn_in.b"),
        ("transformer.h.1.mlp.c_proj.weight", 1, "mlp_out.w"),
        ("visual.transformer.resblocks.4.attn.in_proj_weight", 4, "attn_in.w"),
        ("visual.transformer.resblocks.4.ln_1.weight", 4, "attn_norm.w"),
        ("lm_head.weight", None, "head.w"),
    ],
)
def test_classify_names(name: str, layer: int | None, label: str) -> None:
    k = classify(name)
    assert (k.layer, k.label) == (layer, label)


def test_drop_rates_and_summary(tmp_path: Path) -> None:
    report = json.loads((make_report(tmp_path) / "merge_report.json").read_text())
    dr = drop_rates(report)
    assert dr.tasks == TASKS
    assert "pooler.dense.weight" not in dr.names  # excluded tensors carry no drop rate
    assert dr.names[0].startswith("embeddings.")  # model order: embeddings first
    assert dr.layers == [0, 1]
    s = summarize(report)
    for t in TASKS:
        st = s["tasks"][t]
        assert 0.2 <= st["min"] <= st["overall_drop"] <= st["max"] <= 0.9
        assert set(st["by_type"]) >= {"query.w", "mlp_in.w", "embed.w"}


def test_draw_report_writes_pngs(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = make_report(tmp_path / "merge")
    paths = draw_report(str(out))
    assert len(paths) == 5  # four drop-rate figures + the EMR rescalers
    for p in paths:
        # beside the output, not in it: an output holds only what its manifest lists
        assert Path(p).parent == tmp_path / "merge-report"
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --to DIR, a report file as input, and no EMR figure for a non-EMR merge
    other = make_report(tmp_path / "ta", method="task_arithmetic")
    paths = draw_report(str(other / "merge_report.json"), to=str(tmp_path / "figs"))
    assert sorted(Path(p).name for p in paths) == [
        "droprate_by_layer.png",
        "droprate_by_task.png",
        "droprate_by_type.png",
        "droprate_distribution.png",
    ]
    assert all(Path(p).parent == tmp_path / "figs" for p in paths)


def test_draw_report_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no merge report"):
        draw_report(str(tmp_path / "missing"))
    bare = make_report(tmp_path / "bare", with_rates=False)
    with pytest.raises(InputError, match="no drop rates"):
        draw_report(str(bare))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "merge_report.json").write_text("{not json")
    with pytest.raises(InputError, match="unreadable"):
        draw_report(str(tmp_path / "bad"))


# ---------------------------------------------------------------------------------------------
# Readability, measured from the figures themselves


def _overlaps(fig) -> list[tuple[str, str]]:
    """Pairs of visible tick labels of one axis whose text boxes overlap, and any text
    (titles, labels) that sticks out of the figure: what makes a figure unreadable."""
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    bad = []
    fig_box = fig.bbox
    for ax in fig.axes:
        for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
            boxes = [
                (lab.get_text(), lab.get_window_extent(renderer))
                for lab in labels
                if lab.get_visible() and lab.get_text()
            ]
            for i, (ta, a) in enumerate(boxes):
                for tb, b in boxes[i + 1 :]:
                    if a.overlaps(b):
                        bad.append((ta, tb))
        for text in [ax.title, ax._left_title, ax.xaxis.label, ax.yaxis.label]:
            if text.get_visible() and text.get_text():
                box = text.get_window_extent(renderer)
                if box.x0 < fig_box.x0 - 1 or box.x1 > fig_box.x1 + 1:
                    bad.append(("clipped", text.get_text()))
    if fig._suptitle is not None:
        box = fig._suptitle.get_window_extent(renderer)
        if box.x0 < fig_box.x0 - 1 or box.x1 > fig_box.x1 + 1 or box.y1 > fig_box.y1 + 1:
            bad.append(("clipped", fig._suptitle.get_text()))
    return bad


def _visible(labels) -> list[str]:
    return [lab.get_text() for lab in labels if lab.get_visible() and lab.get_text()]


@pytest.mark.parametrize("layers, tasks", [(2, TASKS), (32, TASKS)])
def test_figures_read_at_natural_size(tmp_path: Path, layers: int, tasks: list[str]) -> None:
    """A 32-layer Llama (it used to give a 3250 px wide strip of unreadable cells): every
    figure at most 1800 px wide, layer axes wrapped into rows of panels, every cell's
    number and every type and layer label shown, no tick labels overlapping, no title
    clipped (text boxes measured with matplotlib's renderer)."""
    pytest.importorskip("matplotlib")
    from PIL import Image

    from tadmerge.report.plots import CELL_FONT, DPI, MAX_LAYER_COLUMNS, figures, render_report

    out = make_report(tmp_path / "m", names=_llama_names(layers), tasks=tasks)
    report = json.loads((out / "merge_report.json").read_text())
    figs = figures(report)
    assert sorted(figs) == sorted(
        ["droprate_by_layer.png", "droprate_by_task.png", "droprate_by_type.png",
         "droprate_distribution.png", "emr_rescalers.png"]
    )  # fmt: skip
    for name, fig in figs.items():
        assert _overlaps(fig) == [], name
    by_layer = figs["droprate_by_layer.png"]
    rows_per_task = -(-(layers + 2) // MAX_LAYER_COLUMNS)  # emb + layers + top
    panels = [ax for ax in by_layer.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == len(tasks) * rows_per_task
    shown = [c for ax in panels[:rows_per_task] for c in _visible(ax.get_xticklabels())]
    assert shown == ["emb"] + [str(i) for i in range(layers)] + ["top"]  # every layer labelled
    types = ["embed.w", "query.w", "key.w", "value.w", "attn_out.w", "attn_norm.w", "mlp_in.w",
             "mlp_out.w", "mlp_norm.w", "norm.w", "head.w"]  # fmt: skip
    for ax in panels:
        assert _visible(ax.get_yticklabels()) == types
        numbers = [t for t in ax.texts if t.get_text()]
        assert numbers and all(t.get_fontsize() >= CELL_FONT >= 7 for t in numbers)
    assert _visible(figs["droprate_by_type.png"].axes[0].get_yticklabels()) == types
    rendered = render_report(str(out))
    for png in rendered.pngs:
        w, h = Image.open(png).size
        assert w <= 1800, (png, w)
        assert h <= 64 * DPI * len(tasks), (png, h)
    w, h = Image.open(Path(rendered.pngs[0])).size  # droprate_by_layer: cells >= 0.4 inch
    assert w >= (MAX_LAYER_COLUMNS if layers > MAX_LAYER_COLUMNS else layers) * 0.4 * DPI


def test_by_task_layer_labels_never_collide(tmp_path: Path) -> None:
    """'emb' (one tensor) beside layer '0' overlapped; labels now sit at their group's
    middle and any that would still touch are thinned (none here)."""
    pytest.importorskip("matplotlib")
    from tadmerge.report.plots import figures

    out = make_report(tmp_path / "m", names=_llama_names(4))
    fig = figures(json.loads((out / "merge_report.json").read_text()))["droprate_by_task.png"]
    assert _overlaps(fig) == []
    assert _visible(fig.axes[0].get_xticklabels()) == ["emb", "0", "1", "2", "3", "top"]


def test_no_sparsifier_says_so_instead_of_empty_plots(tmp_path: Path, capsys) -> None:
    pytest.importorskip("matplotlib")
    from tadmerge.cli import main
    from tadmerge.report.plots import NO_SPARSIFIER, render_report

    out = make_report(tmp_path / "ta", method="task_arithmetic", sparsify="none")
    done = render_report(str(out))
    assert done.pngs == [] and done.notes == [NO_SPARSIFIER]
    html = Path(done.html).read_text()
    assert "no sparsifier: no drop-rate plots" in html and "<img" not in html
    emr = make_report(tmp_path / "emr", sparsify="none")  # EMR: its rescalers only
    assert rc_out(main, capsys, ["report", str(emr)]) == (0, NO_SPARSIFIER)
    assert sorted(p.name for p in (tmp_path / "emr-report").iterdir()) == [
        "emr_rescalers.png",
        "report.html",
    ]


def rc_out(main, capsys, argv: list[str]) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(argv)
    return rc, capsys.readouterr().out.splitlines()[0]


def test_report_html_shows_figures_and_key_numbers(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from tadmerge.report.plots import render_report

    out = make_report(tmp_path / "m")
    done = render_report(str(out), to=str(tmp_path / "r"))
    html = Path(done.html).read_text()
    assert done.html == str(tmp_path / "r" / "report.html")
    for png in done.pngs:
        assert f"<img src='{Path(png).name}'" in html
    report = json.loads((out / "merge_report.json").read_text())
    s = summarize(report)
    for t in TASKS:  # the per-task numbers, and the EMR rescalers
        assert f"<td>{t}</td><td class=n>{s['tasks'][t]['overall_drop']:.1%}</td>" in html
        assert f"{report['emr']['rescalers'][t]:.4f}" in html
    assert "emr + tadrop" in html
