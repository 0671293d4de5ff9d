"""Parameters several sparsifiers share (one declaration each)."""

from __future__ import annotations

from .registry import Param

RESCALES = ("none", "l2", "l1", "inverse_keep")

SCOPE = Param(
    "scope",
    "tensor",
    "statistics per tensor of each task vector, or over each whole task vector",
    choices=("tensor", "global"),
)
EPS = Param("eps", 1e-12, "added to the denominators of the rescale and of TADrop's ratio", lo=0.0)
DENSITY = Param("density", 0.2, "fraction of the entries kept", lo=0.0, hi=1.0, lo_open=True)
GAMMA = Param("gamma", 0.01, "fraction of the largest |τ| dropped", lo=0.0, hi=1.0, hi_open=True)


def rescale(default: str, choices: tuple[str, ...] = RESCALES) -> Param:
    """How kept entries are scaled: l2 / l1 restore the norm, inverse_keep divides
    by the kept fraction, none leaves them."""
    return Param(
        "rescale",
        default,
        "scale of the kept entries: l2 or l1 restore that norm, inverse_keep divides "
        "by the kept fraction, none keeps them as they are",
        choices=choices,
    )


def magnitude_global_rescale(values, where: str, method: str) -> str | None:
    """A per-tensor norm restore needs per-tensor statistics: with scope global it
    is defined for TADrop only (whose rate is global but whose cut is per tensor)."""
    if values["scope"] == "global" and values["rescale"] in ("l2", "l1"):
        return (
            f"{where}.rescale: {values['rescale']} with scope global is defined for tadrop only "
            f"(use none or inverse_keep with {method})"
        )
    return None
