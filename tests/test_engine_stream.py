"""Streamed merges (engine/stream.py) against the reference combiners.

merge_raw makes task arithmetic and averaging chunk by chunk from the inputs'
own dtypes; it must give the bytes of the definition (SPEC section 5: τ_k in
float32, products before sums in task order, one cast at the end) and report
Σ τ_k² like merge_block, for any chunk size and any mix of input dtypes.
merge_raw works on numpy arrays (bf16 as uint16 bit patterns); the reference
is the torch one.
"""

from __future__ import annotations

import math

import numpy as np
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


NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64"}


def _np(t: torch.Tensor) -> np.ndarray:
    """The tensor as merge_raw takes it (bf16: its bit patterns)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _empty(n: int, dtype: torch.dtype) -> np.ndarray:
    return np.empty(n, stream.NP_DTYPES[NAMES[dtype]])


def _bytes(a: np.ndarray) -> bytes:
    return a.tobytes()


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
        ([torch.bfloat16, torch.float64, torch.bfloat16], torch.float16),
        ([torch.float64, torch.float32], torch.float64),
    ],
)
def test_streamed_merge_is_the_reference_bit_for_bit(monkeypatch, method, chunk, dtypes, out_dtype):
    monkeypatch.setattr(stream, "STREAM_CHUNK", chunk)
    n = 5003  # chunks of every size end mid-way
    raws = _inputs(n, dtypes, seed=chunk)
    weights = (1.0, 0.7, -0.25)[: len(raws) - 1]
    out = _empty(n, out_dtype)
    arrays = [_np(r) for r in raws]
    snapshot = [a.copy() for a in arrays]
    stats = stream.merge_raw(arrays[0], arrays[1:], out, _spec(method, weights))
    ref = _reference(method, raws, list(weights), 0.3, out_dtype)
    assert _bytes(out) == _bytes(_np(ref))
    assert all(np.array_equal(a, b) for a, b in zip(arrays, snapshot, strict=True))  # untouched
    for k, st in enumerate(stats):
        tau = raws[k + 1].to(torch.float32) - raws[0].to(torch.float32)
        assert st.kept == n
        assert st.tau_sq == st.t_sq
        assert math.isclose(st.tau_sq, fsum_sq(tau), rel_tol=1e-5)


def test_only_merges_without_a_sparsifier_on_a_cpu_stream():
    ta, avg = _spec("task_arithmetic", (1.0,)), _spec("average", (1.0,))
    assert stream.streams(ta, "cpu", ["BF16", "F32"])
    assert stream.streams(avg, "cpu", ["F16", "F64"])
    assert not stream.streams(_spec("ties", (1.0,)), "cpu", ["BF16"])
    assert not stream.streams(ta, "cuda", ["BF16"])
    assert not stream.streams(ta, "cpu", ["BF16", "F8_E4M3"])  # no numpy dtype: merge_block
    tadrop = MergeSpec(SparsifySpec(method="tadrop"), "task_arithmetic", weights=(1.0,))
    assert not stream.streams(tadrop, "cpu", ["BF16"])


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_nan_and_overflow_round_as_torch_does(in_dtype, out_dtype):
    """With allow_nonfinite, NaN and Inf reach the output: Inf and every finite
    value as torch rounds them, NaN where torch has NaN (its bits are not
    torch's: those differ between torch's own vectorised and scalar casts)."""
    base = torch.tensor([0.0, 1.0, -2.0, 0.0, 3e38, -3e38, 5.0, 0.0])
    m1 = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0, 3e38, -3e38, 5.0, -0.0])
    m2 = torch.tensor([1.0, -float("inf"), 1.0, float("nan"), 3e38, -3e38, 7e4, 0.0])
    # bf16 in and out: the packed widening and narrowing (even entries, then odd)
    base, m1, m2 = (t.to(in_dtype) for t in (base, m1, m2))
    spec = _spec("task_arithmetic", (2.0, 1.0), scale=1.0)
    out = _empty(8, out_dtype)
    stream.merge_raw(_np(base), [_np(m1), _np(m2)], out, spec, check_finite=False)
    ref = _reference("task_arithmetic", [base, m1, m2], [2.0, 1.0], 1.0, out_dtype)
    got = torch.from_numpy(out.view(np.int16) if out.dtype == np.uint16 else out)
    got = got.view(out_dtype) if out.dtype == np.uint16 else got
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(got), nan) and nan.any()
    assert _bytes(out[~nan.numpy()]) == _bytes(_np(ref)[~nan.numpy()])
    assert torch.isinf(ref).any()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_task_vector_raises_and_allow_nonfinite_merges_it(monkeypatch, bad):
    monkeypatch.setattr(stream, "STREAM_CHUNK", 100)
    raws = _inputs(1000, [torch.float32] * 3, seed=1)
    raws[2][517] = bad
    spec = _spec("task_arithmetic", (1.0, 1.0))
    out = _empty(1000, torch.float32)
    arrays = [_np(r) for r in raws]
    with pytest.raises(NonFiniteTaskVector):
        stream.merge_raw(arrays[0], arrays[1:], out, spec)
    stats = stream.merge_raw(arrays[0], arrays[1:], out, spec, check_finite=False)
    ref = _reference("task_arithmetic", raws, [1.0, 1.0], 0.3, torch.float32)
    torch.testing.assert_close(torch.from_numpy(out), ref, rtol=0, atol=0, equal_nan=True)
    assert not math.isfinite(stats[1].tau_sq) and math.isfinite(stats[0].tau_sq)


def test_a_difference_that_overflows_raises_but_large_squares_do_not():
    base = np.array([-3e38, 0.0, 1.0], np.float32)
    overflow = np.array([3e38, 0.0, 1.0], np.float32)  # τ = 6e38: Inf in float32
    big = np.array([-3e38, 1e20, 1.0], np.float32)  # τ² = 1e40 > float32's max
    out = np.empty(3, np.float32)
    with pytest.raises(NonFiniteTaskVector):
        stream.merge_raw(base, [overflow], out, _spec("task_arithmetic", (1.0,)))
    stats = stream.merge_raw(base, [big], out, _spec("task_arithmetic", (1.0,)))
    assert math.isclose(stats[0].tau_sq, 1e40, rel_tol=1e-6)


@pytest.mark.parametrize("method", ["task_arithmetic", "average"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_the_compiled_kernels_give_the_same_bytes(compiled_kernels, method, out_dtype):
    """The C and numba stream kernels (bf16 merges) against the reference: the
    same bytes; their report norms are float64 sums, close to the exact ones."""
    n = 5003  # several of the kernel's chunks, the last one short
    raws = _inputs(n, [torch.bfloat16] * 4, seed=11)
    weights = (1.0, 0.7, -0.25)
    out = _empty(n, out_dtype)
    arrays = [_np(r) for r in raws]
    stats = stream.merge_raw(arrays[0], arrays[1:], out, _spec(method, weights), kernel=True)
    ref = _reference(method, raws, list(weights), 0.3, out_dtype)
    assert _bytes(out) == _bytes(_np(ref))
    for k, st in enumerate(stats):
        tau = raws[k + 1].to(torch.float32) - raws[0].to(torch.float32)
        assert math.isclose(st.tau_sq, fsum_sq(tau), rel_tol=1e-12)
    # a NaN result (opposite overflows) is left to the numpy path, as is a
    # non-finite task vector
    big = [torch.full((8,), v, dtype=torch.bfloat16) for v in (0.0, 3e38, -3e38)]
    out = _empty(8, torch.bfloat16)
    spec = _spec("task_arithmetic", (2.0, 2.0), scale=1.0)
    b = [_np(t) for t in big]
    stream.merge_raw(b[0], b[1:], out, spec, check_finite=False, kernel=True)
    assert (out == 0x7FC0).all()
    inf = _np(torch.full((8,), float("inf"), dtype=torch.bfloat16))
    with pytest.raises(NonFiniteTaskVector):
        stream.merge_raw(b[0], [b[1], inf], out, spec, kernel=True)
