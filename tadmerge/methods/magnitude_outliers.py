"""mergekit's `magnitude_outliers` (its Model Breadcrumbs): drop the floor(gamma·n)
largest |τ|, keep the next floor(density·n), each count rounded down on its own;
where density + gamma > 1 the floor(density·n) smallest are kept. `breadcrumbs`
(ours) rounds the kept range's edges instead (docs/semantics.md, "Coming from
mergekit"); the two differ by an entry or two per tensor."""

from __future__ import annotations

import math

from ._common import DENSITY, EPS, GAMMA, SCOPE, magnitude_global_rescale, rescale
from .registry import MAGNITUDE, Sparsifier


def keep_range(n: int, spec, rate: float | None) -> tuple[int, int]:
    keep = math.floor(spec.density * n)
    lo = max(0, n - keep - math.floor(spec.gamma * n))
    return lo, lo + keep


METHOD = Sparsifier(
    name="magnitude_outliers",
    summary="mergekit's breadcrumbs: drop the floor(gamma·n) largest |τ|, keep the next "
    "floor(density·n)",
    family=MAGNITUDE,
    params=(SCOPE, DENSITY, GAMMA, rescale("none"), EPS),
    extra_bytes=lambda k: 2,
    check=lambda values, where: magnitude_global_rescale(values, where, "magnitude_outliers"),
    report_fields=("scale",),
    keep_range=keep_range,
)
