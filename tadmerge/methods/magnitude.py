"""Magnitude trimming (TIES' trim step): keep the floor(density·n) largest |τ|."""

from __future__ import annotations

import math

from ._common import DENSITY, EPS, SCOPE, magnitude_global_rescale, rescale
from .registry import MAGNITUDE, Sparsifier


def keep_range(n: int, spec, rate: float | None) -> tuple[int, int]:
    return n - math.floor(spec.density * n), n


METHOD = Sparsifier(
    name="magnitude",
    summary="keep the density·n entries of largest |τ| (TIES' trim)",
    family=MAGNITUDE,
    params=(SCOPE, DENSITY, rescale("none"), EPS),
    extra_bytes=lambda k: 2,
    check=lambda values, where: magnitude_global_rescale(values, where, "magnitude"),
    report_fields=("scale",),
    keep_range=keep_range,
)
