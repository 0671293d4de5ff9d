"""tadmerge and mergekit compute the same numbers where their definitions agree.

Runs only where mergekit is installed in its own environment: the one
`bash benchmarks/setup_envs.sh mergekit` builds in .bench-envs/mergekit (or under
BENCH_ENVS), or the python named by TADMERGE_MERGEKIT_PYTHON; the skip reason says
how. Both tools run through their
command lines on the same tiny float32 Llama-shaped checkpoints, with the
config mapping of benchmarks/configs.py (the one the speed comparison uses).

The later tests give both tools the SAME mergekit YAML (tadmerge translates it,
tadmerge/frontends/mergekit.py), for every deterministic mapped method, and check
DARE/DELLA statistically (docs/semantics.md, "Coming from mergekit").

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
import reference as R
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


# ------------------------------------------------------------------------------------
# The same mergekit YAML, given to both tools (tadmerge translates it:
# tadmerge/frontends/mergekit.py). Definitional differences (docs/semantics.md,
# "Coming from mergekit") are asserted where they apply, not skipped over.
# ------------------------------------------------------------------------------------


def _same_yaml(root: Path, data: Path, tag: str, method: str, params: dict, k: int = 3, **top):
    base, fts = data / "base", [data / f"ft_{i}" for i in (1, 2, 3)][:k]
    models = [
        {"model": str(p), "parameters": {"weight": w}}
        for p, w in zip(fts, WEIGHTS[:k], strict=True)
    ]
    raw = {
        "merge_method": method,
        "base_model": str(base),
        "models": models,
        "parameters": params,
        "dtype": "float32",
        **top,
    }
    cfg = root / f"same-{tag}.yml"
    cfg.write_text(yaml.safe_dump(raw))
    td_out, mk_out = root / f"same-td-{tag}", root / f"same-mk-{tag}"
    _run(
        [sys.executable, "-m", "tadmerge.cli", "-q", "merge", str(cfg), "--overwrite",
         "--out", str(td_out)],
        cwd=REPO,
    )  # fmt: skip
    _run([*MERGEKIT, str(cfg), str(mk_out), *MERGEKIT_FLAGS])
    return _tensors(td_out), _tensors(mk_out)


def _boundary_ties(a: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Entries whose |tau| equals a value that straddles a cut of the kept rank
    range [lo, hi) (ascending): which of the equals are kept is the tools' own
    choice (tadmerge: the lowest flat index dropped first; mergekit: argsort's)."""
    s = torch.sort(a).values
    amb = torch.zeros_like(a, dtype=torch.bool)
    for cut in (lo, hi):
        if 0 < cut < a.numel() and s[cut - 1] == s[cut] and s[cut] > 0:  # kept zeros are 0
            amb |= a == s[cut]
    return amb


def _keep_ranges(method: str, n: int, density: float, gamma: float) -> tuple[int, int]:
    if method.startswith("breadcrumbs"):
        keep = int(density * n)
        lo = max(0, n - keep - int(gamma * n))
        return lo, lo + keep
    return n - int(density * n), n


def _ambiguous(method, base, fts, density, gamma, weights, consensus) -> torch.Tensor:
    taus = [f.float().flatten() - base.float().flatten() for f in fts]
    n = base.numel()
    lo, hi = _keep_ranges(method, n, density, gamma)
    amb = torch.zeros(n, dtype=torch.bool)
    trimmed = []
    for t in taus:
        a = t.abs()
        amb |= _boundary_ties(a, lo, hi)
        order = torch.argsort(a, stable=True)
        mask = torch.zeros(n, dtype=torch.bool)
        mask[order[lo:hi]] = True
        trimmed.append(t * mask)
    if consensus:  # sum_k w_k t_k == 0 exactly while a task moved: mergekit elects +1
        s = sum(w * t for w, t in zip(weights, trimmed, strict=True))
        amb |= (s == 0) & torch.stack([t != 0 for t in trimmed]).any(0)
    return amb.reshape(base.shape)


@pytest.mark.parametrize(
    "tag, method, params",
    [
        ("linear", "linear", {"normalize": True}),
        ("linear-sum", "linear", {"normalize": False}),
        ("ta", "task_arithmetic", {"lambda": 0.3}),
        ("ta-norm", "task_arithmetic", {"lambda": 0.7, "normalize": True}),
        ("ties", "ties", {"density": 0.3, "lambda": 0.9}),
        ("ties-sum-l1", "ties", {"density": 0.5, "normalize": False, "rescale": True}),
        ("bc", "breadcrumbs", {"density": 0.3, "gamma": 0.05}),
        ("bc-ties", "breadcrumbs_ties", {"density": 0.5, "gamma": 0.02, "lambda": 1.5}),
    ],
)
def test_same_mergekit_yaml_matches_mergekit(f32_set, tag, method, params):
    root, data = f32_set
    extra = {}
    if method == "linear":
        extra = {"parameters": {**params, "weight": 0.25}}  # mergekit adds the base, weighted
    a, b = _same_yaml(root, data, tag, method, extra.get("parameters", params))
    assert set(a) == set(b)
    base = _tensors(data / "base")
    fts = [_tensors(data / f"ft_{i}") for i in (1, 2, 3)]
    sparsified = "density" in params
    n_amb = n_total = 0
    for name in a:
        assert a[name].dtype == b[name].dtype == torch.float32
        ok = torch.ones_like(a[name], dtype=torch.bool)
        if sparsified:
            amb = _ambiguous(
                method, base[name], [f[name] for f in fts], params["density"],
                params.get("gamma", 0.0), WEIGHTS, "ties" in method,
            )  # fmt: skip
            ok = ~amb
            n_amb += int(amb.sum())
        n_total += ok.numel()
        torch.testing.assert_close(a[name][ok], b[name][ok], rtol=2e-6, atol=2e-7, msg=name)
        assert not torch.equal(a[name], base[name]) or name.endswith("norm.weight"), name
    assert n_amb / n_total < 1e-3, f"{n_amb} of {n_total} entries ambiguous"


def _kept(out: dict, base: dict, ft: dict, weight: float) -> tuple[int, int, list[float]]:
    """For a one-model linear merge θ0 + w·t: entries kept (t != 0 where τ != 0),
    entries with τ != 0, and each tensor's rescale factor ‖t‖₁/‖τ_kept‖₁."""
    kept = moved = 0
    factors = []
    for name in out:
        tau = ft[name].double() - base[name].double()
        t = (out[name].double() - base[name].double()) / weight
        nz = tau != 0
        k = (t.abs() > 1e-3 * tau.abs()) & nz
        kept += int(k.sum())
        moved += int(nz.sum())
        if int(k.sum()) > 100:
            factors.append(float(t[k].abs().sum() / tau[k].abs().sum()))
    return kept, moved, factors


@pytest.mark.parametrize("method, params", [
    ("dare_linear", {"density": 0.3}),
    ("della_linear", {"density": 0.4, "epsilon": 0.2}),
])  # fmt: skip
def test_dare_and_della_keep_and_rescale_like_mergekit_statistically(f32_set, method, params):
    """Different random streams, so never bit-comparable: on one model
    (θ0 + w·Φ(τ)) the kept fraction is density for both (binomial bounds), and
    the kept entries are scaled by about 1/density: mergekit restores each
    tensor's l1 norm, tadmerge divides by the keep probability (DARE's rule;
    docs/semantics.md "Coming from mergekit")."""
    root, data = f32_set
    a, b = _same_yaml(root, data, method, method, params, k=1)
    base, ft = _tensors(data / "base"), _tensors(data / "ft_1")
    d = params["density"]
    for out, tool in ((a, "tadmerge"), (b, "mergekit")):
        kept, moved, factors = _kept(out, base, ft, WEIGHTS[0])
        sd = (moved * d * (1 - d)) ** 0.5
        assert abs(kept - d * moved) < 6 * sd, (tool, kept, moved)
        mean_factor = sum(factors) / len(factors)
        # the mean rescale of the kept entries: 1/d for DARE; DELLA keeps large
        # entries more often and divides them by a larger probability, so below 1/d
        lo = 0.8 / d if method == "dare_linear" else 0.6 / d
        assert lo < mean_factor < 1.2 / d, (tool, mean_factor)
    if method == "dare_linear":  # tadmerge: exactly fl32(1/(1-p)) on every kept entry
        _, _, f_td = _kept(a, base, ft, WEIGHTS[0])
        assert max(f_td) - min(f_td) < 1e-3
    if method == "della_linear":  # both keep large |τ| more often than small ones, alike
        rates = []
        for out in (a, b):
            lo_kept = hi_kept = lo_n = hi_n = 0
            for name in out:
                tau = ft[name].double() - base[name].double()
                if tau.dim() != 2 or tau.shape[1] < 16:
                    continue
                t = out[name].double() - base[name].double()
                rank = tau.abs().argsort(1).argsort(1).double() / (tau.shape[1] - 1)
                moved = tau != 0
                kept = (t != 0) & moved
                lo_kept += int((kept & (rank < 0.25)).sum())
                lo_n += int((moved & (rank < 0.25)).sum())
                hi_kept += int((kept & (rank > 0.75)).sum())
                hi_n += int((moved & (rank > 0.75)).sum())
            rates.append((lo_kept / lo_n, hi_kept / hi_n))
        (td_lo, td_hi), (mk_lo, mk_hi) = rates
        assert abs(td_lo - mk_lo) < 0.02 and abs(td_hi - mk_hi) < 0.02, rates
        # top quartile: p from d + ε/2 to d + ε (mean d + 0.75ε)
        assert abs(td_hi - (params["density"] + 0.75 * params["epsilon"])) < 0.02, rates
        assert td_hi - td_lo > params["epsilon"], rates


@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_dare_ties_and_della_run_the_same_yaml(f32_set, method):
    """The consensus variants on three models: both tools move the same share of
    the entries (random streams differ; the share is a statistic of the keep rates)."""
    root, data = f32_set
    params = {"density": 0.5} if method == "dare_ties" else {"density": 0.5, "epsilon": 0.1}
    a, b = _same_yaml(root, data, method, method, params)
    base = _tensors(data / "base")
    moved_a = sum(int((a[n] != base[n]).sum()) for n in a)
    moved_b = sum(int((b[n] != base[n]).sum()) for n in b)
    total = sum(base[n].numel() for n in a)
    assert abs(moved_a - moved_b) / total < 0.01, (moved_a, moved_b, total)


def test_mergekit_ignores_the_tadmerge_extension_section(f32_set):
    """The `tadmerge:` section (README "Coming from mergekit") is read by tadmerge
    and ignored by mergekit: the same file runs in both and merges alike."""
    root, data = f32_set
    ext = {"runtime": {"workers": 2, "memory_budget": "256MB"}, "seed": 7}
    a, b = _same_yaml(root, data, "ta-ext", "task_arithmetic", {"lambda": 0.5}, tadmerge=ext)
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=2e-6, atol=2e-7, msg=name)


def _sce_cut_ties(base, fts, topk) -> torch.Tensor:
    """Entries whose variance equals the one at sce's cut (which of those are kept
    is each tool's own choice), over three float32 models."""
    taus = [f.float().flatten() - base.float().flatten() for f in fts]
    mean = (taus[0] + taus[1] + taus[2]) / 3
    var = ((taus[0] - mean) ** 2 + (taus[1] - mean) ** 2 + (taus[2] - mean) ** 2) / 3
    keep = int(topk * int(torch.count_nonzero(var)))
    s = torch.sort(var).values
    cut = var.numel() - keep
    amb = torch.zeros_like(var, dtype=torch.bool)
    if 0 < cut < var.numel() and s[cut - 1] == s[cut]:
        amb |= var == s[cut]
    return amb.reshape(base.shape)


@pytest.mark.parametrize(
    "tag, method, params, k",
    [
        ("nearswap", "nearswap", {"t": 0.01}, 1),
        ("ram", "ram", {"epsilon": 1e-3}, 3),
        ("ramplus", "ramplus_tl", {"r": 0.5, "alpha": 0.8, "epsilon": 1e-3}, 3),
        ("sce", "sce", {"select_topk": 0.5}, 3),
        ("sce-all", "sce", {}, 3),
    ],
)
def test_own_combiners_match_mergekit(f32_set, tag, method, params, k):
    """nearswap, ram, ramplus_tl and sce from the same YAML: the same numbers to
    float32 rounding (mergekit computes λ and sce's weights in float32, tadmerge
    in float64 from exact sums; docs/semantics.md), sce's variance cut ties aside."""
    root, data = f32_set
    a, b = _same_yaml(root, data, tag, method, params, k=k)
    assert set(a) == set(b)
    base = _tensors(data / "base")
    fts = [_tensors(data / f"ft_{i}") for i in (1, 2, 3)]
    n_amb = n_total = moved = 0
    for name in a:
        assert a[name].dtype == b[name].dtype == torch.float32
        ok = torch.ones_like(a[name], dtype=torch.bool)
        if "select_topk" in params:
            ok = ~_sce_cut_ties(base[name], [f[name] for f in fts], params["select_topk"])
            n_amb += int((~ok).sum())
        n_total += ok.numel()
        torch.testing.assert_close(a[name][ok], b[name][ok], rtol=1e-5, atol=1e-6, msg=name)
        moved += int((a[name] != base[name]).sum())
    assert moved > n_total // 10, (moved, n_total)
    assert n_amb / n_total < 1e-3, f"{n_amb} of {n_total} entries ambiguous"


@pytest.mark.parametrize(
    "tag, method, params, k",
    [
        ("slerp", "slerp", {"t": 0.3}, 1),
        # per-layer gradients and filters, as mergekit's example slerp configs have them
        (
            "slerp-gradient",
            "slerp",
            {
                "t": [
                    {"filter": "self_attn", "value": [0.1, 0.9]},
                    {"filter": "mlp", "value": [0.8, 0.3, 0.6]},
                    {"value": 0.4},
                ]
            },
            1,
        ),  # fmt: skip
        ("nuslerp", "nuslerp", {}, 2),
        ("nuslerp-rows", "nuslerp", {"nuslerp_flatten": False}, 2),
        ("nuslerp-cols", "nuslerp", {"nuslerp_flatten": False, "nuslerp_row_wise": True}, 2),
        ("multislerp", "multislerp", {}, 3),
        ("karcher", "karcher", {"max_iter": 20}, 3),
        ("model_stock", "model_stock", {}, 3),
        ("model_stock-filter", "model_stock", {"filter_wise": True}, 3),
    ],
)
def test_tensor_sums_methods_match_mergekit(f32_set, tag, method, params, k):
    """The spherical methods and Model Stock on the same YAML: the same numbers
    within float32 rounding. mergekit computes the norms, dot products and
    coefficients in float32, tadmerge the sums exactly and the coefficients in
    float64 (docs/semantics.md): the difference is float32 rounding of the
    angles, amplified where a sin Ω divides (nearly parallel vectors)."""
    root, data = f32_set
    a, b = _same_yaml(root, data, tag, method, params, k=k)
    assert set(a) == set(b)
    base = _tensors(data / "base")
    moved = 0
    for name in a:
        assert a[name].dtype == b[name].dtype == torch.float32
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
        moved += int((a[name] != base[name]).sum())
    assert moved > 0


def test_sce_with_tadrop_from_the_extension_section_runs(f32_set):
    """`tadmerge: {sparsify: tadrop}` beside sce: TADrop sparsifies, sce combines;
    mergekit ignores the section (its sce keeps every entry at select_topk 1)."""
    root, data = f32_set
    ext = {"sparsify": "tadrop"}
    a, b = _same_yaml(root, data, "sce-tadrop", "sce", {"select_topk": 0.5}, tadmerge=ext)
    base = _tensors(data / "base")
    assert set(a) == set(b)
    changed = sum(int((a[n] != base[n]).sum()) for n in a)
    total = sum(base[n].numel() for n in a)
    assert 0 < changed < total


def test_arcee_fusion_matches_mergekit(f32_set):
    """arcee_fusion from the same YAML: the same selected set and values, but for
    entries whose importance lies within float32 rounding of the threshold (the
    row sums are pairwise here, torch's own in mergekit; docs/semantics.md). The
    tensors are below mergekit's 1M-entry sampling bound: its quantiles are exact."""
    root, data = f32_set
    a, b = _same_yaml(root, data, "arcee", "arcee_fusion", {}, k=1)
    assert set(a) == set(b)
    base, ft = _tensors(data / "base"), _tensors(data / "ft_1")
    n_amb = n_total = moved = 0
    for name in a:
        assert a[name].dtype == b[name].dtype == torch.float32
        assert a[name].numel() <= 1_000_000
        imp = R.arcee_importance(base[name], ft[name]).reshape(-1)
        s = torch.sort(imp).values
        n = s.numel()
        thr = s[(n - 1) // 2] + R.f32(1.5) * (s[3 * (n - 1) // 4] - s[(n - 1) // 4])
        ok = ((imp - thr).abs() > 1e-4 * thr.abs()).reshape(a[name].shape)
        n_amb += int((~ok).sum())
        n_total += ok.numel()
        torch.testing.assert_close(a[name][ok], b[name][ok], rtol=1e-6, atol=1e-7, msg=name)
        moved += int((a[name] != base[name]).sum())
    assert 0 < moved < n_total
    assert n_amb / n_total < 1e-3, f"{n_amb} of {n_total} entries ambiguous"


# ------------------------------------------------------------------------------------
# layer stacking (slices) and per-model densities: the same YAML in both tools
# ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deep_set(tmp_path_factory):
    """4 layers, bf16: a frankenmerge copies bytes, so they must be equal bit for bit."""
    root = tmp_path_factory.mktemp("xmk-deep")
    data = root / "tiny-bf16"
    shape = shape_for(**{**SHAPE, "layers": 4})
    generate(data, tasks=2, dtype="bf16", seed=5, shard_size=150_000, shape=shape, quiet=True)
    return root, data


def _both(root: Path, tag: str, raw: dict) -> tuple[Path, Path]:
    cfg = root / f"{tag}.yml"
    cfg.write_text(yaml.safe_dump(raw))
    td_out, mk_out = root / f"td-{tag}", root / f"mk-{tag}"
    _run(
        [sys.executable, "-m", "tadmerge.cli", "-q", "merge", str(cfg), "--overwrite",
         "--out", str(td_out)],
        cwd=REPO,
    )  # fmt: skip
    _run([*MERGEKIT, str(cfg), str(mk_out), *MERGEKIT_FLAGS])
    return td_out, mk_out


def _layers(d: Path) -> int:
    import json

    return json.loads((d / "config.json").read_text())["num_hidden_layers"]


def test_passthrough_frankenmerge_is_mergekits_byte_for_byte(deep_set):
    root, data = deep_set
    a, b = str(data / "ft_1"), str(data / "ft_2")
    raw = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": a, "layer_range": [0, 3]}]},
            {"sources": [{"model": b, "layer_range": [1, 4]}]},
            {"sources": [{"model": a, "layer_range": [2, 3]}]},
        ],
        "dtype": "bfloat16",
    }
    td, mk = _both(root, "franken", raw)
    x, y = _tensors(td), _tensors(mk)
    assert set(x) == set(y) and len([n for n in x if ".layers.6." in n]) > 0
    for name in x:
        assert x[name].dtype == y[name].dtype == torch.bfloat16, name
        assert torch.equal(x[name].view(torch.int16), y[name].view(torch.int16)), name
    assert _layers(td) == _layers(mk) == 7


def test_ties_per_slice_matches_mergekit(deep_set):
    root, data = deep_set
    base, a, b = (str(data / n) for n in ("base", "ft_1", "ft_2"))
    raw = {
        "merge_method": "ties",
        "base_model": base,
        "slices": [
            {
                "sources": [
                    {"model": base, "layer_range": [0, 2]},
                    {"model": a, "layer_range": [0, 2], "parameters": {"weight": 1.0}},
                    {"model": b, "layer_range": [2, 4], "parameters": {"weight": 0.5}},
                ]
            },
            {
                "sources": [
                    {"model": base, "layer_range": [1, 4]},
                    {"model": a, "layer_range": [1, 4], "parameters": {"weight": 1.0}},
                    {"model": b, "layer_range": [0, 3], "parameters": {"weight": 0.5}},
                ]
            },
        ],  # fmt: skip
        "parameters": {"density": 0.5},
        "dtype": "float32",
        "out_dtype": "float32",
    }
    td, mk = _both(root, "ties-slices", raw)
    x, y = _tensors(td), _tensors(mk)
    assert set(x) == set(y)
    assert _layers(td) == _layers(mk) == 5
    close = total = 0
    for name in x:
        total += x[name].numel()
        close += int(torch.isclose(x[name], y[name], rtol=2e-6, atol=2e-7).sum())
    # (bf16 task vectors tie often at the trim threshold: docs/semantics.md)
    assert close / total > 0.99, f"{total - close} of {total} entries differ"


def test_ties_with_a_density_per_model_matches_mergekit(f32_set):
    root, data = f32_set
    densities = [0.2, 0.6, 0.4]
    base = _tensors(data / "base")
    fts = [_tensors(data / f"ft_{i}") for i in (1, 2, 3)]
    raw = {
        "merge_method": "ties",
        "base_model": str(data / "base"),
        "models": [
            {"model": str(data / f"ft_{i + 1}"), "parameters": {"weight": w, "density": d}}
            for i, (w, d) in enumerate(zip(WEIGHTS, densities, strict=True))
        ],
        "parameters": {"density": 0.3},  # (each model's own wins, as in mergekit)
        "dtype": "float32",
    }
    a, b = _both(root, "ties-density-per-model", raw)
    a, b = _tensors(a), _tensors(b)
    assert set(a) == set(b)
    n_amb = n_total = 0
    for name in a:
        amb = torch.zeros_like(a[name], dtype=torch.bool)
        # per model: its own keep range; the sign election over the trimmed tasks
        trimmed = []
        for f, d in zip(fts, densities, strict=True):
            t = f[name].float().flatten() - base[name].float().flatten()
            lo, hi = _keep_ranges("ties", t.numel(), d, 0.0)
            amb |= _boundary_ties(t.abs(), lo, hi).reshape(amb.shape)
            order = torch.argsort(t.abs(), stable=True)
            mask = torch.zeros(t.numel(), dtype=torch.bool)
            mask[order[lo:hi]] = True
            trimmed.append(t * mask)
        s = sum(w * t for w, t in zip(WEIGHTS, trimmed, strict=True))
        amb |= ((s == 0) & torch.stack([t != 0 for t in trimmed]).any(0)).reshape(amb.shape)
        ok = ~amb
        n_amb += int(amb.sum())
        n_total += ok.numel()
        torch.testing.assert_close(a[name][ok], b[name][ok], rtol=2e-6, atol=2e-7, msg=name)
    assert n_amb / n_total < 1e-3


@pytest.fixture(scope="module")
def deep_f32_set(tmp_path_factory):
    """4 layers, float32: a gradient over them is read between its points."""
    root = tmp_path_factory.mktemp("xmk-deep-f32")
    data = root / "tiny-f32"
    shape = shape_for(**{**SHAPE, "layers": 4})
    generate(data, tasks=3, dtype="fp32", seed=7, shard_size=150_000, shape=shape, quiet=True)
    return root, data


def test_ties_with_values_per_tensor_matches_mergekit(deep_f32_set):
    """A density gradient over the layers (top level), a model's density as a filter
    list that falls back to it, a weight as a filter list and a lambda gradient:
    each tensor gets mergekit's value (R.at_tensor), and the merge agrees with
    mergekit's except at the documented TIES ties."""
    root, data = deep_f32_set
    density = [0.2, 0.7, 0.5]
    d1 = [{"filter": "mlp", "value": 0.6}]  # elsewhere: the top-level gradient
    w0 = [{"filter": "self_attn", "value": 0.3}, {"value": 1.0}]
    lam = [1.0, 0.6]
    raw = {
        "merge_method": "ties",
        "base_model": str(data / "base"),
        "models": [
            {"model": str(data / "ft_1"), "parameters": {"weight": w0}},
            {"model": str(data / "ft_2"), "parameters": {"weight": 0.5, "density": d1}},
            {"model": str(data / "ft_3"), "parameters": {"weight": 0.8}},
        ],
        "parameters": {"density": density, "lambda": lam},
        "dtype": "float32",
    }
    a, b = _both(root, "ties-per-tensor", raw)
    a, b = _tensors(a), _tensors(b)
    base = _tensors(data / "base")
    fts = [_tensors(data / f"ft_{i}") for i in (1, 2, 3)]
    assert set(a) == set(b)
    layers = _layers(data / "base")
    assert layers == 4
    n_amb = n_total = 0
    seen = set()
    for name in a:
        d = R.at_tensor(density, name, layers)
        ds = [d, R.at_tensor(d1 + [{"value": d}], name, layers), d]
        ws = [R.at_tensor(w0, name, layers), 0.5, 0.8]
        seen.add((round(ds[0], 6), ws[0]))
        amb = torch.zeros_like(a[name], dtype=torch.bool)
        trimmed = []
        for f, dk in zip(fts, ds, strict=True):
            t = f[name].float().flatten() - base[name].float().flatten()
            lo, hi = _keep_ranges("ties", t.numel(), dk, 0.0)
            amb |= _boundary_ties(t.abs(), lo, hi).reshape(amb.shape)
            order = torch.argsort(t.abs(), stable=True)
            mask = torch.zeros(t.numel(), dtype=torch.bool)
            mask[order[lo:hi]] = True
            trimmed.append(t * mask)
        s = sum(w * t for w, t in zip(ws, trimmed, strict=True))
        amb |= ((s == 0) & torch.stack([t != 0 for t in trimmed]).any(0)).reshape(amb.shape)
        ok = ~amb
        n_amb += int(amb.sum())
        n_total += ok.numel()
        torch.testing.assert_close(a[name][ok], b[name][ok], rtol=2e-6, atol=2e-7, msg=name)
        assert not torch.equal(a[name], base[name]) or name.endswith("norm.weight"), name
    # the values did vary: the gradient's points and between them, both weights
    assert {round(x, 6) for x, _ in seen} >= {0.2, round(0.2 + 0.5 * 2 / 3, 6), 0.5}
    assert {w for _, w in seen} == {0.3, 1.0}
    assert n_amb / n_total < 1e-3, f"{n_amb} of {n_total} entries ambiguous"
