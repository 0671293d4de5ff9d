"""tadmerge and mergekit compute the same numbers where their definitions agree.

Runs only where mergekit is installed in its own environment: the one
`bash benchmarks/setup_envs.sh mergekit` builds in .bench-envs/mergekit (or under
BENCH_ENVS), or the python named by TADMERGE_MERGEKIT_PYTHON; the skip reason says
how. Both tools run through their
command lines on the same tiny float32 Llama-shaped checkpoints, with the
config mapping of benchmarks/configs.py (the one the speed comparison uses).

Known differences (docs/benchmarks.md, "Known differences"), excluded from the
comparison entry by entry, and counted to be rare:
- TIES trim ties: where several |tau| equal the threshold value and the
  boundary falls among them, mergekit's argsort keeps an unspecified subset,
  tadmerge drops the lowest flat indices first;
- TIES zero sign: where sum_k w_k t_k == 0 exactly but some t_k != 0,
  mergekit elects +1, tadmerge the tensor's majority sign.
"""

from __future__ import annotations

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
from benchmarks.configs import MERGEKIT_FLAGS, mergekit_config, tadmerge_config  # noqa: E402
from benchmarks.make_checkpoints import generate, shape_for  # noqa: E402

MISSING = tool_missing("mergekit", "tests/test_crosscheck_mergekit.py")
# mergekit-yaml, run by the environment's python (so that a python is all one names)
MERGEKIT = [str(tool_python("mergekit")), "-m", "mergekit.scripts.run_yaml"]

pytestmark = [
    pytest.mark.external,
    pytest.mark.skipif(MISSING is not None, reason=MISSING or ""),
]

WEIGHTS = [1.0, 0.5, 0.8]
SHAPE = dict(params=0, vocab=512, hidden=64, layers=2, intermediate=160, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def f32_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("xmk")
    data = root / "tiny-f32"
    generate(
        data,
        tasks=3,
        dtype="fp32",
        seed=3,
        shard_size=150_000,
        shape=shape_for(**SHAPE),
        quiet=True,
    )
    return root, data


def _run(cmd, cwd=None):
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{cmd[:3]} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"


def _merge_both(root: Path, data: Path, method: str, **kw) -> tuple[Path, Path]:
    base, fts = data / "base", [data / f"ft_{i}" for i in (1, 2, 3)]
    td_out, mk_out = root / f"td-{method}", root / f"mk-{method}"
    td_cfg, mk_cfg = root / f"td-{method}.yaml", root / f"mk-{method}.yaml"
    td_cfg.write_text(
        yaml.safe_dump(tadmerge_config(method, base, fts, td_out, weights=WEIGHTS, **kw))
    )
    mk_cfg.write_text(
        yaml.safe_dump(
            mergekit_config(
                method, base, fts, weights=WEIGHTS, dtype="float32", out_dtype="float32", **kw
            )
        )
    )
    _run(
        [sys.executable, "-m", "tadmerge.cli", "-q", "merge", str(td_cfg), "--overwrite"], cwd=REPO
    )
    _run([*MERGEKIT, str(mk_cfg), str(mk_out), *MERGEKIT_FLAGS])
    return td_out, mk_out


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    idx = tensor_index(d)
    return {k: load(d, k, idx) for k in idx}


def test_task_arithmetic_matches_mergekit(f32_set):
    root, data = f32_set
    td, mk = _merge_both(root, data, "task_arithmetic", lam=0.3)
    a, b = _tensors(td), _tensors(mk)
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype == torch.float32
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7, msg=name)


def _ties_ambiguous(base, fts, density, weights) -> torch.Tensor:
    """Entries where the two TIES definitions may legitimately differ."""
    taus = [f.float() - base.float() for f in fts]
    n = base.numel()
    keep = int(density * n)
    trimmed, amb = [], torch.zeros(n, dtype=torch.bool)
    for t in taus:
        a = t.flatten().abs()
        # tadmerge: keep `keep` largest, among equals drop the lowest index first
        order = torch.argsort(a, stable=True)  # ascending; equals by index
        mask = torch.zeros(n, dtype=torch.bool)
        mask[order[n - keep :]] = True
        if 0 < keep < n:
            thr = a[order[n - keep]]
            if (
                thr > 0
                and int((a == thr).sum()) > 1
                and (int((a > thr).sum()) < keep < int((a >= thr).sum()))
            ):
                amb |= a == thr
        trimmed.append(t.flatten() * mask)
    s = sum(w * t for w, t in zip(weights, trimmed, strict=True))
    amb |= (s == 0) & torch.stack([t != 0 for t in trimmed]).any(0)
    return amb.reshape(base.shape)


@pytest.mark.parametrize("density", [0.2, 0.5])
def test_ties_per_tensor_matches_mergekit(f32_set, density):
    root, data = f32_set
    td, mk = _merge_both(root, data, "ties", density=density)
    a, b = _tensors(td), _tensors(mk)
    base = _tensors(data / "base")
    fts = [_tensors(data / f"ft_{i}") for i in (1, 2, 3)]
    n_total = n_amb = 0
    for name in a:
        amb = _ties_ambiguous(base[name], [f[name] for f in fts], density, WEIGHTS)
        n_total += amb.numel()
        n_amb += int(amb.sum())
        ok = ~amb
        torch.testing.assert_close(a[name][ok], b[name][ok], rtol=1e-6, atol=1e-7, msg=name)
        # the merge moved the weights at all (not a no-op comparison)
        assert not torch.equal(a[name], base[name]) or name.endswith("norm.weight")
    assert n_amb / n_total < 1e-3, f"{n_amb} of {n_total} entries ambiguous"


def test_ties_bf16_differs_only_where_definitions_differ(tmp_path):
    """On bf16 checkpoints task-vector magnitudes are quantized, so ties at the
    trim threshold and exactly-cancelling sums are common (about 15% of the
    entries of this set): the two tools may legitimately differ there, and
    must agree bit for bit (after the one cast to bf16) everywhere else."""
    data = tmp_path / "tiny-bf16"
    generate(
        data,
        tasks=3,
        dtype="bf16",
        seed=3,
        shard_size=150_000,
        shape=shape_for(**SHAPE),
        quiet=True,
    )
    base, fts = data / "base", [data / f"ft_{i}" for i in (1, 2, 3)]
    td_out, mk_out = tmp_path / "td", tmp_path / "mk"
    (tmp_path / "td.yaml").write_text(
        yaml.safe_dump(tadmerge_config("ties", base, fts, td_out, weights=WEIGHTS))
    )
    (tmp_path / "mk.yaml").write_text(
        yaml.safe_dump(
            mergekit_config(
                "ties", base, fts, weights=WEIGHTS, dtype="float32", out_dtype="bfloat16"
            )
        )
    )
    _run(
        [
            sys.executable,
            "-m",
            "tadmerge.cli",
            "-q",
            "merge",
            str(tmp_path / "td.yaml"),
            "--overwrite",
        ],
        cwd=REPO,
    )
    _run([*MERGEKIT, str(tmp_path / "mk.yaml"), str(mk_out), *MERGEKIT_FLAGS])
    a, b = _tensors(td_out), _tensors(mk_out)
    base_t = _tensors(base)
    ft_t = [_tensors(f) for f in fts]
    n_amb = n_diff = 0
    for name in a:
        assert a[name].dtype == b[name].dtype == torch.bfloat16
        amb = _ties_ambiguous(base_t[name], [f[name] for f in ft_t], 0.2, WEIGHTS)
        diff = a[name] != b[name]
        assert not bool((diff & ~amb).any()), f"{name}: differs outside the known differences"
        n_amb += int(amb.sum())
        n_diff += int(diff.sum())
    assert n_diff > 0 and n_amb > 0  # the known differences do occur on bf16 inputs
