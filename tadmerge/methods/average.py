"""Averaging: θ = Σ w_k θ_k / Σ w_k; with a sparsifier, θ0 + Σ w_k t_k / Σ w_k.
It is linear with normalize (methods/linear.py); the compiled CPU paths
(engine/stream.py, engine/raw.py) merge both as this one
(MergeSpec.compiled_combiner)."""

from __future__ import annotations

from functools import partial

from . import linear
from .registry import Combiner

METHOD = Combiner(
    name="average",
    summary="weighted mean of the models (of the sparsified task vectors, with a sparsifier)",
    merge_block=partial(linear.merge_block, normalize=True),
    merge_weights=partial(linear.merge_weights, normalize=True),
)
