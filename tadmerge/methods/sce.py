"""SCE, Select-Calculate-Erase (mergekit's `sce`, arXiv 2408.07990).

Select: with select_topk < 1, keep the floor(select_topk · m) entries of largest
variance across the K task vectors (m: entries of non-zero variance), one
selection for every task; ties at the cut keep the larger flat index (the
order is variance ascending, then flat index). Calculate: w_k = mean of the
selected t_k², normalised to sum 1 (1/K each when Σ < 1e-6). Erase: elect the
sign of Σ_k t_k per entry (+ when >= 0) and take Σ_k w_k t_k over the tasks of
that sign, divided by max(Σ_k w_k over them, 1e-6). θ = θ0 + that.

The variance is a derived per-element score (float32, in a fixed order:
mean = Σ_k t_k / K, var = Σ_k (t_k − mean)² / K, tasks in order) whose exact
rank cut is resolved like a magnitude selection, and Σ t_k² is an exact sum
(engine/sums.py): both are whole-tensor statistics that any split resolves to
the same values (Combiner.statistics). With a sparsifier (TADrop, say), t_k is its
output, and the variance selection, if any, comes after it.
"""

from __future__ import annotations

import math

from .registry import Combiner, Param

MIN_DEN = 1e-6  # mergekit's floor of the divisor and of Σ w
SCORE_CHUNK = 1 << 18


def variance(ts, spec=None):
    """Per entry, the population variance of t_1..t_K in float32 (fixed order)."""
    import torch

    n = ts[0].numel()
    k = torch.tensor(float(len(ts)), dtype=torch.float32, device=ts[0].device)
    out = torch.empty(n, dtype=torch.float32, device=ts[0].device)
    for a in range(0, n, SCORE_CHUNK):
        cs = [t.reshape(-1)[a : a + SCORE_CHUNK] for t in ts]
        mean = cs[0].clone()
        for c in cs[1:]:
            mean.add_(c)
        mean.div_(k)
        var = None
        for c in cs:
            d = torch.sub(c, mean).square_()
            var = d if var is None else var.add_(d)
        out[a : a + SCORE_CHUNK] = var.div_(k)
    return out


def statistics(spec, shape, name):
    """The variance cut (select_topk < 1): ranks [n − floor(select_topk · m), n)
    of the ascending variance order, m the entries of non-zero variance; then
    w_k from each task's Σ t_k² after it."""
    from ..engine.spec import CutRequest, ScoreRequest, SumsRequest

    if spec.param("select_topk") < 1.0:
        index = yield ScoreRequest()
        zeros = 0
        if index.n and index.stats.counts[0]:  # variances exactly +0.0 (key 0)
            index = yield ScoreRequest(buckets=(0,))
            zeros = index.count_at(0)
        yield CutRequest(
            index.n - math.floor(spec.param("select_topk") * (index.n - zeros)), index.n
        )
    k = len(spec.weights)
    v = yield SumsRequest("tasks", tuple((j, j) for j in range(1, k + 1)))
    return {"weights": weights([float(x[0]) for x in v], math.prod(shape))}


def weights(sq_sums: list[float], n: int) -> list[float]:
    """w_k = mean t_k² / Σ_j mean t_j², or 1/K each when that sum is below 1e-6."""
    means = [s / n if n else 0.0 for s in sq_sums]
    total = math.fsum(means)
    if abs(total) < MIN_DEN:
        return [1.0 / len(means)] * len(means)
    return [m / total for m in means]


def sce_delta(ts, w: list[float]):
    """Σ_k [sign(t_k) = s] fl32(w_k)·t_k / max(Σ_k [sign(t_k) = s] fl32(w_k), 1e-6),
    s = + where Σ_k t_k >= 0 (task order, float32). Consumes `ts`."""
    import torch

    f = torch.float32
    dev = ts[0].device
    total = ts[0].clone()
    for t in ts[1:]:
        total.add_(t)
    up = total >= 0
    del total
    num = den = None
    for t, wk in zip(ts, w, strict=True):
        agree = torch.where(up, t > 0, t < 0)
        wt = torch.tensor(wk, dtype=f, device=dev)
        p = torch.where(agree, t * wt, 0.0)
        d = torch.where(agree, wt, 0.0)
        num = p if num is None else num.add_(p)
        den = d if den is None else den.add_(d)
    return num.div_(den.clamp_min_(torch.tensor(MIN_DEN, dtype=f, device=dev)))


def merge_block(base, taus, plans, spec, ctx, sparsify, chunks, check_finite):
    from ..engine import tensor_stats as TS
    from ..engine.block import BlockResult, store
    from ..engine.sparsify import BlockCuts

    for a, b in chunks:
        sparsify(a, b)
    st = TS.resolve(base, taus, spec, ctx)  # (resolved here: the cut is applied)
    cuts = None if st["cut"] is None else BlockCuts(*st["cut"])
    w = st["values"]["weights"]
    for a, b in chunks:
        ts = [t[a:b] for t in taus]
        if cuts is not None:
            TS.masked(ts, cuts, variance(ts))
        store(taus[0][a:b], sce_delta(ts, w).add_(base[a:b]))
    return BlockResult(taus[0], None, [tp.stats for tp in plans])


METHOD = Combiner(
    name="sce",
    summary="keep the select_topk share of entries of largest variance across tasks, then "
    "a sign-elected mean weighted by each task's mean t_k² (mergekit's sce)",
    params=(
        Param(
            "select_topk",
            1.0,
            "share of the entries of non-zero variance kept (1: all)",
            lo=0.0,
            hi=1.0,
        ),
    ),
    # the variance of the whole block (4 bytes) when it resolves its own cut
    extra_bytes=lambda k: 6,
    merge_block=merge_block,
    statistics=statistics,
    score=lambda base, ts, spec, shape: variance(ts),
    uses_weights=False,
)
