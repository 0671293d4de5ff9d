"""Model Breadcrumbs: drop the gamma·n largest |τ| (outliers) and keep the next
density·n; the rest is dropped."""

from __future__ import annotations

import math

from ._common import DENSITY, EPS, GAMMA, SCOPE, magnitude_global_rescale, rescale
from .registry import MAGNITUDE, Sparsifier


def keep_range(n: int, spec, rate: float | None) -> tuple[int, int]:
    return max(0, math.floor((1.0 - spec.density - spec.gamma) * n)), n - math.floor(spec.gamma * n)


def _check(values, where: str) -> str | None:
    if values["density"] + values["gamma"] > 1.0:
        total = values["density"] + values["gamma"]
        return f"{where}.density + {where}.gamma must be <= 1 ({total})"
    return magnitude_global_rescale(values, where, "breadcrumbs")


METHOD = Sparsifier(
    name="breadcrumbs",
    summary="drop the gamma·n largest |τ|, keep the next density·n",
    family=MAGNITUDE,
    params=(SCOPE, DENSITY, GAMMA, rescale("none"), EPS),
    extra_bytes=lambda k: 2,
    check=_check,
    report_fields=("scale",),
    keep_range=keep_range,
)
