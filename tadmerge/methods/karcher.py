"""Karcher mean (mergekit's `karcher`): the weighted Riemannian mean on the unit
sphere of the models' weights (equal weights; the base only gives the layout),
scaled by their mean norm. From the normalized weighted mean of the unit
vectors, each iteration moves the mean along the weighted sum of the log maps
(θ_i / sin θ_i · (u_i − cos θ_i · m), vectors within tol of the mean skipped)
by the exponential map and renormalizes, until that sum's norm is below tol or
after max_iter; vectors of norm <= tol take no part in the mean.

Every iterate is a combination of the models' weights, so each iteration runs on
K coefficients and the Gram matrix of the weights: ONE round of exact tensor
sums (engine/sums.py) whatever max_iter, and a result the same for any split."""

from __future__ import annotations

import math

from ._sums import clamp, gram, gram_pairs, merge_weights, quad
from .registry import Combiner, Param

MAX_ITER = Param("max_iter", 10, "the most iterations", lo=0)
TOL = Param(
    "tol", 1e-5, "convergence and zero-norm threshold (0 would divide by 0)", lo=0.0, lo_open=True
)


def coefficients(g: list[list[float]], max_iter: int, tol: float) -> list[float]:
    """c with result = Σ_i c_i x_i, from the Gram matrix of the x_i."""
    n = len(g)
    alphas = [1.0 / n] * n
    norms = [math.sqrt(max(g[i][i], 0.0)) for i in range(n)]
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return [0.0] * n

    def unit(i: int) -> list[float]:  # u_i as coefficients of x
        return [1.0 / norms[i] if j == i else 0.0 for j in range(n)]

    total = math.fsum(alphas[i] for i in valid)
    a = {i: alphas[i] / total for i in valid}
    mean = [a[i] / norms[i] if i in a else 0.0 for i in range(n)]
    mean_norm = math.sqrt(max(quad(mean, g), 0.0))
    mean = unit(valid[0]) if mean_norm < tol else [x / mean_norm for x in mean]
    for _ in range(max_iter):
        gm = [math.fsum(g[i][j] * mean[j] for j in range(n)) for i in range(n)]
        tangent = [0.0] * n
        for i in valid:
            dot = clamp(gm[i] / norms[i])  # m · u_i
            theta = math.acos(dot)
            if theta < tol:
                continue
            f = a[i] * theta / math.sin(theta)
            for j in range(n):
                tangent[j] -= f * dot * mean[j]
            tangent[i] += f / norms[i]
        tn = math.sqrt(max(quad(tangent, g), 0.0))
        if tn < tol:
            break
        cos, sin = math.cos(tn), math.sin(tn)
        mean = [cos * mean[j] + sin * tangent[j] / tn for j in range(n)]
        unit_norm = math.sqrt(max(quad(mean, g), 0.0))
        if unit_norm > tol:
            mean = [x / unit_norm for x in mean]
    scale = math.fsum(alphas[i] * norms[i] for i in range(n))
    return [scale * x for x in mean]


def statistics(spec, shape, name):
    from ..engine.spec import SumsRequest
    from ..engine.sums import Combination

    k = len(spec.weights)
    if k == 1:
        return Combination("weights", "tensor", (None, (1.0,)))
        yield  # (a generator: no round)
    v = yield SumsRequest("weights", gram_pairs(list(range(1, k + 1))))
    c = coefficients(gram(v, k), spec.param("max_iter"), spec.param("tol"))
    return Combination("weights", "tensor", (None,) + tuple((x,) for x in c))


METHOD = Combiner(
    name="karcher",
    summary="Karcher (Riemannian) mean of the models' weights on the sphere, times their mean norm",
    params=(MAX_ITER, TOL),
    merge_weights=merge_weights,
    statistics=statistics,
    uses_weights=False,
)
