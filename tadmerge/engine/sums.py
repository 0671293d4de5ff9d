"""Exact sums of products over a tensor, as map/reduce statistics (the "tensor sums").

Spherical methods (slerp, nuslerp, multislerp, karcher) and model_stock need,
before they merge a block, a few sums over the whole tensor (or over each of its
vectors): norms and dot products of the inputs, i.e. their Gram matrix. Every
such sum here is EXACT and then rounded once, so it is the same float64 for any
split of the tensor into units, any order of the units, any worker count,
executor or device:

Every finite float32 x is ±M·2**(e−150) with an integer mantissa M < 2**24 and
e = max(exponent field, 1). The product of two is ±Mx·My·2**(ex+ey−300), with
Mx·My < 2**48 exact in int64. It is split into hi = P >> 24 and lo = P mod 2**24
(each < 2**24) and both are added, signed, into a bin of their segment and
exponent sum ex+ey: float64 bincounts of integers below 2**24 are exact while a
chunk holds fewer than 2**29 values, and the chunks' counts add in int64. A bin
is a few int64; the total Σ_bins (hi·2**24 + lo)·2**(bin−300) is exact, and
math.fsum of its exactly representable float64 terms rounds it correctly: the
value is the exact sum rounded once, whatever order anything was added in.

A request (engine/spec.py SumsRequest) names the products (pairs of the block's
vectors: the weights θ0..θK, or θ0 and the task vectors τ_k = fl32(θ_k − θ0)) and
the layout: one segment for the whole tensor ("tensor"), one per vector along the
first axis ("first": the columns, reduced across the row blocks of a split
tensor), or one per vector along the last axis ("last": inside a row, so always
inside one unit, and never a round). A combiner declares a generator of requests
(methods/registry.py, Combiner.sums); the block runs it on its own data when it
holds the whole tensor (run_locally), cluster/stats.py runs it over units
otherwise, and hands the result to every block through BlockContext.sums.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .spec import SumsRequest

if TYPE_CHECKING:
    import torch

BIAS = 300  # a product's value is P·2**(bin − BIAS)
SPLIT = 24  # P = hi·2**SPLIT + lo
CHUNK = 1 << 17  # elements per bincount: exact below 2**29, temporaries of a few MB
_LO_MASK = (1 << SPLIT) - 1
_F_SPLIT = 26  # hi = (hi >> 26)·2**26 + (hi mod 2**26): both exact float64

# what a combiner's sums generator yields and receives: requests, and the reduced
# sums as float64 [S, C] (S products of the request, C segments)
SumsRounds = Generator[SumsRequest, np.ndarray, Any]


def layout_of(layout: str, shape: tuple[int, ...]) -> str:
    """The layout as a tensor of this shape has it: 0-d and 1-D tensors are one
    vector, whatever the axis."""
    return "tensor" if len(shape) <= 1 else layout


def segments(layout: str, shape: tuple[int, ...], numel: int) -> int:
    """Segments of a block of `numel` elements (whole rows) of a tensor of `shape`."""
    layout = layout_of(layout, shape)
    if layout == "tensor":
        return 1
    if layout == "first":
        return math.prod(shape[1:])
    return numel // max(1, shape[-1])


def local(layout: str, shape: tuple[int, ...]) -> bool:
    """Whether every segment lies inside one row block (no round across units)."""
    return layout_of(layout, shape) == "last"


@dataclass
class ExactSums:
    """S exact sums per segment: per (sum, segment, bin) the int64 totals of the
    hi and lo parts, bins [b0, b0 + NB) of the exponent sum. Adds exactly."""

    hi: np.ndarray  # int64 [S, C, NB]
    lo: np.ndarray
    b0: int
    nonfinite: int = 0

    @classmethod
    def zeros(cls, s: int, c: int) -> ExactSums:
        z = np.zeros((s, c, 0), dtype=np.int64)
        return cls(z, z.copy(), 0)

    def __add__(self, other: ExactSums) -> ExactSums:
        if not self.hi.shape[2]:
            return ExactSums(other.hi, other.lo, other.b0, self.nonfinite + other.nonfinite)
        if not other.hi.shape[2]:
            return ExactSums(self.hi, self.lo, self.b0, self.nonfinite + other.nonfinite)
        b0 = min(self.b0, other.b0)
        b1 = max(self.b0 + self.hi.shape[2], other.b0 + other.hi.shape[2])
        s, c, _ = self.hi.shape
        hi = np.zeros((s, c, b1 - b0), dtype=np.int64)
        lo = np.zeros_like(hi)
        for part in (self, other):
            i = part.b0 - b0
            hi[:, :, i : i + part.hi.shape[2]] += part.hi
            lo[:, :, i : i + part.lo.shape[2]] += part.lo
        return ExactSums(hi, lo, b0, self.nonfinite + other.nonfinite)

    def values(self) -> np.ndarray:
        """float64 [S, C]: each exact sum rounded once (math.fsum of exact terms);
        NaN where an input held NaN or Inf."""
        s, c, nb = self.hi.shape
        if self.nonfinite:
            return np.full((s, c), math.nan)
        if not nb:
            return np.zeros((s, c))
        e = np.arange(nb, dtype=np.int64) + (self.b0 - BIAS)
        terms = []
        for part, shift in ((self.hi, SPLIT), (self.lo, 0)):
            top = (part >> _F_SPLIT).astype(np.float64)
            low = (part & ((1 << _F_SPLIT) - 1)).astype(np.float64)
            terms.append(np.ldexp(top, e + shift + _F_SPLIT))
            terms.append(np.ldexp(low, e + shift))
        rows = np.concatenate(terms, axis=2).reshape(s * c, -1)
        return np.array([math.fsum(r) for r in rows.tolist()]).reshape(s, c)


def _parts(x: torch.Tensor):
    """(negative, exponent e >= 1, mantissa M) of float32 values: x = ±M·2**(e−150)."""
    import torch

    k = x.contiguous().view(torch.int32)
    a = k & 0x7FFFFFFF
    field = a >> 23
    m = (a & 0x7FFFFF) | ((field > 0).to(torch.int32) << 23)
    return k < 0, field.clamp(min=1), m, field == 255


def _exponent_range(vec: Callable[[int, int, int], torch.Tensor], j: int, n: int):
    """(least, greatest) exponent e >= 1 of vector j, chunk by chunk (a task vector
    is made a chunk at a time: no block-sized temporary)."""
    import torch

    lo, hi = 255, 1
    for a in range(0, n, CHUNK):
        field = (vec(j, a, min(n, a + CHUNK)).contiguous().view(torch.int32) & 0x7FFFFFFF) >> 23
        lo, hi = min(lo, int(field.min())), max(hi, int(field.max()))
    return max(1, min(lo, hi)), hi


def exact_sums(
    vec: Callable[[int, int, int], torch.Tensor],
    pairs: tuple[tuple[int, int], ...],
    n: int,
    seg_size: int,
    n_seg: int,
    column: bool,
) -> ExactSums:
    """Exact Σ over each segment of v_i·v_j for every pair, over elements [0, n).

    `vec(j, a, b)` is vector j's float32 elements [a, b). Element i belongs to
    segment i // seg_size, or (`column`) to segment i % n_seg.
    """
    import torch

    vectors = sorted({j for p in pairs for j in p})
    ranges = {j: _exponent_range(vec, j, n) for j in vectors}
    b0 = min(ranges[i][0] + ranges[j][0] for i, j in pairs)
    b1 = max(ranges[i][1] + ranges[j][1] for i, j in pairs) + 1
    nb = b1 - b0
    s = len(pairs)
    hi = np.zeros((s, n_seg, nb), dtype=np.int64)
    lo = np.zeros_like(hi)
    nonfinite = 0
    step = CHUNK if column or seg_size >= CHUNK else max(1, CHUNK // seg_size) * seg_size
    for a in range(0, n, step):
        b = min(n, a + step)
        parts = {j: _parts(vec(j, a, b)) for j in vectors}
        device = parts[vectors[0]][1].device
        if column:
            seg = torch.arange(a, b, device=device) % n_seg
            first, count = 0, n_seg
        else:
            first, last = a // seg_size, (b - 1) // seg_size + 1
            seg = torch.arange(a, b, device=device) // seg_size - first
            count = last - first
        for q, (i, j) in enumerate(pairs):
            ni, ei, mi, bad_i = parts[i]
            nj, ej, mj, bad_j = parts[j]
            nonfinite += int((bad_i | bad_j).sum())
            p = mi.to(torch.int64) * mj.to(torch.int64)
            sign = torch.where(ni ^ nj, -1.0, 1.0).to(torch.float64)
            index = seg * nb + (ei + ej - b0).clamp(0, nb - 1).to(torch.int64)
            for part, dest in (((p >> SPLIT), hi), ((p & _LO_MASK), lo)):
                w = part.to(torch.float64) * sign
                got = torch.bincount(index, weights=w, minlength=count * nb)
                dest[q, first : first + count] += (
                    got.to(torch.int64).cpu().numpy().reshape(count, nb)
                )
    return ExactSums(hi, lo, b0, nonfinite)


def block_vectors(base: torch.Tensor, models: list[torch.Tensor], kind: str):
    """vec(j, a, b) of a request's vectors: j = 0 the base; j >= 1 model j's
    weights ("weights") or its task vector fl32(θ_j − θ0) ("tasks")."""

    def vec(j: int, a: int, b: int) -> torch.Tensor:
        if j == 0:
            return base[a:b]
        if kind == "weights":
            return models[j - 1][a:b]
        return models[j - 1][a:b] - base[a:b]

    return vec


def block_sums(
    base: torch.Tensor,
    models: list[torch.Tensor],
    request: SumsRequest,
    shape: tuple[int, ...],
) -> ExactSums:
    """One block's share of a request (whole rows of a tensor of `shape`)."""
    n = base.numel()
    layout = layout_of(request.layout, shape)
    n_seg = segments(layout, shape, n)
    seg_size = n if layout == "tensor" else max(1, shape[-1])
    vec = block_vectors(base, models, request.vectors)
    return exact_sums(vec, request.pairs, n, max(1, seg_size), n_seg, layout == "first")


def run_locally(
    rounds: SumsRounds,
    base: torch.Tensor,
    models: list[torch.Tensor],
    shape: tuple[int, ...],
    whole: bool,
) -> Any:
    """Drive a combiner's sums generator on a block that holds every segment it
    asks for (`whole`: the whole tensor; else the "last" layout only): the same
    sums, and so the same result, as the rounds over units of cluster/stats.py."""
    try:
        request = next(rounds)
        while True:
            if not (whole or local(request.layout, shape)):
                raise RuntimeError("split block without its resolved tensor sums")
            request = rounds.send(block_sums(base, models, request, shape).values())
    except StopIteration as stop:
        return stop.value


# ------------------------------------------------------------------------------------
# what the generators return: a linear combination per segment, applied by the block
# ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Combination:
    """merged = Σ_j fl32(coef[j][c])·v_j over the segments c (+ θ0 for "tasks"),
    products before sums in vector order; v as in block_vectors. A vector whose
    coefficients are None takes no part. Plain data: saved for --resume."""

    vectors: str  # "weights" | "tasks"
    layout: str
    coef: tuple[tuple[float, ...] | None, ...]

    def to_json(self) -> dict:
        return {"vectors": self.vectors, "layout": self.layout, "coef": list(self.coef)}

    @classmethod
    def from_json(cls, d: dict) -> Combination:
        coef = tuple(None if c is None else tuple(c) for c in d["coef"])
        return cls(d["vectors"], d["layout"], coef)


def apply(
    comb: Combination, base: torch.Tensor, models: list[torch.Tensor], shape: tuple[int, ...]
) -> torch.Tensor:
    """The block's merge from its combination, over the first model's block
    (consumes `models`); elements in CHUNK-row pieces of whole segments."""
    import torch

    n = base.numel()
    layout = layout_of(comb.layout, shape)
    n_seg = segments(layout, shape, n)
    out = models[0]
    tasks = comb.vectors == "tasks"
    coefs = {
        j: torch.tensor(c, dtype=torch.float32, device=base.device)
        for j, c in enumerate(comb.coef)
        if c is not None
    }
    # rows of `width` elements: one coefficient per row ("last"), per column
    # ("first") or one for all ("tensor", rows of one element)
    width = {"tensor": 1, "first": n_seg, "last": max(1, shape[-1] if shape else 1)}[layout]
    total_rows = n // width
    step = max(1, CHUNK // width)
    for r0 in range(0, total_rows, step):
        r1 = min(total_rows, r0 + step)
        a, b = r0 * width, r1 * width
        acc = None
        for j, c in coefs.items():
            if j == 0:
                v = base[a:b]
            elif tasks:
                v = models[j - 1][a:b] - base[a:b]
            else:
                v = models[j - 1][a:b]
            cc = c[r0:r1].view(-1, 1) if layout == "last" else c.view(1, -1)
            term = v.view(r1 - r0, width) * cc
            acc = term if acc is None else acc.add_(term)
        if acc is None:
            acc = torch.zeros((r1 - r0, width), dtype=torch.float32, device=base.device)
        if tasks:
            acc = acc.add_(base[a:b].view(r1 - r0, width))
        out[a:b].copy_(acc.reshape(-1))
    return out
