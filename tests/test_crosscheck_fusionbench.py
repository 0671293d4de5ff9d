"""tadmerge's TA / TIES / EMR agree with FusionBench's in-memory implementations.

Runs only where fusion-bench is installed in its own environment: the one
`bash benchmarks/setup_envs.sh fusionbench` builds in .bench-envs/fusionbench (or
under BENCH_ENVS), or the python named by TADMERGE_FUSIONBENCH_PYTHON; the skip
reason says how.
FusionBench runs in that environment through benchmarks/fusionbench_ref.py on
the same tiny float32 Llama-shaped checkpoints tadmerge merges from the
command line.

Mapping (and known differences, docs/benchmarks.md):
- TA: FusionBench task_arithmetic_merge(scaling_factor=lambda) = tadmerge
  task_arithmetic with scale lambda, weights 1.
- TIES: FusionBench trims over the whole flattened task vector (tadmerge
  `scope: global`) and keeps every entry >= the k-th smallest of the
  complement, i.e. int(density*n) + 1 entries (one more than tadmerge's
  floor(density*n)); the test asks tadmerge for that count. Entries that tie
  at the threshold and entries whose elected sum is exactly 0 (FusionBench
  resolves the zero sign over the whole model, tadmerge per tensor) are
  excluded and counted to be rare.
- EMR: the same definition (zero sign -> -1, rescalers from per-tensor means);
  FusionBench sums the means in float32, tadmerge in float64 (tolerance).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import tool_missing, tool_python  # noqa: E402
from benchmarks.compare_outputs import load, tensor_index  # noqa: E402
from benchmarks.configs import tadmerge_config  # noqa: E402
from benchmarks.make_checkpoints import generate, shape_for  # noqa: E402

FB_PY = tool_python("fusionbench")
REF = REPO / "benchmarks" / "fusionbench_ref.py"
MISSING = tool_missing("fusionbench", "tests/test_crosscheck_fusionbench.py")

pytestmark = [
    pytest.mark.external,
    pytest.mark.skipif(MISSING is not None, reason=MISSING or ""),
]

SHAPE = dict(params=0, vocab=512, hidden=64, layers=2, intermediate=160, heads=4, kv_heads=2)
K = 3


@pytest.fixture(scope="module")
def f32_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("xfb")
    data = root / "tiny-f32"
    generate(
        data,
        tasks=K,
        dtype="fp32",
        seed=5,
        shard_size=150_000,
        shape=shape_for(**SHAPE),
        quiet=True,
    )
    return root, data


def _run(cmd, cwd=None):
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{cmd[:3]} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"


def _fts(data: Path) -> list[Path]:
    return [data / f"ft_{i + 1}" for i in range(K)]


def _fusionbench(root: Path, data: Path, method: str, **kw) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = root / f"fb-{method}.safetensors"
    cmd = [
        str(FB_PY),
        str(REF),
        "--base",
        str(data / "base"),
        "--method",
        method,
        "--out",
        str(out),
    ]
    for f in _fts(data):
        cmd += ["--ft", str(f)]
    for k, v in kw.items():
        cmd += [f"--{k}", str(v)]
    _run(cmd)
    return load_file(str(out))


def _tadmerge(root: Path, data: Path, method: str, **kw) -> Path:
    out = root / f"td-{method}"
    cfg = root / f"td-{method}.yaml"
    cfg.write_text(yaml.safe_dump(tadmerge_config(method, data / "base", _fts(data), out, **kw)))
    _run([sys.executable, "-m", "tadmerge.cli", "-q", "merge", str(cfg), "--overwrite"], cwd=REPO)
    return out


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    idx = tensor_index(d)
    return {k: load(d, k, idx) for k in idx}


def test_task_arithmetic_matches_fusionbench(f32_set):
    root, data = f32_set
    ref = _fusionbench(root, data, "task_arithmetic", scale=0.3)
    got = _tensors(_tadmerge(root, data, "task_arithmetic", lam=0.3))
    assert set(ref) == set(got)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-6, atol=1e-7, msg=name)


def test_ties_global_matches_fusionbench(f32_set):
    root, data = f32_set
    density = 0.2
    base = _tensors(data / "base")
    names = sorted(base)
    fts = [_tensors(f) for f in _fts(data)]
    flat_b = torch.cat([base[n].flatten() for n in names])
    flat_t = [torch.cat([f[n].flatten() for n in names]) - flat_b for f in fts]
    n = flat_b.numel()
    keep_fb = int(n * density) + 1  # what FusionBench's topk_values_mask keeps
    ref = _fusionbench(root, data, "ties", density=density, scale=1.0)
    got = _tensors(_tadmerge(root, data, "ties", scope="global", density=(keep_fb + 0.5) / n))
    # entries where the two definitions may differ
    amb = torch.zeros(n, dtype=torch.bool)
    trimmed = []
    for t in flat_t:
        a = t.abs()
        thr = torch.kthvalue(a, n - keep_fb + 1).values
        if int((a == thr).sum()) > 1:
            amb |= a == thr
        trimmed.append(t * (a >= thr))
    amb |= (sum(trimmed) == 0) & torch.stack([t != 0 for t in trimmed]).any(0)
    assert int(amb.sum()) / n < 1e-3
    pos = 0
    for name in names:
        m = ~amb[pos : pos + base[name].numel()].reshape(base[name].shape)
        pos += base[name].numel()
        torch.testing.assert_close(got[name][m], ref[name][m], rtol=1e-6, atol=1e-7, msg=name)
        assert not torch.equal(got[name], base[name]) or name.endswith("norm.weight")


def test_emr_matches_fusionbench(f32_set):
    root, data = f32_set
    ref = _fusionbench(root, data, "emr")
    out = _tadmerge(root, data, "emr")
    emr = json.loads((out / "emr.json").read_text())
    rescalers = [emr["rescalers"][t] for t in emr["tasks"]]
    torch.testing.assert_close(
        torch.tensor(rescalers, dtype=torch.float64), ref["rescalers"], rtol=1e-5, atol=0
    )
    for k, task in enumerate(emr["tasks"]):
        to = root / f"td-emr-{task}"
        _run(
            [
                sys.executable,
                "-m",
                "tadmerge.cli",
                "-q",
                "materialize",
                str(out),
                "--task",
                task,
                "--to",
                str(to),
                "--overwrite",
            ],
            cwd=REPO,
        )
        got = _tensors(to)
        for name, t in got.items():
            torch.testing.assert_close(
                t, ref[f"task{k}/{name}"], rtol=1e-5, atol=1e-7, msg=f"{task} {name}"
            )
