"""The block function of the combiners whose statistics are tensor sums
(engine/sums.py) and a Combination of the weights: the Combination given (a
split tensor) or made from the block (whole tensors, and segments inside a
row), applied to the weights."""

from __future__ import annotations

import math


def merge_weights(base, models, spec, check_finite: bool, ctx):
    """Merge one block of a sums combiner. Consumes `models`."""
    from ..engine import tensor_stats as TS
    from ..engine.block import BlockResult, weights_stats
    from ..engine.sums import Combination, apply

    stats = weights_stats(base, models, check_finite, ctx.backend)
    comb = TS.resolve(base, models, spec, ctx)["values"]
    comb = comb if isinstance(comb, Combination) else Combination.from_json(comb)
    return BlockResult(apply(comb, base, models, ctx.shape), None, stats)


def clamp(x: float, lo: float = -1.0, hi: float = 1.0) -> float:
    return lo if x < lo else hi if x > hi else x


def quad(c: list[float], g: list[list[float]]) -> float:
    """cᵀ G c, in a fixed order."""
    n = len(c)
    return math.fsum(c[i] * g[i][j] * c[j] for i in range(n) for j in range(n))


def gram(values, n: int, col: int = 0) -> list[list[float]]:
    """The n×n Gram matrix of segment `col` from sums asked as gram_pairs(n)."""
    g = [[0.0] * n for _ in range(n)]
    q = 0
    for i in range(n):
        for j in range(i, n):
            g[i][j] = g[j][i] = float(values[q][col])
            q += 1
    return g


def gram_pairs(vectors: list[int]) -> tuple[tuple[int, int], ...]:
    """Pairs (i <= j) of `vectors`, in the order gram() reads them."""
    return tuple((a, b) for i, a in enumerate(vectors) for b in vectors[i:])


def combines(combiner) -> bool:
    """Whether a combiner's block is the Combination its sums statistics return,
    applied to the weights (this module's merge_weights): the C stream kernel
    can merge it from the raw inputs (engine/stream.py merge_raw_sums)."""
    return combiner.merge_weights is merge_weights
