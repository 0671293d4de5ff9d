"""NuSLERP (mergekit's `nuslerp`): spherical interpolation of two models' task
vectors τ_1, τ_2 (or, without `tasks`, their weights) at t = w_2 / (w_1 + w_2)
(0.5 where the weights sum to about 0): with their angle Ω,
θ = θ0 + sin((1−t)Ω)/sin Ω · τ_1 + sin(tΩ)/sin Ω · τ_2, linear where
1 − cos²Ω <= 1e-16. Unlike slerp the vectors keep their norms. Over the whole
tensor (flatten), or per vector along the first axis (row_wise: mergekit's
dim 0) or along the last axis. The norms and dot products are exact tensor sums
(engine/sums.py): the same for any split of the tensor."""

from __future__ import annotations

import math

from ._sums import clamp, merge_weights
from .registry import Combiner, Param

TASKS = Param(
    "tasks",
    True,
    "interpolate the task vectors θ_k − θ0 (true) or the models' weights (false: the "
    "base then only gives the layout and the tensors that are not merged)",
)
ROW_WISE = Param("row_wise", False, "one angle per vector along the first axis (no flatten)")
FLATTEN = Param("flatten", True, "one angle for the whole tensor (else per vector)")
NORM_EPS = 1e-7  # the smallest norm a vector is divided by (mergekit's)
COLINEAR_EPS = 1e-8  # collinear where 1 − cos² <= this squared


def coefficients(t: float, g00: float, g11: float, g01: float) -> tuple[float, float]:
    n0 = max(math.sqrt(g00), NORM_EPS)
    n1 = max(math.sqrt(g11), NORM_EPS)
    cos = clamp(g01 / (n0 * n1))
    if 1.0 - cos * cos <= COLINEAR_EPS**2:
        return 1.0 - t, t
    omega = math.acos(cos)
    s = math.sin(omega)
    return math.sin((1.0 - t) * omega) / s, math.sin(t * omega) / s


def layout(spec) -> str:
    if spec.param("flatten"):
        return "tensor"
    return "first" if spec.param("row_wise") else "last"


def statistics(spec, shape, name):
    from ..engine.spec import SumsRequest
    from ..engine.sums import Combination

    w1, w2 = spec.weights
    t = 0.5 if abs(w1 + w2) < 1e-6 else w2 / (w1 + w2)
    vectors = "tasks" if spec.param("tasks") else "weights"
    lay = layout(spec)
    v = yield SumsRequest(vectors, ((1, 1), (2, 2), (1, 2)), lay)
    pairs = [coefficients(t, float(a), float(b), float(c)) for a, b, c in zip(*v, strict=True)]
    return Combination(vectors, lay, (None, tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)))


METHOD = Combiner(
    name="nuslerp",
    summary="spherical interpolation of two task vectors (or models) at w_2 / (w_1 + w_2)",
    params=(TASKS, ROW_WISE, FLATTEN),
    merge_weights=merge_weights,
    statistics=statistics,
    models=(2, 2),
)
