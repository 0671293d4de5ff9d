"""DARE/DELLA's random draws (engine/sparsify.py: uniform_stream, uniform_into).

A counter-based stream: each draw is a hash of the canonical block's key and
the element's index in it, so the numbers cannot depend on the split, the
chunking or the device. Checked against tests/reference.py's numpy version of
the definition in docs/semantics.md (written from the definition, not from the
engine), on the torch ops and on the C twin (native_kernels.c) alike.
"""

from __future__ import annotations

import pytest
import reference as R
import torch

from tadmerge.engine import native, sparsify
from tadmerge.engine.sparsify import block_draws, stream_seed, uniform_into, uniform_stream

ROWS, ROW_NUMEL, RNG_ROWS = 37, 11, 5  # canonical blocks of 55 entries, the last one short


@pytest.fixture(params=["torch", "c"])
def backend(request):
    """The draws by torch ops, then by the C kernel (kernels.uniform_draws)."""
    if request.param == "c" and not native.available():
        pytest.skip(f"C kernels {native.describe()}")
    return request.param


def _whole(seed: int = 3, task: int = 1, name: str = "w", backend: str = "torch") -> torch.Tensor:
    return uniform_stream(seed, task, name, 0, ROWS, RNG_ROWS, ROW_NUMEL, backend=backend)


def test_the_draws_are_the_documented_hash(backend):
    got = _whole(backend=backend)
    want = R.stream(3, 1, "w", 0, ROWS, RNG_ROWS, ROW_NUMEL)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    # in [0, 1) on the 2**-24 grid: exactly representable in float32
    assert float(got.min()) >= 0.0 and float(got.max()) < 1.0
    assert torch.equal(got * 2**24, (got * 2**24).round())
    # another seed, task or tensor is another stream
    for other in (_whole(4, backend=backend), _whole(task=2), _whole(name="v", backend=backend)):
        assert not torch.equal(other, got)


@pytest.mark.parametrize("cuts", [[0, 1, 5, 6, 20, 37], [0, 3, 4, 36, 37], [0, 19, 37]])
def test_any_row_split_sees_the_same_numbers(cuts, backend):
    """Units start on canonical blocks in the engine; the stream holds for any rows."""
    whole = _whole()
    pairs = zip(cuts[:-1], cuts[1:], strict=True)
    parts = [
        uniform_stream(3, 1, "w", a, b, RNG_ROWS, ROW_NUMEL, backend=backend) for a, b in pairs
    ]
    assert torch.equal(torch.cat(parts), whole)


def test_any_chunking_sees_the_same_numbers(monkeypatch, backend):
    """DARE makes its draws chunk by chunk (uniform_into); small hash pieces too."""
    whole = _whole()
    monkeypatch.setattr(sparsify, "DRAW_CHUNK", 7)
    assert torch.equal(_whole(backend=backend), whole)
    n = whole.numel()
    for step in (1, 13, 54, 56, n):
        got = torch.empty(n)
        for a in range(0, n, step):
            uniform_into(got[a : a + step], 3, 1, "w", a, RNG_ROWS, ROW_NUMEL, backend)
        assert torch.equal(got, whole), step


def test_indices_past_two_to_the_32(backend):
    """A row longer than 2**32 entries: the index's high lane enters the keys,
    and a piece never crosses the boundary."""
    key = stream_seed(5, 0, "huge", 0)
    start = (1 << 32) - 6
    got = torch.empty(12)
    block_draws(key, start, got, backend)
    want = torch.from_numpy(R.block_uniforms(key, 12, start=start)).float()
    assert torch.equal(got, want)
    assert not torch.equal(got[6:], torch.from_numpy(R.block_uniforms(key, 6)).float())


def test_the_draws_look_uniform():
    """A sanity check of the hash (not a test suite for it): mean, spread and
    neighbours of 2**18 draws."""
    u = uniform_stream(0, 0, "big", 0, 1 << 10, 1 << 8, 1 << 8).double()
    n = u.numel()
    assert abs(float(u.mean()) - 0.5) < 4 * (1 / 12 / n) ** 0.5
    hist = torch.histc(u, bins=16, min=0.0, max=1.0)
    assert float(((hist - n / 16) ** 2 / (n / 16)).sum()) < 40  # chi-square, 15 dof
    corr = torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1]
    assert abs(float(corr)) < 0.01


def test_the_c_twin_gives_the_torch_bits(backend):
    """kernels.uniform_draws against the torch ops over a long range (the C
    loop's vector body and its tail), at offsets that wrap the low lane's
    arithmetic nowhere but at 2**32."""
    if backend == "torch":
        pytest.skip("the C twin against torch")
    key = stream_seed(1, 2, "long", 64)
    for start, n in ((0, 100_003), ((1 << 32) - 70_001, 70_001), (123_456_789, 17)):
        torch_bits, c_bits = torch.empty(n), torch.empty(n)
        block_draws(key, start, torch_bits, "torch")
        block_draws(key, start, c_bits, "c")
        assert torch.equal(c_bits, torch_bits), start
