"""Task arithmetic and averaging, with or without a magnitude selection on
bf16 inputs, merge without importing torch.

Their units all stream (engine/stream.py: the C stream kernel), take the raw
bf16 path (engine/raw.py: the C kernels, its statistics in numpy) or copy
bytes, and torch's import costs ~2 s: more than reading and writing a small
merge. The command line runs here in a child process in which importing torch
fails, and its output is checked against the float32 reference. Where the C
kernels cannot be built the same merges run the torch reference: the same
bytes, and the log says so at WARNING.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from reference import combine, sparsify
from safetensors.torch import load_file, save_file

from tadmerge.engine import native

REPO = Path(__file__).resolve().parent.parent

needs_c = pytest.mark.skipif(not native.available(), reason="no C kernels")

# run the command line with torch (and numba, whose kernels are gone) made unimportable
CHILD = textwrap.dedent(
    """
    import sys, traceback

    BLOCKED = sys.argv.pop(1).split(",")

    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                traceback.print_stack()
                raise ImportError(f"test: {name} must not be imported")
            return None

    sys.meta_path.insert(0, NoTorch())
    from tadmerge.cli import run
    run(sys.argv[1:])
    """
)


def _write(tmp: Path, bf16_only: bool = False, embed: bool = False) -> tuple[str, list[str]]:
    g = torch.Generator().manual_seed(0)
    base = {
        "layers.0.w": torch.randn(48, 40, generator=g).to(torch.bfloat16),
        "layers.0.b": torch.randn(40, generator=g).to(torch.float16),
        "norm": torch.randn(40, generator=g),
        "position_ids": torch.arange(12),
    }
    if bf16_only:  # what the raw path takes (and a tensor that splits into units)
        base = {n: v.to(torch.bfloat16) if v.is_floating_point() else v for n, v in base.items()}
    if bf16_only or embed:
        base["embed"] = torch.randn(512, 64, generator=g).to(torch.bfloat16)
    paths = []
    for k in range(3):
        d = tmp / ("base" if k == 0 else f"ft{k}")
        d.mkdir()
        t = dict(base)
        if k:
            t = {
                n: (v.float() + torch.randn(v.shape, generator=g) * 0.01).to(v.dtype)
                if v.is_floating_point()
                else v
                for n, v in base.items()
            }
        save_file(t, str(d / "model.safetensors"))
        paths.append(str(d))
    return paths[0], paths[1:]


def _run(cfg: Path, blocked: str, env: dict | None = None) -> str:
    r = subprocess.run(
        [sys.executable, "-c", CHILD, blocked, "-q", "merge", str(cfg)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert "must not be imported" not in r.stderr
    return r.stderr


def _check(out: Path, paths: list[str], reference) -> int:
    """The merged floating tensors equal reference(name, θ, τ) cast to the base's
    dtype (float32 math), the others the base's; returns the tensor count."""
    got = load_file(str(out / "model.safetensors"))
    inputs = [load_file(str(Path(p) / "model.safetensors")) for p in paths]
    for name, b in inputs[0].items():
        if not b.is_floating_point():
            assert torch.equal(got[name], b)
            continue
        thetas = [t[name].to(torch.float32) for t in inputs]
        taus = [t - thetas[0] for t in thetas[1:]]
        assert got[name].dtype == b.dtype
        assert torch.equal(got[name], reference(name, thetas, taus).to(b.dtype)), name
    return len(inputs[0])


def _config(tmp: Path, base: str, models: list[str], weights, merge: dict, **extra) -> Path:
    cfg = tmp / "merge.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "base": base,
                "models": [{"path": p, "weight": w} for p, w in zip(models, weights, strict=True)],
                "merge": merge,
                "output": {"path": str(tmp / "out")},
                **extra,
            }
        )
    )
    return cfg


@needs_c
@pytest.mark.parametrize("method", ["task_arithmetic", "average"])
def test_a_streamed_merge_never_imports_torch(tmp_path, method):
    base, models = _write(tmp_path)
    weights = [1.0, 0.6]
    merge = {"method": method, "scale": 0.3}
    cfg = _config(tmp_path, base, models, weights, merge, runtime={"workers": 2})
    _run(cfg, "torch,numba")
    _check(tmp_path / "out", [base, *models], lambda name, thetas, taus: combine(
        method, thetas[0], thetas[1:], taus, weights, 0.3, sparse=False
    ))  # fmt: skip


@needs_c
@pytest.mark.parametrize("split", [False, True])
def test_a_magnitude_selection_on_bf16_never_imports_torch(tmp_path, split):
    """TA + TADrop on bf16 checkpoints: the raw path merges every unit, and
    with split tensors the statistics round counts them, all without torch."""
    base, models = _write(tmp_path, bf16_only=True)
    weights = [1.0, 0.6]
    sp = {"method": "tadrop", "low_q": 0.5, "high_q": 0.95, "rescale": "l2"}
    merge = {"method": "task_arithmetic", "scale": 0.3}
    runtime = {"workers": 2}
    if split:
        runtime.update(max_unit_elements=4096, block_elements=1024, memory_budget="256MB")
    cfg = _config(tmp_path, base, models, weights, merge, sparsify=sp, runtime=runtime)
    _run(cfg, "torch,numba")

    def reference(name, thetas, taus):
        ts = [sparsify(t, sp, task=i, name=name, seed=0, block_rows=1) for i, t in enumerate(taus)]
        return combine("task_arithmetic", thetas[0], thetas[1:], ts, weights, 0.3)

    tensors = _check(tmp_path / "out", [base, *models], reference)
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    # split: "embed" (32768 entries) is merged in several units, after a statistics round
    assert (report["units"]["total"] > tensors) == split
    assert (report["reads"]["stats_rounds"] > 0) == split


@pytest.mark.parametrize("sparsified", [False, True])
def test_without_the_c_kernels_the_torch_reference_writes_the_same_bytes(tmp_path, sparsified):
    """A machine whose C compiler fails and whose cache is empty: the merge
    (streamed task arithmetic, or TA + TADrop on bf16) runs the torch reference,
    says so once at WARNING with the reason, and writes the reference's bytes
    (those of the C kernels, which the tests above hold to the same reference)."""
    import os

    base, models = _write(tmp_path, bf16_only=sparsified)
    weights = [1.0, 0.6]
    sp = {"method": "tadrop", "low_q": 0.5, "high_q": 0.95, "rescale": "l2"}
    extra = {"sparsify": sp} if sparsified else {}
    merge = {"method": "task_arithmetic", "scale": 0.3}
    cfg = _config(tmp_path, base, models, weights, merge, runtime={"workers": 2}, **extra)
    env = {**os.environ, "CC": "false", "TADMERGE_CACHE_DIR": str(tmp_path / "empty-cache")}
    env["PYTHONPATH"] = str(REPO)
    err = _run(cfg, "numba", env)
    said = [line for line in err.splitlines() if " WARNING " in line]
    assert len(said) == 1, err
    assert "C kernels unavailable: false failed on native_kernels.c" in said[0]
    assert "the torch reference runs instead, with the same bytes" in said[0]
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["dispatch"]["kernels"] == "torch"

    def reference(name, thetas, taus):
        if sparsified:
            taus = [
                sparsify(t, sp, task=i, name=name, seed=0, block_rows=1) for i, t in enumerate(taus)
            ]
        return combine("task_arithmetic", thetas[0], thetas[1:], taus, weights, 0.3)

    _check(tmp_path / "out", [base, *models], reference)


SUMS_CASES = {
    "slerp": ({"method": "slerp", "t": 0.3}, [1.0]),
    "nuslerp": ({"method": "nuslerp"}, [1.0, 0.6]),
    "nuslerp-weights": ({"method": "nuslerp", "tasks": False}, [1.0, 0.6]),
    "model_stock": ({"method": "model_stock"}, [1.0, 1.0]),
}


@needs_c
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("case", sorted(SUMS_CASES))
def test_a_sums_combiner_never_imports_torch(tmp_path, case, split):
    """slerp, nuslerp and model_stock (exact tensor sums, then one coefficient
    per tensor) on bf16, float16 and float32 tensors, one model storing a
    tensor in another dtype than the base: every unit streams from its raw
    inputs, and a split tensor's statistics round is answered from them, all
    without torch; the bytes are the torch engine's, and so (to float64
    rounding) are the report's norms."""
    merge, weights = SUMS_CASES[case]
    base, models = _write(tmp_path, embed=True)
    mixed = load_file(str(Path(models[-1]) / "model.safetensors"))
    mixed["norm"] = mixed["norm"].to(torch.bfloat16)  # the base's is float32
    save_file(mixed, str(Path(models[-1]) / "model.safetensors"))
    models = models[: len(weights)]
    runtime = {"workers": 2}
    if split:
        runtime.update(max_unit_elements=4096, block_elements=1024, memory_budget="256MB")
    cfg = _config(tmp_path, base, models, weights, merge, runtime=runtime)
    _run(cfg, "torch,numba")
    torch_out = tmp_path / "torch"
    cfg_torch = tmp_path / "torch.yaml"
    raw = yaml.safe_load(cfg.read_text())
    raw["output"]["path"] = str(torch_out)
    raw["runtime"]["kernels"] = "torch"
    cfg_torch.write_text(yaml.safe_dump(raw))
    _run(cfg_torch, "numba")
    got, want = (load_file(str(d / "model.safetensors")) for d in (tmp_path / "out", torch_out))
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    report, report_torch = (
        json.loads((d / "merge_report.json").read_text()) for d in (tmp_path / "out", torch_out)
    )
    assert report["dispatch"]["kernels"] == "c" and report_torch["dispatch"]["kernels"] == "torch"
    assert (report["reads"]["stats_rounds"] > 0) == split
    for name, t in report_torch["tensors"].items():
        for task, fig in t.get("tasks", {}).items():
            assert report["tensors"][name]["tasks"][task]["norm"] == pytest.approx(
                fig["norm"], rel=1e-12
            )
