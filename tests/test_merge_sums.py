"""The tensor-sums methods (slerp, nuslerp, multislerp, karcher, model_stock):
whole tensors and tensors split into many row blocks give the same bytes, and
both match the reference (tests/reference.py: each method's algorithm on whole
float64 tensors) within float tolerance. The exact sums themselves
(engine/sums.py) equal math.fsum of the float64 products, for any split."""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference as R
import torch
from checkpoints import SPLIT_RUNTIME, write_checkpoint
from outputs import model_files
from safetensors.torch import load_file

from tadmerge.config import parse_config
from tadmerge.engine import native
from tadmerge.engine import sums as S
from tadmerge.engine.spec import SumsRequest
from tadmerge.errors import ConfigError
from tadmerge.methods.registry import tensor_value
from tadmerge.run.driver import run_merge

K = 3
WEIGHTS = [1.0, 0.5, 2.0]


def tensors(seed: int, k: int) -> tuple[dict, list[dict]]:
    """float32 and bf16, 2-D, 3-D, 1-D and 0-d; a model equal to the base (a zero
    task vector) and a model along the base (collinear weights)."""
    g = torch.Generator().manual_seed(seed)

    def rn(*shape):
        return torch.randn(shape, generator=g)

    base = {
        "a.weight": rn(24, 16),
        "b.weight": rn(12, 4, 6),
        "c.bias": rn(300),
        "d.scale": torch.tensor(0.75),
        "e.weight": rn(20, 16).bfloat16(),
        "f.weight": rn(9, 7),
        "ids": torch.arange(5),
    }
    models = []
    for i in range(k):
        m = {}
        for n, v in base.items():
            if not v.is_floating_point():
                m[n] = v.clone()
            elif n == "f.weight" and i == 0:
                m[n] = v.clone()  # a zero task vector
            elif n == "d.scale":
                m[n] = v * (1.1 + 0.2 * i)  # collinear
            else:
                m[n] = (v.float() + 0.3 * (i + 1) * rn(*v.shape)).to(v.dtype)
        models.append(m)
    return base, models


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sums")
    base, models = tensors(0, K)
    bp = write_checkpoint(str(root / "base"), base)
    mps = [write_checkpoint(str(root / f"m{i}"), m) for i, m in enumerate(models)]
    return root, bp, mps, base, models


def merge(inputs, name: str, merge: dict, k: int, split: bool, **runtime):
    root, bp, mps, _, _ = inputs
    raw = {
        "base": bp,
        "models": [{"path": p, "name": f"t{i}", "weight": WEIGHTS[i]} for i, p in enumerate(mps)][
            :k
        ],
        "merge": merge,
        "output": {"path": str(root / name)},
        "runtime": {"progress": "none", "device": "cpu", **runtime},
    }
    if split:
        raw["runtime"] = {**SPLIT_RUNTIME, "workers": 2, **runtime}
    return run_merge(parse_config(raw))


def expected(method: dict, base: dict, models: list[dict], k: int) -> dict:
    out = {}
    ms = models[:k]
    w = WEIGHTS[:k]
    for n, b in base.items():
        if not b.is_floating_point():
            continue
        b32, vs = b.float(), [m[n].float() for m in ms]
        taus = [v - b32 for v in vs]
        name = method["method"]
        if name == "slerp":
            thr = method.get("dot_threshold", 0.9995)
            r = R.slerp(method.get("t", 0.5), b32, vs[0], thr).double()
        elif name == "nuslerp":
            t = w[1] / (w[0] + w[1])
            tasks = method.get("tasks", True)
            two = taus if tasks else vs
            rw, fl = method.get("row_wise", False), method.get("flatten", True)
            r = R.nuslerp(t, two[0], two[1], rw, fl)
            r = r + b32.double() if tasks else r
        elif name == "multislerp":
            r = R.multislerp(taus, w) + b32.double()
        elif name == "karcher":
            r = R.karcher(vs)
        else:
            r = R.model_stock(b32, vs, method.get("filter_wise", False))
        out[n] = r
    return out


CASES = {
    "slerp": ({"method": "slerp", "t": 0.3}, 1),
    "slerp-linear": ({"method": "slerp", "t": 0.7, "dot_threshold": 0.0}, 1),
    "nuslerp": ({"method": "nuslerp"}, 2),
    "nuslerp-rows": ({"method": "nuslerp", "flatten": False}, 2),
    "nuslerp-columns": ({"method": "nuslerp", "flatten": False, "row_wise": True}, 2),
    "nuslerp-weights": ({"method": "nuslerp", "tasks": False}, 2),
    "multislerp": ({"method": "multislerp"}, 3),
    "karcher": ({"method": "karcher"}, 3),
    "model_stock": ({"method": "model_stock"}, 3),
    "model_stock-filter": ({"method": "model_stock", "filter_wise": True}, 3),
}


needs_cc = pytest.mark.skipif(not native.available(), reason="no C compiler")
BACKENDS = ["torch", pytest.param("c", marks=needs_cc)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_whole_and_split_same_bytes_and_reference(inputs, case, backend, monkeypatch):
    """On either kernels backend; the C kernels' sums (taken, whole and split)
    give the torch bytes."""
    from tadmerge.engine import kernels

    method, k = CASES[case]
    taken = []
    real = kernels.sums_accumulate
    monkeypatch.setattr(kernels, "sums_accumulate", lambda *a: taken.append(1) or real(*a))
    whole = merge(inputs, f"{case}-{backend}-whole", method, k, False, kernels=backend)
    assert bool(taken) == (backend == "c")
    taken.clear()
    split = merge(inputs, f"{case}-{backend}-split", method, k, True, kernels=backend)
    assert bool(taken) == (backend == "c")
    if backend == "c":
        torch_whole = merge(inputs, f"{case}-c-torch", method, k, False, kernels="torch")
        assert model_files(whole.output) == model_files(torch_whole.output), "c changed the bytes"
    units = {t.name: len(t.units) for t in split.plan.tensors}
    assert all(units[n] > 1 for n in ("a.weight", "b.weight", "c.bias", "e.weight")), units
    assert model_files(whole.output) == model_files(split.output), "split changed the bytes"
    # a split tensor's sums take one round (karcher's iterations too): segments
    # inside a row take none, a split 1-D tensor is one segment
    assert split.report["reads"]["stats_rounds"] == 1
    assert whole.report["reads"]["stats_rounds"] == 0
    got = load_file(f"{whole.output}/model.safetensors")
    base, models = inputs[3], inputs[4]
    want = expected(method, base, models, k)
    for n, r in want.items():
        bf16 = base[n].dtype == torch.bfloat16
        tol = {"rtol": 1e-2, "atol": 1e-2} if bf16 else {"rtol": 1e-6, "atol": 1e-6}
        torch.testing.assert_close(got[n].double(), r.to(base[n].dtype).double(), **tol)
        assert got[n].dtype == base[n].dtype
    assert torch.equal(got["ids"], base["ids"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_sums_any_split(backend):
    """Σ v_i·v_j per segment equals math.fsum of the float64 products, whole or
    added up from row blocks in any order, for every layout, on either backend."""
    g = torch.Generator().manual_seed(3)
    shape = (12, 5)
    # values over many exponents, with ties of sign and subnormals
    x = torch.randn(shape, generator=g) * torch.exp(4 * torch.randn(shape, generator=g))
    y = torch.randn(shape, generator=g)
    x[0, 0] = 1e-40
    base, models = x.reshape(-1), [y.reshape(-1)]
    pairs = ((0, 0), (1, 1), (0, 1))
    for layout in ("tensor", "first", "last"):
        req = SumsRequest("weights", pairs, layout)
        whole = S.block_sums(base, models, req, shape, backend=backend).values()
        if layout == "tensor":
            flat = [v.double().reshape(-1).tolist() for v in (x, y)]
            want = [
                [math.fsum(a * b for a, b in zip(flat[i], flat[j], strict=True))]
                for i, j in ((0, 0), (1, 1), (0, 1))
            ]
            assert whole.tolist() == want
        if layout == "first":
            col = [math.fsum(float(x[r, 2]) * float(y[r, 2]) for r in range(12))]
            assert whole[2][2] == col[0]
            rows = [(0, 5), (5, 6), (6, 12)]
            parts = [
                S.block_sums(
                    base[a * 5 : b * 5], [models[0][a * 5 : b * 5]], req, shape, backend=backend
                )
                for a, b in rows
            ]
            for order in (parts, parts[::-1]):
                total = order[0] + order[1] + order[2]
                assert total.values().tolist() == whole.tolist()
        if layout == "last":
            r3 = math.fsum(float(x[3, c]) * float(y[3, c]) for c in range(5))
            assert whole[2][3] == r3


def _extreme(g: torch.Generator, n: int) -> torch.Tensor:
    """float32 over the whole exponent range, with ±0, subnormals, the largest
    finite values and runs of one exponent (the bins' sums grow)."""
    x = torch.randn(n, generator=g) * torch.exp((40 * torch.randn(n, generator=g)).clamp(-110, 80))
    x[torch.rand(n, generator=g) < 0.1] = 0.0
    x[torch.rand(n, generator=g) < 0.05] = -0.0
    sub = torch.rand(n, generator=g) < 0.05
    x[sub] = torch.randn(int(sub.sum()), generator=g) * 1e-40
    x[torch.rand(n, generator=g) < 0.01] = 3.4e38
    x[torch.rand(n, generator=g) < 0.01] = -1.1754942e-38  # the largest subnormal
    x[: n // 8] = 1.5  # one bin, many times
    return x


@needs_cc
@pytest.mark.parametrize("layout", ["tensor", "first", "last"])
def test_c_sums_are_the_reference_integers(layout):
    """The C kernels' exact sums (sums._c_sums) hold the torch reference's
    integers, bin for bin (hi, lo, b0, the non-finite count), for every layout
    and kind of vectors: extreme exponents, zeros, subnormals, bf16-widened
    weights, task vectors made in the kernel or given, whole
    blocks and row blocks, a block longer than the reference's chunks, and
    Inf/NaN inputs."""
    g = torch.Generator().manual_seed(11)
    pairs = ((0, 0), (1, 1), (0, 1), (1, 2), (2, 3), (3, 3), (0, 3))
    cases = {
        "extreme": ((61, 53), [_extreme(g, 61 * 53) for _ in range(4)]),
        "bf16": ((40, 30), [torch.randn(1200, generator=g).bfloat16().float() for _ in range(4)]),
        "1-D": ((777,), [_extreme(g, 777) for _ in range(4)]),
    }
    if layout == "tensor":  # (a 1-D tensor is one segment whatever the layout)
        cases["long"] = ((140000,), [_extreme(g, 140000) for _ in range(4)])
    bad = [_extreme(g, 600) for _ in range(4)]
    bad[1][7], bad[2][100] = math.inf, math.nan
    cases["nonfinite"] = ((20, 30), bad)

    for name, (shape, (base, *vs)) in cases.items():
        width = shape[-1] if len(shape) > 1 else 1
        rows = len(base) // width
        blocks = [(0, rows), (rows // 3, rows - rows // 4)] if name != "long" else [(0, rows)]
        kinds = (("weights", False), ("tasks", False), ("tasks", True))
        for kind, made in kinds[1:2] if name == "long" else kinds:
            req = SumsRequest(kind, pairs, layout)
            for r0, r1 in blocks:
                a, b = r0 * width, r1 * width
                args = (base[a:b], [v[a:b] for v in vs], req, shape, made)
                ref = S.block_sums(*args, backend="torch")
                got = S.block_sums(*args, backend="c")
                where = (name, kind, made, r0, r1)
                assert (got.b0, got.nonfinite) == (ref.b0, ref.nonfinite), where
                assert got.hi.dtype == ref.hi.dtype == np.int64
                assert np.array_equal(got.hi, ref.hi) and np.array_equal(got.lo, ref.lo), where
                if name in ("nonfinite", "bf16") and kind == "weights" and r0 == 0:
                    assert (ref.nonfinite > 0) == (name == "nonfinite"), where
    # the raw inputs of a torch-free merge (engine/stream.py): bf16 patterns,
    # float16, float32, float64 (rounded to float32 as torch rounds it), and a
    # base of another dtype than the models, widened in the kernel
    shape = (30, 40)
    raw = {
        "bf16": [torch.randn(1200, generator=g).bfloat16() for _ in range(4)],
        "f16": [(torch.randn(1200, generator=g) * 1e-3).half() for _ in range(4)],
        "f32": [_extreme(g, 1200) for _ in range(4)],
        "f64": [torch.randn(1200, generator=g, dtype=torch.float64) * 1e30 for _ in range(4)],
    }
    raw["mixed"] = [raw["f32"][0], *raw["bf16"][1:]]
    for name, vs32 in raw.items():
        arrays = [
            v.view(torch.int16).numpy().view(np.uint16) if v.dtype == torch.bfloat16 else v.numpy()
            for v in vs32
        ]
        floats = [v.float() for v in vs32]
        for kind in ("weights", "tasks"):
            req = SumsRequest(kind, pairs, layout)
            ref = S.block_sums(floats[0], floats[1:], req, shape, backend="torch")
            got = S.array_sums(arrays[0], arrays[1:], req, shape)
            assert (got.b0, got.nonfinite) == (ref.b0, ref.nonfinite), (name, kind)
            assert np.array_equal(got.hi, ref.hi) and np.array_equal(got.lo, ref.lo), (name, kind)
    # a sum of many products of one bin equals the count times the product
    ones = torch.full((5000,), 1.5)
    got = S.block_sums(ones, [ones], SumsRequest("weights", ((0, 1),)), (5000,), backend="c")
    assert got.values().tolist() == [[5000 * 2.25]]


def test_config_checks(inputs):
    root, bp, mps, _, _ = inputs

    def cfg(method, n, sparsify="none"):
        return {
            "base": bp,
            "models": [{"path": p, "name": f"t{i}"} for i, p in enumerate(mps[:n])],
            "sparsify": {"method": sparsify},
            "merge": {"method": method},
            "output": {"path": str(root / "x")},
        }

    with pytest.raises(ConfigError, match="slerp merges exactly 1 model"):
        parse_config(cfg("slerp", 2))
    with pytest.raises(ConfigError, match="nuslerp merges exactly 2"):
        parse_config(cfg("nuslerp", 3))
    with pytest.raises(ConfigError, match="model_stock merges at least 2"):
        parse_config(cfg("model_stock", 1))
    with pytest.raises(ConfigError, match="takes no sparsifier"):
        parse_config(cfg("karcher", 2, "magnitude"))


def test_per_tensor_values_follow_mergekits_rule():
    """A gradient is interpolated over the layers at i / (layers − 1), taken at its
    first value outside them; the first {filter, value} whose filter is in the
    name applies."""
    g = [0.0, 0.5, 1.0]
    assert tensor_value(g, "model.layers.0.mlp.up_proj.weight", 5) == 0.0
    assert tensor_value(g, "model.layers.4.mlp.up_proj.weight", 5) == 1.0
    assert tensor_value(g, "model.layers.1.mlp.up_proj.weight", 5) == 0.25
    assert tensor_value(g, "model.layers.3.mlp.up_proj.weight", 5) == 0.75
    assert tensor_value(g, "model.embed_tokens.weight", 5) == 0.0
    assert tensor_value(g, "model.layers.0.mlp.up_proj.weight", 1) == 1.0
    entries = [{"filter": "self_attn", "value": [0.2, 0.4]}, {"filter": None, "value": 0.9}]
    assert tensor_value(entries, "model.layers.1.self_attn.q_proj.weight", 2) == 0.4
    assert tensor_value(entries, "model.layers.1.mlp.down_proj.weight", 2) == 0.9
    with pytest.raises(ConfigError, match=r"merge\.t\[0\]\.value\[1\]: expected a number"):
        parse_config({"base": "b", "models": ["m"], "merge": {
            "method": "slerp", "t": [{"filter": "x", "value": [0.1, "a"]}]}})  # fmt: skip


def test_karcher_tol_zero_is_a_config_error_not_a_division_by_zero(inputs):
    """tol 0 divided by zero in karcher's iteration (θ / sin θ at θ = 0, the step
    over a zero tangent norm): an internal error (exit 4) on a valid config. tol
    must be > 0; any positive tol, however small, never divides by zero."""
    from tadmerge.methods.karcher import coefficients

    root, bp, mps, _, _ = inputs
    cfg = {
        "base": bp,
        "models": [{"path": p, "name": f"t{i}"} for i, p in enumerate(mps[:2])],
        "merge": {"method": "karcher", "tol": 0.0},
        "output": {"path": str(root / "x")},
    }
    with pytest.raises(ConfigError, match="tol: must be > 0"):
        parse_config(cfg)
    for g in ([[4.0, 4.0], [4.0, 4.0]], [[1.0, 0.5], [0.5, 1.0]], [[1.0, -1.0], [-1.0, 1.0]]):
        c = coefficients(g, 10, 5e-324)
        assert all(math.isfinite(x) for x in c)


def test_multislerp_weights_summing_to_zero_is_a_config_error(inputs):
    """multislerp divides the weights by their sum (normalize_weights, its default):
    weights summing to 0 ended in ZeroDivisionError (exit 4, an internal error)."""
    root, bp, mps, _, _ = inputs

    def cfg(weights, **merge):
        return {
            "base": bp,
            "models": [
                {"path": p, "name": f"t{i}", "weight": w}
                for i, (p, w) in enumerate(zip(mps[:2], weights, strict=True))
            ],
            "merge": {"method": "multislerp", **merge},
            "output": {"path": str(root / "x")},
        }

    for weights in ([0.0, 0.0], [1.0, -1.0]):
        with pytest.raises(ConfigError, match=r"models\[\*\].weight: .* must not sum to 0"):
            parse_config(cfg(weights))
    parse_config(cfg([1.0, -1.0], normalize_weights=False))  # (nothing divided)


def test_multislerp_eps_zero_is_a_config_error(inputs):
    """eps is added to every norm divided by: at 0 a zero task vector (or a zero
    tangent) divided by zero, an internal error (exit 4). It must be > 0."""
    from tadmerge.methods.multislerp import coefficients

    root, bp, mps, _, _ = inputs
    cfg = {
        "base": bp,
        "models": [{"path": p, "name": f"t{i}"} for i, p in enumerate(mps[:2])],
        "merge": {"method": "multislerp", "eps": 0.0},
        "output": {"path": str(root / "x")},
    }
    with pytest.raises(ConfigError, match="eps: must be > 0"):
        parse_config(cfg)
    c = coefficients([0.5, 0.5], [[0.0, 0.0], [0.0, 1.0]], 1e-300)  # (a zero v_1)
    assert all(math.isfinite(x) for x in c) and c[1] == pytest.approx(0.5)


def test_multislerp_overflowing_weights_are_a_non_finite_output(inputs):
    """Weights of 1e300 (normalize_weights: false) overflowed multislerp's float
    arithmetic into cos(inf) or inf - inf in fsum: a ValueError, an internal error
    (exit 4). They must give what any overflow gives: the non-finite output refused,
    exit 3 naming the tensor."""
    from tadmerge.errors import InputError
    from tadmerge.methods.multislerp import coefficients

    for w in ([1e300, 1e300], [1e300, -1e300]):
        c = coefficients(w, [[1.0, 0.5], [0.5, 2.0]], 1e-8)
        assert len(c) == 2 and not all(math.isfinite(x) for x in c)
    root, bp, mps, _, _ = inputs
    raw = {
        "base": bp,
        "models": [{"path": p, "name": f"t{i}", "weight": 1e300} for i, p in enumerate(mps[:2])],
        "merge": {"method": "multislerp", "normalize_weights": False},
        "output": {"path": str(root / "huge")},
        "runtime": {"progress": "none", "device": "cpu"},
    }
    with pytest.raises(InputError, match=r"\[a.weight\]: .*NaN/Inf value"):
        run_merge(parse_config(raw))
