"""Task arithmetic and averaging merge without importing torch.

Their units all stream (engine/stream.py, numpy) or copy bytes, and torch's
import costs ~2 s: more than reading and writing a small merge. The command
line runs here in a child process in which importing torch fails, and its
output is checked against the float32 reference.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from reference import combine
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parent.parent

# run the command line with torch (and numba) made unimportable
CHILD = textwrap.dedent(
    """
    import sys, traceback

    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "numba"):
                traceback.print_stack()
                raise ImportError(f"test: {name} must not be imported")
            return None

    sys.meta_path.insert(0, NoTorch())
    from tadmerge.cli import run
    run(sys.argv[1:])
    """
)


def _write(tmp: Path) -> tuple[str, list[str]]:
    g = torch.Generator().manual_seed(0)
    base = {
        "layers.0.w": torch.randn(48, 40, generator=g).to(torch.bfloat16),
        "layers.0.b": torch.randn(40, generator=g).to(torch.float16),
        "norm": torch.randn(40, generator=g),
        "position_ids": torch.arange(12),
    }
    paths = []
    for k in range(3):
        d = tmp / ("base" if k == 0 else f"ft{k}")
        d.mkdir()
        t = dict(base)
        if k:
            t = {
                n: v + (torch.randn(v.shape, generator=g) * 0.01).to(v.dtype)
                if v.is_floating_point()
                else v
                for n, v in base.items()
            }
        save_file(t, str(d / "model.safetensors"))
        paths.append(str(d))
    return paths[0], paths[1:]


@pytest.mark.parametrize("method", ["task_arithmetic", "average"])
def test_a_streamed_merge_never_imports_torch(tmp_path, method):
    base, models = _write(tmp_path)
    weights = [1.0, 0.6]
    cfg = tmp_path / "merge.yaml"
    out = tmp_path / "out"
    cfg.write_text(
        yaml.safe_dump(
            {
                "base": base,
                "models": [{"path": p, "weight": w} for p, w in zip(models, weights, strict=True)],
                "merge": {"method": method, "scale": 0.3},
                "output": {"path": str(out)},
                "runtime": {"workers": 2},
            }
        )
    )
    r = subprocess.run(
        [sys.executable, "-c", CHILD, "-q", "merge", str(cfg)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "must not be imported" not in r.stderr

    got = load_file(str(out / "model.safetensors"))
    inputs = [load_file(str(Path(p) / "model.safetensors")) for p in [base, *models]]
    for name, b in inputs[0].items():
        if not b.is_floating_point():
            assert torch.equal(got[name], b)
            continue
        thetas = [t[name].to(torch.float32) for t in inputs]
        taus = [t - thetas[0] for t in thetas[1:]]
        ref = combine(method, thetas[0], thetas[1:], taus, weights, 0.3, sparse=False)
        assert got[name].dtype == b.dtype
        assert torch.equal(got[name], ref.to(b.dtype)), name
