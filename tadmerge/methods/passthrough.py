"""Passthrough (mergekit's `passthrough`): layer stacking. Nothing is combined:
every output tensor is one source tensor's bytes, the layers renumbered in the
order of `slices` (tadmerge/slices.py, planners/slices.py). The plan copies; no
block of it reaches a combiner."""

from __future__ import annotations

from .registry import Combiner


def merge_block(base, taus, plans, spec, ctx, sparsify, chunks, check_finite):
    raise RuntimeError(f"{ctx.tensor}: passthrough copies its tensors; nothing is merged")


METHOD = Combiner(
    name="passthrough",
    summary="layer stacking (frankenmerges): the `slices` layer ranges copied byte for byte, "
    "renumbered; needs `slices`",
    merge_block=merge_block,
    uses_weights=False,
)
