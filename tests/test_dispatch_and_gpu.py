"""The dispatch (decided once, recorded) and the GPU's share of the plan.

The CUDA-marked tests run only where torch sees a GPU: there the same merges on
cpu and cuda must give the same bytes (the torch functions are the reference on
every device, float32 in a fixed order, no fused multiply-adds).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from checkpoints import write_zoo

from tadmerge.cluster.dispatch import decide, io_bound
from tadmerge.config import parse_config
from tadmerge.errors import ConfigError
from tadmerge.planners.plan import make_plan
from tadmerge.run.driver import run_merge

BLOCK = 64


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpuzoo")
    base, models, *_ = write_zoo(str(root))
    return root, base, models


def _cfg(zoo, out: str, sparsify: dict, merge: dict, **runtime):
    root, base, models = zoo
    return parse_config({
        "base": base,
        "models": [{"path": p, "name": f"t{i}"} for i, p in enumerate(models)],
        "sparsify": sparsify,
        "merge": merge,
        "exclude": ["^head\\."],
        "output": {"path": str(root / out)},
        "runtime": {"progress": "none", "block_elements": BLOCK, **runtime},
        "seed": 3,
    })  # fmt: skip


def test_auto_device_keeps_io_bound_merges_on_the_cpu(zoo, monkeypatch):
    ta = _cfg(zoo, "a", {"method": "tadrop"}, {"method": "task_arithmetic"})
    ties = _cfg(zoo, "b", {"method": "tadrop"}, {"method": "ties"})
    assert io_bound(ta) and not io_bound(ties)
    # even where a GPU is present, auto keeps task arithmetic on the CPU
    monkeypatch.setattr(
        "tadmerge.cluster.worker.resolve_device", lambda name: "cpu" if name == "cpu" else "cuda"
    )
    assert decide(ta).device == "cpu"
    assert decide(ties).device == "cuda"


def test_dispatch_is_recorded_and_env_read_when_deciding(zoo, monkeypatch):
    monkeypatch.setenv("TADMERGE_KERNELS", "torch")
    cfg = _cfg(zoo, "rec", {"method": "tadrop"}, {"method": "ties"}, device="cpu")
    assert decide(cfg).kernels == "torch"
    out = run_merge(cfg).output
    with open(os.path.join(out, "merge_report.json")) as f:
        rep = json.load(f)
    assert rep["dispatch"]["kernels"] == "torch" and rep["dispatch"]["device"] == "cpu"
    monkeypatch.setenv("TADMERGE_KERNELS", "fast")
    with pytest.raises(ConfigError, match="TADMERGE_KERNELS"):
        decide(cfg)


@pytest.mark.parametrize(
    "sparsify,merge",
    [
        ({"method": "none"}, {"method": "task_arithmetic"}),  # streamed where the C kernels run
        ({"method": "tadrop"}, {"method": "task_arithmetic"}),  # raw bf16 blocks, likewise
        ({"method": "magnitude", "density": 0.3}, {"method": "ties"}),
        ({"method": "tadrop"}, {"method": "emr"}),
    ],
)
def test_the_backend_travels_with_each_unit(zoo, monkeypatch, sparsify, merge):
    """The driver's kernels backend reaches every unit and statistics round as
    an argument: with 'torch' no C kernel is called anywhere (in the driver or
    the two workers, split tensors included), with 'c' they are; the bytes are
    the same, and nothing of one merge's choice stays behind for the next."""
    from tadmerge.engine import kernels, native

    if not native.available():
        pytest.skip(f"C kernels {native.describe()}")
    calls = []
    real = kernels._lib

    def counted():
        calls.append(1)
        return real()

    monkeypatch.setattr(kernels, "_lib", counted)
    split = {"workers": 2, "max_unit_elements": 2 * BLOCK}
    tag = f"{sparsify['method']}-{merge['method']}"
    outs = {}
    for backend in ("torch", "c", "torch"):
        calls.clear()
        cfg = _cfg(zoo, f"be-{tag}-{backend}", sparsify, merge, kernels=backend, **split)
        outs[backend] = _shards(run_merge(cfg, overwrite=True).output)
        assert bool(calls) == (backend == "c"), (backend, len(calls))
    assert outs["torch"] == outs["c"]


def test_gpu_units_fit_the_gpu_budget(zoo):
    host = _cfg(zoo, "g1", {"method": "none"}, {"method": "ties"}, memory_budget="2GB", workers=1)
    gpu = _cfg(
        zoo, "g2", {"method": "none"}, {"method": "ties"}, memory_budget="2GB", workers=1,
        gpu_memory_budget="300MB",
    )  # fmt: skip
    assert make_plan(gpu).unit_budget < make_plan(host).unit_budget
    assert make_plan(host, device="cuda").unit_budget < make_plan(host).unit_budget
    tiny = _cfg(zoo, "g3", {"method": "none"}, {"method": "ties"}, gpu_memory_budget="100MB")
    with pytest.raises(ConfigError, match="gpu_memory_budget"):
        make_plan(tiny)


CASES = [
    ({"method": "none"}, {"method": "ties"}),
    ({"method": "tadrop"}, {"method": "task_arithmetic", "scale": 0.7}),
    ({"method": "tadrop"}, {"method": "emr"}),
    ({"method": "magnitude", "density": 0.3}, {"method": "ties", "disjoint": "sum"}),
    ({"method": "breadcrumbs", "density": 0.6, "gamma": 0.05}, {"method": "linear"}),
    ({"method": "random", "p": 0.5}, {"method": "ties"}),
    ({"method": "della", "density": 0.5, "epsilon": 0.2}, {"method": "task_arithmetic"}),
    # tensor sums (engine/sums.py): exact on either device, coefficients on the host
    ({"method": "none"}, {"method": "karcher"}),
    ({"method": "none"}, {"method": "model_stock", "filter_wise": True}),
]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("sparsify,merge", CASES)
def test_cuda_gives_the_cpu_bytes(zoo, sparsify, merge, split):
    extra = {"workers": 1, "max_unit_elements": 2 * BLOCK} if split else {}
    tag = f"{sparsify['method']}-{merge['method']}-{split}"
    outs = []
    for device in ("cpu", "cuda"):
        cfg = _cfg(zoo, f"{tag}-{device}", sparsify, merge, device=device, **extra)
        outs.append(run_merge(cfg).output)
    cpu, cuda = (_shards(o) for o in outs)
    assert cpu == cuda


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_random_stream_is_made_on_the_gpu_with_the_cpu_bits():
    """DARE/DELLA's draws (a counter-based hash in int64 ops) on a GPU: the
    CPU's numbers, made there, for whole blocks and for pieces."""
    from tadmerge.engine.sparsify import block_draws, stream_seed, uniform_stream

    args = (3, 1, "w", 0, 700, 64, 1000)
    cpu = uniform_stream(*args)
    gpu = uniform_stream(*args, device="cuda")
    assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)
    key = stream_seed(5, 0, "huge", 0)
    here, there = torch.empty(4096), torch.empty(4096, device="cuda")
    for start in (0, 12345, (1 << 32) - 100):
        block_draws(key, start, here)
        block_draws(key, start, there)
        assert torch.equal(there.cpu(), here), start


def _shards(out: str) -> dict[str, bytes]:
    found = {}
    for dirpath, _, files in os.walk(out):
        for f in files:
            if f.endswith(".safetensors") or f.endswith(".zarray") or "masks" in dirpath:
                p = os.path.join(dirpath, f)
                with open(p, "rb") as fh:
                    found[os.path.relpath(p, out)] = fh.read()
    return found
