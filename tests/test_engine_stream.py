"""Streamed merges (engine/stream.py) against the reference combiners.

merge_raw makes task arithmetic and averaging chunk by chunk from the inputs'
own dtypes; it must give the bytes of the definition (SPEC section 5: τ_k in
float32, products before sums in task order, one cast at the end) and report
Σ τ_k² like merge_block, for any chunk size and any mix of input dtypes.
"""

from __future__ import annotations

import math

import pytest
import torch
from reference import combine, fsum_sq

from tadmerge.engine import stream
from tadmerge.engine.block import MergeSpec, NonFiniteTaskVector
from tadmerge.engine.sparsify import SparsifySpec


def _spec(method: str, weights: tuple[float, ...], scale: float = 0.3) -> MergeSpec:
    return MergeSpec(SparsifySpec(method="none"), method, scale=scale, weights=weights)


def _inputs(n: int, dtypes: list[torch.dtype], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g) * 0.02
    out = [base.to(dtypes[0])]
    for dt in dtypes[1:]:
        tau = torch.randn(n, generator=g) * 1e-3 * torch.rand(n, generator=g) ** 4
        m = (base + tau).to(dt)
        m[torch.rand(n, generator=g) < 0.2] = base.to(dt)[:1]  # some entries unmoved
        out.append(m)
    return out


def _reference(method, raws, weights, scale, out_dtype) -> torch.Tensor:
    thetas = [r.to(torch.float32) for r in raws]
    taus = [t - thetas[0] for t in thetas[1:]]
    merged = combine(method, thetas[0], thetas[1:], taus, weights, scale, sparse=False)
    return merged.to(out_dtype)


@pytest.mark.parametrize("method", ["task_arithmetic", "average"])
@pytest.mark.parametrize("chunk", [7, 64, 1000, 1 << 16])
@pytest.mark.parametrize(
    "dtypes,out_dtype",
    [
        ([torch.bfloat16] * 4, torch.bfloat16),
        ([torch.float32, torch.bfloat16, torch.float16, torch.float32], torch.float32),
        ([torch.float16] * 3, torch.bfloat16),
    ],
)
def test_streamed_merge_is_the_reference_bit_for_bit(monkeypatch, method, chunk, dtypes, out_dtype):
    monkeypatch.setattr(stream, "STREAM_CHUNK", chunk)
    n = 5003  # chunks of every size end mid-way
    raws = _inputs(n, dtypes, seed=chunk)
    weights = (1.0, 0.7, -0.25)[: len(raws) - 1]
    out = torch.empty(n, dtype=out_dtype)
    snapshot = [r.clone() for r in raws]
    stats = stream.merge_raw(raws[0], raws[1:], out, _spec(method, weights))
    ref = _reference(method, raws, list(weights), 0.3, out_dtype)
    assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8))
    assert all(torch.equal(a, b) for a, b in zip(raws, snapshot, strict=True))  # untouched
    for k, st in enumerate(stats):
        tau = raws[k + 1].to(torch.float32) - raws[0].to(torch.float32)
        assert st.kept == n
        assert st.tau_sq == st.t_sq
        assert math.isclose(st.tau_sq, fsum_sq(tau), rel_tol=1e-5)


def test_only_merges_without_a_sparsifier_on_a_cpu_stream():
    cpu = torch.device("cpu")
    assert stream.streams(_spec("task_arithmetic", (1.0,)), cpu)
    assert stream.streams(_spec("average", (1.0,)), cpu)
    assert not stream.streams(_spec("ties", (1.0,)), cpu)
    assert not stream.streams(_spec("task_arithmetic", (1.0,)), torch.device("meta"))
    tadrop = MergeSpec(SparsifySpec(method="tadrop"), "task_arithmetic", weights=(1.0,))
    assert not stream.streams(tadrop, cpu)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_task_vector_raises_and_allow_nonfinite_merges_it(monkeypatch, bad):
    monkeypatch.setattr(stream, "STREAM_CHUNK", 100)
    raws = _inputs(1000, [torch.float32] * 3, seed=1)
    raws[2][517] = bad
    spec = _spec("task_arithmetic", (1.0, 1.0))
    out = torch.empty(1000)
    with pytest.raises(NonFiniteTaskVector):
        stream.merge_raw(raws[0], raws[1:], out, spec)
    stats = stream.merge_raw(raws[0], raws[1:], out, spec, check_finite=False)
    ref = _reference("task_arithmetic", raws, [1.0, 1.0], 0.3, torch.float32)
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
    assert not math.isfinite(stats[1].tau_sq) and math.isfinite(stats[0].tau_sq)


def test_a_difference_that_overflows_raises_but_large_squares_do_not():
    base = torch.tensor([-3e38, 0.0, 1.0])
    overflow = torch.tensor([3e38, 0.0, 1.0])  # τ = 6e38: Inf in float32
    big = torch.tensor([-3e38, 1e20, 1.0])  # τ² = 1e40 > float32's max
    out = torch.empty(3)
    with pytest.raises(NonFiniteTaskVector):
        stream.merge_raw(base, [overflow], out, _spec("task_arithmetic", (1.0,)))
    stats = stream.merge_raw(base, [big], out, _spec("task_arithmetic", (1.0,)))
    assert math.isclose(stats[0].tau_sq, 1e40, rel_tol=1e-6)
