"""Multi-SLERP (mergekit's `multislerp`): barycentric interpolation of K task
vectors (or, without `tasks`, the models' weights) on the sphere. The unit
vectors u_k = v_k / (|v_k| + eps) are averaged with the weights (normalized to
sum 1 by default), the mean m normalized; each u_k is projected onto the tangent
space at m, their weighted sum T mapped back (cos|T|·m + sin|T|/|T|·T, with eps
added to |T|) and scaled by Σ w_k |v_k|. A vanishing mean (|m| < eps) falls back
to Σ w_k v_k. One model: its weights. Per tensor; every sum an exact tensor sum
(engine/sums.py). The result is a combination of the v_k, so its coefficients
follow from the Gram matrix of the v_k alone."""

from __future__ import annotations

import math

from ._sums import gram, gram_pairs, merge_weights, quad
from .nuslerp import TASKS
from .registry import Combiner, Param

NORMALIZE_WEIGHTS = Param("normalize_weights", True, "divide the weights by their sum")
EPS = Param("eps", 1e-8, "added to the norms divided by", lo=0.0, lo_open=True)


def coefficients(w: list[float], g: list[list[float]], eps: float) -> list[float]:
    """c with result = Σ_k c_k v_k, from the weights and the Gram matrix of v. Values
    that overflow float64 (huge weights without normalize_weights: cos(inf), inf − inf
    in fsum) give NaN coefficients, so the output is refused as any overflow is."""
    try:
        return _coefficients(w, g, eps)
    except (ValueError, OverflowError):
        return [math.nan] * len(w)


def _coefficients(w: list[float], g: list[list[float]], eps: float) -> list[float]:
    k = len(w)
    norms = [math.sqrt(max(g[i][i], 0.0)) for i in range(k)]
    a = [w[i] / (norms[i] + eps) for i in range(k)]  # the mean m = Σ a_i v_i
    mean_norm = math.sqrt(max(quad(a, g), 0.0))
    if mean_norm < eps:
        return list(w)
    b = [x / mean_norm for x in a]  # m / |m|
    gb = [math.fsum(g[i][j] * b[j] for j in range(k)) for i in range(k)]
    dots = [gb[i] / (norms[i] + eps) for i in range(k)]  # u_i · m/|m|
    d = math.fsum(w[i] * dots[i] for i in range(k))
    tangent = [a[i] - d * b[i] for i in range(k)]  # T = Σ w_i (u_i − dots_i m/|m|)
    tn = math.sqrt(max(quad(tangent, g), 0.0)) + eps
    cos, sin_over = math.cos(tn), math.sin(tn) / tn
    scale = math.fsum(w[i] * norms[i] for i in range(k))
    return [(b[i] * cos + tangent[i] * sin_over) * scale for i in range(k)]


def statistics(spec, shape, name):
    from ..engine.spec import SumsRequest
    from ..engine.sums import Combination

    w = list(spec.weights)
    k = len(w)
    if k == 1:
        return Combination("weights", "tensor", (None, (1.0,)))
        yield  # (a generator: no round)
    if spec.param("normalize_weights"):
        total = math.fsum(w)
        w = [x / total for x in w]
    vectors = "tasks" if spec.param("tasks") else "weights"
    v = yield SumsRequest(vectors, gram_pairs(list(range(1, k + 1))))
    c = coefficients(w, gram(v, k), spec.param("eps"))
    return Combination(vectors, "tensor", (None,) + tuple((x,) for x in c))


METHOD = Combiner(
    name="multislerp",
    summary="barycentric spherical interpolation of K task vectors (or models) with weights",
    params=(TASKS, NORMALIZE_WEIGHTS, EPS),
    merge_weights=merge_weights,
    statistics=statistics,
)
