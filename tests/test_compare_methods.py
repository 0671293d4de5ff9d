"""benchmarks/compare_methods.py writes a mergekit YAML for every mergekit method,
and asks tadmerge's front end at run time which it takes (no checkpoint read)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.compare_methods import MERGEKIT_METHODS, method_yaml, tadmerge_refuses  # noqa: E402
from benchmarks.make_table import methods_tables  # noqa: E402
from tadmerge.frontends import mergekit  # noqa: E402


def test_every_method_has_a_yaml_and_tadmerge_takes_what_its_front_end_supports(tmp_path):
    base, fts = tmp_path / "base", [tmp_path / f"ft_{i}" for i in (1, 2, 3)]
    taken = set()
    for method in MERGEKIT_METHODS:
        cfg = method_yaml(method, base, fts, layers=16, out_dtype="bfloat16",
                          tadmerge={"runtime": {"memory_budget": "1GB"}})  # fmt: skip
        assert cfg["merge_method"] == method
        why = tadmerge_refuses(cfg, tmp_path)
        if why is None:
            taken.add(method)
        else:
            assert method in why, why  # the refusal names the method
    assert taken == set(mergekit.SUPPORTED) | {"passthrough"}
    slices = method_yaml("passthrough", base, fts, 16, "bfloat16")["slices"]
    assert [s["sources"][0]["layer_range"] for s in slices] == [[0, 8], [4, 16]]


def test_the_table_lists_unsupported_methods_and_the_command_without_results():
    assert "compare_methods.py" in methods_tables([])
    row = {"supported": False, "random": False, "tools": {"mergekit": {"median": {
        "wall_s": 3.0, "peak_rss_bytes": 2e9}}}}  # fmt: skip
    d = {"dataset": {"params_human": "271M", "tasks": 3, "dtype": "bfloat16"},
         "settings": {"reps": 3}, "created": "now", "_file": "x.json",
         "methods": {"slerp": row}}  # fmt: skip
    table = methods_tables([d])
    assert "| `slerp` | not supported yet | - | 3.00 s | - | - | 2.00 GB | - |" in table
