"""A tensor of more than 2**24 elements (torch.quantile refuses those), whole and
split into row blocks, against the reference: quantiles, drop mask, L2 rescale."""

from __future__ import annotations

import math
import os

import numpy as np
import reference as R
import torch
from checkpoints import write_checkpoint
from safetensors.torch import load_file

from tadmerge.config import parse_config
from tadmerge.run.driver import run_merge

ROWS, COLS = 4097, 4096  # 16,781,312 elements > 2**24


def test_tadrop_exact_beyond_2_pow_24(tmp_path):
    assert ROWS * COLS > 2**24
    g = torch.Generator().manual_seed(11)
    base = (torch.randn(ROWS, COLS, generator=g) * 0.02).bfloat16()
    delta = torch.randn(ROWS, COLS, generator=g) * torch.exp(torch.randn(ROWS, COLS, generator=g))
    model = (base.float() + 1e-3 * delta).bfloat16()  # bf16: many exact zeros and ties
    del delta
    bp = write_checkpoint(str(tmp_path / "base"), {"w": base})
    mp = write_checkpoint(str(tmp_path / "m"), {"w": model})
    outs = []
    for tag, runtime in (
        ("whole", {"memory_budget": "4GB"}),
        ("split", {"memory_budget": "512MB", "max_unit_elements": 3_000_000, "workers": 2}),
    ):
        cfg = parse_config(
            {
                "base": bp,
                "models": [{"path": mp, "name": "m"}],
                "sparsify": {"method": "tadrop"},
                "merge": {"method": "task_arithmetic", "scale": 1.0},
                "output": {"path": str(tmp_path / tag), "dtype": "float32"},
                "runtime": {**runtime, "progress": "none"},
            }
        )
        outs.append(run_merge(cfg))
    whole, split = outs
    assert len(split.plan.tensors[0].units) > 1 and len(whole.plan.tensors[0].units) == 1
    got_w = load_file(os.path.join(whole.output, "model.safetensors"))["w"]
    got_s = load_file(os.path.join(split.output, "model.safetensors"))["w"]
    assert torch.equal(got_w, got_s)

    # reference: stable sort, numpy-linear quantiles from the formula, fsum norms
    tau = model.float() - base.float()
    flat = tau.reshape(-1)
    x = np.sort(flat.abs().double().numpy(), kind="stable")
    n = x.size
    qa = R.quantile(x, 0.5)
    qb = R.quantile(x, 0.95)
    d = min(qa / (qb + 1e-12), 1.0)
    k = math.floor(d * n)
    order = torch.sort(flat.abs(), stable=True).indices
    kept = flat.clone()
    kept[order[:k]] = 0
    norm = math.sqrt(math.fsum((flat.double() ** 2).numpy().tolist()))
    kept_norm = math.sqrt(math.fsum((kept.double() ** 2).numpy().tolist()))
    s = norm / (kept_norm + 1e-12)
    t = torch.where(kept != 0, kept * R.f32(s), torch.zeros(()))
    expected = (base.float().reshape(-1) + R.f32(1.0) * (t * R.f32(1.0))).view(ROWS, COLS)
    assert torch.equal(got_w, expected)
    fig = whole.report["tensors"]["w"]["tasks"]["m"]
    assert fig["q_low"] == qa and fig["q_high"] == qb and fig["drop_rate"] == d
    assert fig["kept"] == n - k
