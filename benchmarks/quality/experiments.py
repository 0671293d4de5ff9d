"""The merge grid of the quality benchmark: which merges, with which settings, and why.

Rows follow the paper: Table 1 (baselines, Task Arithmetic / TIES / EMR each with and without
TADrop, plus DARE), Table 4 (EMR + TADrop ablations: one global drop rate per task, no rescale,
the 1/(1-d) rescale) and Table 7 (quantile pairs). One row of ours is added to Table 4: a uniform
per-tensor magnitude drop at the same overall sparsity TADrop chose, with the same L2 rescale,
which separates "adaptive per-tensor rate" from "this much sparsity, norm-preserved".

lambda for TA, TIES and DARE is chosen per fine-tuning seed on the validation split (average
accuracy over the tasks, ties go to the smaller lambda) and only the chosen merge is evaluated on
test; when the best value sits at an end of the grid, the grid is extended past that end (still
on validation) until the best is inside. EMR and weight averaging have no lambda.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

TA_GRID: tuple[float, ...] = (0.3, 0.5, 0.7, 1.0)
TIES_GRID: tuple[float, ...] = (0.7, 1.0, 1.3, 1.6)
# If the best lambda (on validation) is at an end of the grid, the grid grows by the next of
# these values beyond that end, until the best is inside (or the list runs out).
TA_EXTEND: tuple[float, ...] = (0.2, 0.1, 0.05)
TIES_EXTEND: tuple[float, ...] = (0.5, 0.3, 2.0, 2.5)

TADROP = {
    "method": "tadrop",
    "scope": "tensor",
    "low_q": 0.5,
    "high_q": 0.95,
    "rescale": "l2",
    "max_drop": 1.0,
}
NONE = {"method": "none"}
TIES_TRIM = {"method": "magnitude", "scope": "global", "density": 0.2, "rescale": "none"}
DARE = {"method": "random", "p": 0.9, "rescale": "inverse_keep"}


@dataclass(frozen=True)
class Family:
    """One row of the tables: a sparsifier + a combiner, with a lambda grid or not."""

    name: str
    label: str
    sparsify: dict
    merge: dict
    grid: tuple[float, ...] = ()
    extend: tuple[float, ...] = ()  # candidates added when the best lambda sits at a grid end
    tables: tuple[str, ...] = ()  # which paper tables the row belongs to
    needs: tuple[str, ...] = ()  # families whose results define this one (matched density)
    plot: bool = False  # draw the drop-rate figures of this merge
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def config_parts(self, lam: float | None) -> tuple[dict, dict]:
        merge = copy.deepcopy(self.merge)
        if lam is not None:
            merge["scale"] = lam
        return copy.deepcopy(self.sparsify), merge


def _tadrop(**kw: object) -> dict:
    return {**TADROP, **kw}


def families(smoke: bool = False) -> list[Family]:
    """The merge rows, in the order they run (dependencies first)."""
    if smoke:
        return [
            Family("weight_avg", "Weight averaging", NONE, {"method": "average"}, tables=("t1",)),
            Family(
                "ta_tadrop",
                "Task Arithmetic + TADrop",
                TADROP,
                {"method": "task_arithmetic"},
                grid=(0.5, 1.0),
                tables=("t1",),
            ),
            Family(
                "emr_tadrop",
                "EMR-Merging + TADrop",
                TADROP,
                {"method": "emr"},
                tables=("t1",),
                plot=True,
            ),
        ]
    return [
        Family("weight_avg", "Weight averaging", NONE, {"method": "average"}, tables=("t1",)),
        Family(
            "ta",
            "Task Arithmetic",
            NONE,
            {"method": "task_arithmetic"},
            grid=TA_GRID,
            extend=TA_EXTEND,
            tables=("t1",),
        ),
        Family(
            "ta_tadrop",
            "+ TADrop",
            TADROP,
            {"method": "task_arithmetic"},
            grid=TA_GRID,
            extend=TA_EXTEND,
            tables=("t1",),
        ),
        Family(
            "ties",
            "TIES-Merging",
            TIES_TRIM,
            {"method": "ties", "disjoint": "mean"},
            grid=TIES_GRID,
            extend=TIES_EXTEND,
            tables=("t1",),
            notes="original TIES: top-20% by magnitude over the whole task vector",
        ),
        Family(
            "ties_tadrop",
            "+ TADrop",
            TADROP,
            {"method": "ties", "disjoint": "mean"},
            grid=TIES_GRID,
            extend=TIES_EXTEND,
            tables=("t1",),
            notes="TADrop replaces the TIES trim",
        ),
        Family(
            "dare_ta",
            "DARE + Task Arithmetic",
            DARE,
            {"method": "task_arithmetic"},
            grid=TA_GRID,
            extend=TA_EXTEND,
            tables=("t1",),
            notes="drop p = 0.9, kept entries x 1/(1-p)",
        ),
        Family("emr", "EMR-Merging", NONE, {"method": "emr"}, tables=("t1", "t4", "t7")),
        Family(
            "emr_tadrop",
            "+ TADrop",
            TADROP,
            {"method": "emr"},
            tables=("t1", "t4", "t7"),
            plot=True,
            extra={"q": "q50/q95"},
        ),
        Family(
            "emr_tadrop_global",
            "w/ global sparsification",
            _tadrop(scope="global"),
            {"method": "emr"},
            tables=("t4",),
            plot=True,
            notes="one d per task from the quantiles of the whole task vector",
        ),
        Family(
            "emr_tadrop_noscale",
            "w/o scale",
            _tadrop(rescale="none"),
            {"method": "emr"},
            tables=("t4",),
        ),
        Family(
            "emr_tadrop_invkeep",
            "1/(1-d) scale",
            _tadrop(rescale="inverse_keep"),
            {"method": "emr"},
            tables=("t4",),
        ),
        Family(
            "emr_uniform_matched",
            "uniform per-tensor rate, same sparsity (ours)",
            {"method": "magnitude", "scope": "tensor", "rescale": "l2"},
            {"method": "emr"},
            tables=("t4",),
            needs=("emr_tadrop",),
            notes="magnitude drop per tensor with density = 1 - TADrop's mean drop inside "
            "the transformer blocks (size-weighted, mean over tasks), L2 rescale",
        ),
        *(
            Family(
                f"emr_tadrop_q{a}_{b}",
                f"q{a}/q{b}",
                _tadrop(low_q=a / 100, high_q=b / 100),
                {"method": "emr"},
                tables=("t7",),
                extra={"q": f"q{a}/q{b}"},
            )
            for a, b in ((45, 95), (50, 90), (50, 99), (50, 85), (50, 80))
        ),
    ]
