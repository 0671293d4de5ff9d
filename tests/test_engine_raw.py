"""Magnitude selections merged from raw bf16 inputs (engine/raw.py).

merge_raw_sparse never stores τ_k: it counts, scans for ties and applies the cut
from the 16-bit patterns. Its bytes must be the definition's (SPEC sections 3-5:
stable |τ| order, exact quantiles and norms, products before sums in task order,
one cast at the end), for whole tensors that resolve their own selection and
for blocks of a split tensor that apply a resolved one; the kernels it is built
from must agree with plain torch computations of the same things.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference as R
import torch

from tadmerge.engine import kernels
from tadmerge.engine.block import BlockContext, MergeSpec, NonFiniteTaskVector
from tadmerge.engine.exact import coarse_stats
from tadmerge.engine.histogram import RankIndex
from tadmerge.engine.keys import KeyChunks
from tadmerge.engine.raw import applies, merge_raw_sparse
from tadmerge.engine.selection import resolve_selection, run_locally
from tadmerge.engine.spec import SparsifySpec

# every test runs the C kernels (the raw path takes no other)
pytestmark = pytest.mark.usefixtures("c_kernels")

SPARSIFIERS = {
    "tadrop": {"method": "tadrop", "low_q": 0.5, "high_q": 0.95, "rescale": "l2"},
    "tadrop-inverse": {"method": "tadrop", "low_q": 0.4, "high_q": 0.9, "rescale": "inverse_keep"},
    "magnitude": {"method": "magnitude", "density": 0.3, "rescale": "none"},
    "breadcrumbs": {"method": "breadcrumbs", "density": 0.6, "gamma": 0.05, "rescale": "l1"},
}


def _bf16_inputs(n: int, k: int, seed: int) -> list[torch.Tensor]:
    """bf16 base and fine-tunes: heavy-tailed moves, many entries unmoved (τ = 0)
    and, bf16 being coarse, long runs of equal |τ| at every cut."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
    out = [base]
    for _ in range(k):
        tau = torch.randn(n, generator=g) * 1e-3 * torch.rand(n, generator=g) ** 3
        m = (base.float() + tau).to(torch.bfloat16)
        still = torch.rand(n, generator=g) < 0.25
        m[still] = base[still]
        out.append(m)
    return out


def _np(x: torch.Tensor) -> np.ndarray:
    """A tensor as merge_raw_sparse takes it (bf16: its patterns), sharing memory."""
    return x.view(torch.int16).numpy().view(np.uint16) if x.dtype == torch.bfloat16 else x.numpy()


def _merge(raws: list[torch.Tensor], out: torch.Tensor, spec, ctx):
    return merge_raw_sparse(_np(raws[0]), [_np(r) for r in raws[1:]], _np(out), spec, ctx)


def _sp(d: dict) -> SparsifySpec:
    return SparsifySpec(**{k: v for k, v in d.items()})


def _reference(raws, sp: dict, method: str, weights, scale, out_dtype) -> torch.Tensor:
    thetas = [r.float() for r in raws]
    taus = [t - thetas[0] for t in thetas[1:]]
    ts = [R.sparsify(t, sp, task=i, name="x", seed=0, block_rows=1) for i, t in enumerate(taus)]
    return R.combine(method, thetas[0], thetas[1:], ts, list(weights), scale).to(out_dtype)


@pytest.mark.parametrize("sname", list(SPARSIFIERS))
@pytest.mark.parametrize("method", ["task_arithmetic", "average"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", [1, 3])
def test_whole_tensor_is_the_reference_bit_for_bit(sname, method, out_dtype, k):
    n = 6007  # not a multiple of the kernels' chunks or of two
    raws = _bf16_inputs(n, k, seed=k * 31 + len(sname))
    weights = (1.0, -0.5, 2.25)[:k]
    spec = MergeSpec(_sp(SPARSIFIERS[sname]), method, scale=0.7, weights=weights)
    out = torch.empty(n, dtype=out_dtype)
    stats = _merge(raws, out, spec, BlockContext("x", (n,), 0, n, n, True))
    assert stats is not None
    want = _reference(raws, SPARSIFIERS[sname], method, weights, 0.7, out_dtype)
    assert torch.equal(out.view(torch.uint8), want.view(torch.uint8))
    for i, st in enumerate(stats):
        tau = raws[i + 1].float() - raws[0].float()
        assert st.kept == st.selection.kept  # the kernel's count is the selection's
        assert math.isclose(st.tau_sq, R.fsum_sq(tau), rel_tol=1e-12)


def test_blocks_of_a_split_tensor_apply_the_resolved_selection():
    """Blocks given the tensor's selection and their tie quotas (the stats stage's
    job, done here by hand) make the reference's bytes together; the block
    boundaries fall inside runs of tied magnitudes at both cuts."""
    n, k = 9000, 3
    raws = _bf16_inputs(n, k, seed=5)
    sp = SPARSIFIERS["tadrop"]
    weights = (0.5, 1.0, 1.5)
    spec = MergeSpec(_sp(sp), "task_arithmetic", scale=0.3, weights=weights)
    sels, keys_of = [], []
    for i in range(k):
        tau = raws[i + 1].float() - raws[0].float()
        index = RankIndex(coarse_stats(KeyChunks(tau), moments=2))
        sels.append(run_locally(resolve_selection(index, spec.sparsify), KeyChunks(tau), index))
        keys_of.append(tau.view(torch.int32) & 0x7FFFFFFF)
    assert all(s.tau_sq is not None for s in sels)
    out = torch.empty(n, dtype=torch.bfloat16)
    bounds = [0, 1234, 5000, n]
    for a, b in zip(bounds, bounds[1:], strict=False):
        quotas = []
        for sel, keys in zip(sels, keys_of, strict=True):
            q = []
            for cut in (sel.lo, sel.hi):
                # the cut's ties in flat order that fall below it, and this block's share
                ties = (keys == cut.key).nonzero().view(-1)
                below = ties[: cut.quota] if cut.key >= 0 else ties[:0]
                q.append(int(((below >= a) & (below < b)).sum()))
            quotas.append(tuple(q))
        ctx = BlockContext("x", (n,), a, b, 1, False, selections=sels, quotas=quotas)
        got = _merge([r[a:b] for r in raws], out[a:b], spec, ctx)
        assert got is not None and all(st.selection is None for st in got)
    want = _reference(raws, sp, "task_arithmetic", weights, 0.3, torch.bfloat16)
    assert torch.equal(out.view(torch.int16), want.view(torch.int16))


def test_a_selection_without_norms_or_keys_not_sparse_are_handed_back():
    n = 4096
    raws = _bf16_inputs(n, 2, seed=1)
    spec = MergeSpec(_sp(SPARSIFIERS["magnitude"]), "task_arithmetic", 1.0, weights=(1.0, 1.0))
    out = torch.empty(n, dtype=torch.bfloat16)
    tau = raws[1].float() - raws[0].float()
    index = RankIndex(coarse_stats(KeyChunks(tau), moments=0))
    sel = run_locally(resolve_selection(index, spec.sparsify), KeyChunks(tau), index)
    assert sel.tau_sq is None  # rescale none: no norms gathered
    ctx = BlockContext("x", (2 * n,), 0, n, 1, False, selections=[sel, sel], quotas=[(0, 0)] * 2)
    assert not applies(ctx)  # the worker asks before it reads the block
    assert _merge(raws, out, spec, ctx) is None
    # a base far from the models: differences with many significant bits
    far = [torch.full((n,), 3.0, dtype=torch.bfloat16), raws[1], raws[2]]
    whole = BlockContext("x", (n,), 0, n, n, True)
    assert _merge(far, out, spec, whole) is None


def test_non_finite_task_vector_raises():
    n = 1000
    raws = _bf16_inputs(n, 2, seed=2)
    raws[2][17] = float("inf")
    spec = MergeSpec(_sp(SPARSIFIERS["tadrop"]), "task_arithmetic", 1.0, weights=(1.0, 1.0))
    with pytest.raises(NonFiniteTaskVector) as e:
        _merge(
            raws, torch.empty(n, dtype=torch.bfloat16), spec, BlockContext("x", (n,), 0, n, n, True)
        )
    assert e.value.task == 1


def _u16(x: torch.Tensor) -> np.ndarray:
    return x.view(torch.int16).numpy().view(np.uint16)


def test_raw_kernels_agree_with_torch_on_the_task_vector():
    n = 7001
    base, task = _bf16_inputs(n, 1, seed=3)
    keys = (task.float() - base.float()).view(torch.int32) & 0x7FFFFFFF
    counts, side = kernels.coarse_sparse_raw(base, task)
    assert torch.equal(torch.from_numpy(counts), torch.bincount(keys >> 16, minlength=1 << 15))
    low = keys[(keys & 0xFFFF) != 0]
    assert sorted(side.tolist()) == sorted(low.tolist())
    key = int(torch.mode(keys).values)  # the commonest magnitude: a long run of ties
    ties = (keys == key).nonzero().view(-1)
    for quota in (1, 2, len(ties) // 2, len(ties)):
        assert kernels.tie_end_raw(base, task, key, quota) == int(ties[quota - 1]) + 1
    assert kernels.tie_end_raw(base, task, key, 0) == 0


def test_cut_combine_raw_reports_nan_results():
    """Products that overflow to +Inf and -Inf in one entry make NaN: the block is
    handed back (torch's NaN bits are torch's to choose)."""
    base = torch.zeros(5, dtype=torch.bfloat16)
    a = torch.tensor([1e38, 1.0, 2.0, 3.0, 4.0], dtype=torch.bfloat16)
    b = torch.tensor([-1e38, 1.0, 2.0, 3.0, 4.0], dtype=torch.bfloat16)
    keep_all = (0, 0, -1, 0, 1e3)  # (lo: rank 0, nothing below; hi: rank n, all below)
    out = torch.empty(5, dtype=torch.bfloat16)
    got = kernels.cut_combine_raw(base, [a, b], [keep_all] * 2, [1.0, 1.0], 1.0, False, out)
    assert got is None
    fine = (0, 0, -1, 0, 1.0)
    kept = kernels.cut_combine_raw(base, [a, b], [fine] * 2, [1.0, 1.0], 1.0, False, out)
    assert kept == [5, 5] and out[1:].tolist() == [2.0, 4.0, 6.0, 8.0]
