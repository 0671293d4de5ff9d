"""Model Stock (mergekit's `model_stock`, arXiv 2403.19522): from the mean cosine
c of the angles between the task vectors τ_k = fl32(θ_k − θ0), over all pairs,
t = K·c / (1 + (K−1)·c) and θ = θ0 + Σ_k (t/K)·τ_k (= t·mean θ_k + (1−t)·θ0);
t = 0 where |1 + (K−1)·c| < 1e-6. Per tensor, or per vector along the last axis
(filter_wise). The norms and dot products are exact tensor sums (engine/sums.py)."""

from __future__ import annotations

from ._sums import clamp, gram, gram_pairs, merge_weights
from .registry import Combiner, Param

FILTER_WISE = Param(
    "filter_wise", False, "one t per vector along the last axis (a row of a matrix)"
)


def t_of(g: list[list[float]], k: int) -> float:
    """Model Stock's interpolation ratio from the task vectors' Gram matrix."""
    import math

    cos = []
    for i in range(k):
        for j in range(i + 1, k):
            norm = math.sqrt(g[i][i]) * math.sqrt(g[j][j])
            cos.append(clamp(g[i][j] / max(norm, 1e-6)))
    c = math.fsum(cos) / len(cos)
    denominator = 1.0 + (k - 1) * c
    return 0.0 if abs(denominator) < 1e-6 else k * c / denominator


def statistics(spec, shape, name):
    from ..engine.spec import SumsRequest
    from ..engine.sums import Combination

    k = len(spec.weights)
    layout = "last" if spec.param("filter_wise") else "tensor"
    v = yield SumsRequest("tasks", gram_pairs(list(range(1, k + 1))), layout)
    ts = [t_of(gram(v, k, c), k) / k for c in range(v.shape[1])]
    coef = tuple(ts) if ts else ()
    return Combination("tasks", layout, (None,) + (coef,) * k)


METHOD = Combiner(
    name="model_stock",
    summary="θ0 + t·mean τ_k, t from the mean angle between the task vectors (Model Stock)",
    params=(FILTER_WISE,),
    merge_weights=merge_weights,
    statistics=statistics,
    models=(2, None),
    uses_weights=False,
)
