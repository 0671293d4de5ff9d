"""SLERP (mergekit's `slerp`): spherical interpolation of the weights of the base
θ0 and one model θ1 at t, per tensor: with a = θ0, b = θ1 and their angle
Ω = acos(a·b / (|a| |b|)), θ = sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b, or
(1−t)·a + t·b where |cos Ω| > dot_threshold. The norms and the dot product are
exact tensor sums (engine/sums.py): the same for any split of the tensor."""

from __future__ import annotations

import math

from ._sums import clamp, merge_weights
from .registry import Combiner, Param

T = Param("t", 0.5, "the interpolation factor: 0 is the base, 1 the model")
DOT_THRESHOLD = Param(
    "dot_threshold",
    0.9995,
    "|cos Ω| above it interpolates linearly (nearly collinear tensors)",
    lo=0.0,
    hi=1.0,
)
EPS = Param("eps", 1e-8, "a norm at or below it counts as 1 (zero tensors)", lo=0.0)


def coefficients(t: float, aa: float, bb: float, ab: float, threshold: float, eps: float):
    """(c_a, c_b) of θ = c_a·a + c_b·b from |a|², |b|², a·b (float64)."""
    na, nb = math.sqrt(aa), math.sqrt(bb)
    na = na if na > eps else 1.0
    nb = nb if nb > eps else 1.0
    dot = clamp(ab / na / nb)
    if abs(dot) > threshold:
        return 1.0 - t, t
    omega = math.acos(dot)
    s = math.sin(omega)
    return math.sin((1.0 - t) * omega) / s, math.sin(t * omega) / s


def statistics(spec, shape, name):
    from ..engine.spec import SumsRequest
    from ..engine.sums import Combination

    v = yield SumsRequest("weights", ((0, 0), (1, 1), (0, 1)))
    ca, cb = coefficients(
        spec.param("t"),  # (resolved for this tensor: MergeSpec.for_tensor)
        float(v[0][0]),
        float(v[1][0]),
        float(v[2][0]),
        spec.param("dot_threshold"),
        spec.param("eps"),
    )
    return Combination("weights", "tensor", ((ca,), (cb,)))


METHOD = Combiner(
    name="slerp",
    summary="spherical interpolation of the base and one model's weights at t, per tensor",
    params=(T, DOT_THRESHOLD, EPS),
    merge_weights=merge_weights,
    statistics=statistics,
    models=(1, 1),
    uses_weights=False,
)
