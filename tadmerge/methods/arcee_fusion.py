"""Arcee Fusion (mergekit's `arcee_fusion`): θ = θ0 + t·[I >= T], one model.

The importance of an entry is I = |t| · KL(p ‖ q) of its row (the last
dimension; a 1-D tensor is one row, a 0-D one a row of one), with
p = softmax(θ0 + t) + 1e-8 and q = softmax(θ0) + 1e-8 over the row:
KL = Σ_j p_j·log(p_j / q_j). The threshold is T = median + 1.5·(Q3 − Q1) of I
over the whole tensor, Q at the exact ranks floor(q·(n − 1)) of the ascending
order (q = 1/4, 1/2, 3/4), in float32 arithmetic; entries with I >= T take the
model's change. Without a sparsifier t is θ_1 − θ0; with one, θ_1 is taken as
θ0 + t_1.

Exact for any split: the rows are whole in every block (the planner never
splits a 1-D tensor: Combiner.whole_rows), and each row's softmax and sum are
torch's row-by-row reductions (row_kl), so every entry's I is the same float32
wherever it is computed (tests/test_whole_tensor_methods.py holds it). KL may
be slightly negative (rounding, and the 1e-8 added to p and q), so I is a
signed score: its quantiles come from the exact
histograms of its 32-bit order keys (engine/signed.py), as the combiner's
whole-tensor statistics (Combiner.statistics).
"""

from __future__ import annotations

from .registry import Combiner

EPS = 1e-8  # mergekit's floor added to both softmaxes
IQR_GAIN = 1.5
ROW_CHUNK = 1 << 18  # elements of whole rows scored at a time


def row_kl(base_rows, model_rows):
    """KL(p ‖ q) per row of [R, C] float32 rows, p and q the softmaxes of model
    and base rows plus EPS, by torch's softmax and sum over the last dimension,
    as mergekit computes them: KL is mostly rounding noise where the rows barely
    differ, so it is only the same as mergekit's when it is the same operations.
    Those work row by row (their result for a row does not depend on the other
    rows) once there are two rows or more: a single row, whose sum torch would
    split over threads, is reduced beside a copy of itself."""
    import torch

    single = base_rows.shape[0] == 1
    if single:
        base_rows = base_rows.expand(2, -1)
        model_rows = model_rows.expand(2, -1)
    p = torch.softmax(model_rows, dim=-1).add_(EPS)
    q = torch.softmax(base_rows, dim=-1).add_(EPS)
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return kl[:1] if single else kl


def importance(base, ts, spec, shape):
    """I = |t| · KL of the entry's row, float32, for whole rows of `shape`."""
    import torch

    t = ts[0].reshape(-1)
    b = base.reshape(-1)
    n = t.numel()
    c = shape[-1] if len(shape) >= 1 else 1
    out = torch.empty(n, dtype=torch.float32, device=t.device)
    if n == 0 or c == 0:
        return out
    step = max(1, ROW_CHUNK // c) * c
    for a in range(0, n, step):
        e = min(n, a + step)
        x0 = b[a:e].view(-1, c)
        kl = row_kl(x0, torch.add(x0, t[a:e].view(-1, c)))
        out[a:e] = torch.abs(t[a:e]).view(-1, c).mul_(kl).view(-1)
    return out


def quantile_ranks(n: int) -> tuple[int, int, int]:
    """floor(q·(n − 1)) for q = 1/4, 1/2, 3/4 (exact integers)."""
    return (n - 1) // 4, (n - 1) // 2, 3 * (n - 1) // 4


def threshold_of(q1: float, median: float, q3: float) -> float:
    """median + 1.5·(Q3 − Q1), each step rounded to float32 (as mergekit's tensors)."""
    import numpy as np

    f = np.float32
    with np.errstate(over="ignore", invalid="ignore"):
        return float(f(median) + f(IQR_GAIN) * (f(q3) - f(q1)))


def statistics(spec, shape, name):
    """The tensor's T from the exact order statistics of I."""
    from ..engine.spec import ScoreRequest

    index = yield ScoreRequest(signed=True)
    if index.n == 0:
        return {"threshold": 0.0}
    ranks = quantile_ranks(index.n)
    index = yield ScoreRequest(True, tuple(sorted(index.missing(list(ranks)))))
    q1, median, q3 = (index.value_at(r) for r in ranks)
    return {"threshold": threshold_of(q1, median, q3)}


def merge_block(base, taus, plans, spec, ctx, sparsify, chunks, check_finite):
    import torch

    from ..engine import tensor_stats as TS
    from ..engine.block import BlockResult, store

    for a, b in chunks:
        sparsify(a, b)
    score = importance(base, taus, spec, ctx.shape)
    values = TS.resolve(base, taus, spec, ctx, score=score)["values"]
    thr = torch.tensor(values["threshold"], dtype=torch.float32, device=base.device)
    t = taus[0]
    for a, b in chunks:
        keep = score[a:b].ge(thr).to(torch.float32)
        store(t[a:b], t[a:b].mul_(keep).add_(base[a:b]))  # θ0 + t·mask, as mergekit
    return BlockResult(t, None, [tp.stats for tp in plans])


METHOD = Combiner(
    name="arcee_fusion",
    summary="θ0 + t·[I >= median + 1.5·IQR of I], I = |t|·KL(softmax(θ_1) ‖ softmax(θ0)) of "
    "its row (mergekit's arcee_fusion; one model)",
    # the whole block's importance (4 bytes) and a row chunk's softmax temporaries
    extra_bytes=lambda k: 8,
    merge_block=merge_block,
    statistics=statistics,
    score=importance,
    models=(1, 1),
    whole_rows=True,
    uses_weights=False,
)
