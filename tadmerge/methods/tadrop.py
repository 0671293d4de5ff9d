"""TADrop, Tensor-wise Adaptive Drop (arXiv 2508.06163; SPEC section 3).

Per tensor of each task vector: d = min(Q_low(|τ|) / (Q_high(|τ|) + eps), max_drop),
drop the floor(d·n) smallest entries of |τ| (ties by flat index), and rescale the
kept ones (by default so that the L2 norm is restored). With scope global, d comes
from the whole task vector's quantiles and the cut is still made per tensor.
"""

from __future__ import annotations

import math

from ._common import EPS, SCOPE, rescale
from .registry import MAGNITUDE, Param, Sparsifier


def drop_rate(index, spec):
    """d and the two quantiles, from the exact histograms (engine/selection.py)."""
    from ..engine.selection import tadrop_rate

    return (yield from tadrop_rate(index, spec, predict_cut=True))


def keep_range(n: int, spec, rate: float) -> tuple[int, int]:
    return math.floor(rate * n), n


def _check(values, where: str) -> str | None:
    if values["low_q"] >= values["high_q"]:
        low, high = values["low_q"], values["high_q"]
        return f"{where}.low_q ({low}) must be below {where}.high_q ({high})"
    return None


METHOD = Sparsifier(
    name="tadrop",
    summary="drop rate per tensor d = Q_low/Q_high of |τ|, drop the d·n smallest, rescale",
    family=MAGNITUDE,
    params=(
        SCOPE,
        Param("low_q", 0.5, "quantile a of d = Q_a/Q_b", lo=0.0, hi=1.0),
        Param("high_q", 0.95, "quantile b of d = Q_a/Q_b", lo=0.0, hi=1.0),
        Param("max_drop", 1.0, "upper bound on the drop rate d", lo=0.0, hi=1.0),
        rescale("l2"),
        EPS,
    ),
    # the fine histograms of the several buckets TADrop's quantiles and cut fall in
    extra_bytes=lambda k: 4,
    check=_check,
    report_fields=("q_low", "q_high", "scale"),
    drop_rate=drop_rate,
    keep_range=keep_range,
)
