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


def make_report(path: Path, method: str = "emr", with_rates: bool = True) -> Path:
    """A merge_report.json shaped like the engine's, with made-up statistics."""
    rng = random.Random(0)
    tensors = {}
    for name, shape in _bert_names():
        n = 1
        for s in shape:
            n *= s
        if name.startswith("pooler"):
            tensors[name] = {"kind": "exclude", "shape": shape, "n": n, "tasks": {}}
            continue
        stats = {}
        for t in TASKS:
            d = rng.uniform(0.2, 0.9)
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
            "sparsify": {"method": "tadrop", "low_q": 0.5, "high_q": 0.95},
        },
        "tasks": TASKS,
        "timings": {"total_s": 1.0},
        "peak_rss_bytes": 1,
        "tensors": tensors,
    }
    if method == "emr":
        report["emr"] = {"rescalers": {t: 1.0 + 0.1 * i for i, t in enumerate(TASKS)}}
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
        assert Path(p).parent == out / "plots"
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
