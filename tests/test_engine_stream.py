"""Streamed merges (engine/stream.py: the C stream kernel) against the torch reference.

merge_raw makes task arithmetic and averaging chunk by chunk from the inputs'
own dtypes; it must give the bytes of the definition (SPEC section 5: τ_k in
float32, products before sums in task order, one cast at the end, rounded as
torch rounds) and report Σ τ_k² (float64 sums: close to the exact ones), for
any length and any mix of input and output dtypes. merge_raw works on numpy
arrays (bf16 as uint16 bit patterns); the reference is the torch one. Where
the C kernels are unavailable these blocks are merge_block's (no stream).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference import combine, fsum_sq

from tadmerge.engine import stream
from tadmerge.engine.block import MergeSpec, NonFiniteTaskVector
from tadmerge.engine.spec import SparsifySpec


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


# every test here runs the C kernel
pytestmark = pytest.mark.usefixtures("c_kernels")


def _reference(method, raws, weights, scale, out_dtype) -> torch.Tensor:
    thetas = [r.to(torch.float32) for r in raws]
    taus = [t - thetas[0] for t in thetas[1:]]
    merged = combine(method, thetas[0], thetas[1:], taus, weights, scale, sparse=False)
    return merged.to(out_dtype)


@pytest.mark.parametrize("method", ["task_arithmetic", "average"])
@pytest.mark.parametrize("n", [1, 2047, 2049, 5003])
@pytest.mark.parametrize(
    "dtypes,out_dtype",
    [
        ([torch.bfloat16] * 4, torch.bfloat16),
        ([torch.bfloat16] * 4, torch.float32),
        ([torch.float32, torch.bfloat16, torch.float16, torch.float32], torch.float32),
        ([torch.float16] * 3, torch.bfloat16),
        ([torch.bfloat16, torch.float64, torch.bfloat16], torch.float16),
        ([torch.float64, torch.float32], torch.float64),
    ],
)
def test_streamed_merge_is_the_reference_bit_for_bit(method, n, dtypes, out_dtype):
    """The kernel's chunks (2048 entries) end mid-way through the blocks."""
    raws = _inputs(n, dtypes, seed=n)
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
        assert math.isclose(st.tau_sq, fsum_sq(tau), rel_tol=1e-12)


def test_float16_rounds_as_torch_rounds():
    """float32 results narrowed to float16 as torch narrows them: halfway cases,
    subnormals, the largest finite value and the first that rounds to Inf, and
    float16 inputs widened exactly (every pattern but NaN)."""
    g = torch.Generator().manual_seed(5)
    x = (torch.rand(200_000, generator=g) - 0.5) * 2.0 ** torch.randint(
        -30, 18, (200_000,), generator=g
    )
    edges = [
        65504.0,
        65519.99,
        65520.0,
        2**-24,
        2**-25,
        3 * 2**-26,
        6.1e-5,
        1 + 2**-11,
        1 + 3 * 2**-11,
    ]
    x = torch.cat([x, torch.tensor(edges), -torch.tensor(edges)])
    zero = np.zeros(x.numel(), np.float32)
    out = np.empty(x.numel(), np.float16)
    assert stream.merge_raw(zero, [x.numpy()], out, _spec("task_arithmetic", (1.0,), 1.0))
    ref = _reference("task_arithmetic", [torch.zeros_like(x), x], [1.0], 1.0, torch.float16)
    assert _bytes(out) == _bytes(_np(ref))
    h = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)
    h = h[~torch.isnan(h)]
    out = np.empty(h.numel(), np.float32)
    zero = np.zeros(h.numel(), np.float16)
    stream.merge_raw(zero, [_np(h)], out, _spec("average", (1.0,)), check_finite=False)
    assert _bytes(out) == _bytes(_np(_reference("average", [h * 0, h], [1.0], 1.0, torch.float32)))


def test_only_merges_without_a_sparsifier_on_a_cpu_with_the_c_kernels_stream():
    ta, avg = _spec("task_arithmetic", (1.0,)), _spec("average", (1.0,))
    for backend in ("c", "auto"):
        assert stream.streams(ta, "cpu", ["BF16", "F32"], backend)
        assert stream.streams(avg, "cpu", ["F16", "F64"], backend)
    assert not stream.streams(_spec("ties", (1.0,)), "cpu", ["BF16"], "c")
    assert not stream.streams(ta, "cuda", ["BF16"], "c")
    assert not stream.streams(ta, "cpu", ["BF16", "F8_E4M3"], "c")  # no numpy dtype: merge_block
    tadrop = MergeSpec(SparsifySpec(method="tadrop"), "task_arithmetic", weights=(1.0,))
    assert not stream.streams(tadrop, "cpu", ["BF16"], "c")
    assert not stream.streams(ta, "cpu", ["BF16"], "torch")  # the torch reference: merge_block


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_inf_rounds_as_torch_does_and_a_nan_result_is_left_to_torch(in_dtype, out_dtype):
    """With allow_nonfinite, Inf and every finite value are written as torch
    rounds them; a block with a NaN result is handed back (None), for
    merge_block to write with torch's NaN bits."""
    base = torch.tensor([0.0, 1.0, -2.0, 0.0, 3e38, -3e38, 5.0, 0.0])
    m1 = torch.tensor([1.0, float("inf"), -float("inf"), 1.0, 3e38, -3e38, 5.0, -0.0])
    m2 = torch.tensor([1.0, 1.0, 1.0, 2.0, 3e38, -3e38, 7e4, 0.0])
    base, m1, m2 = (t.to(in_dtype) for t in (base, m1, m2))
    spec = _spec("task_arithmetic", (2.0, 1.0), scale=1.0)
    out = _empty(8, out_dtype)
    stats = stream.merge_raw(_np(base), [_np(m1), _np(m2)], out, spec, check_finite=False)
    ref = _reference("task_arithmetic", [base, m1, m2], [2.0, 1.0], 1.0, out_dtype)
    assert stats is not None and not torch.isnan(ref).any() and torch.isinf(ref).any()
    assert _bytes(out) == _bytes(_np(ref))
    m1[0] = float("nan")
    assert stream.merge_raw(_np(base), [_np(m1), _np(m2)], out, spec, check_finite=False) is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_task_vector_raises(bad):
    raws = _inputs(5000, [torch.float32] * 3, seed=1)
    raws[2][4517] = bad
    spec = _spec("task_arithmetic", (1.0, 1.0))
    out = _empty(5000, torch.float32)
    arrays = [_np(r) for r in raws]
    with pytest.raises(NonFiniteTaskVector) as e:
        stream.merge_raw(arrays[0], arrays[1:], out, spec)
    assert e.value.args[0] == 1
    stats = stream.merge_raw(arrays[0], arrays[1:], out, spec, check_finite=False)
    if bad != bad:  # NaN: merge_block's
        assert stats is None
    else:
        ref = _reference("task_arithmetic", raws, [1.0, 1.0], 0.3, torch.float32)
        assert _bytes(out) == _bytes(_np(ref))
        assert not math.isfinite(stats[1].tau_sq) and math.isfinite(stats[0].tau_sq)


def test_a_difference_that_overflows_raises_but_large_squares_do_not():
    base = np.array([-3e38, 0.0, 1.0], np.float32)
    overflow = np.array([3e38, 0.0, 1.0], np.float32)  # τ = 6e38: Inf in float32
    big = np.array([-3e38, 1e20, 1.0], np.float32)  # τ² = 1e40 > float32's max
    out = np.empty(3, np.float32)
    with pytest.raises(NonFiniteTaskVector):
        stream.merge_raw(base, [overflow], out, _spec("task_arithmetic", (1.0,)))
    stats = stream.merge_raw(base, [big], out, _spec("task_arithmetic", (1.0,)))
    assert stats[0].tau_sq == float(np.float32(1e20)) ** 2  # (float64 sums: exact here)
