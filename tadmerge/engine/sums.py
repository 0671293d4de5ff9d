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
On a CPU with the C kernels (the merge's `backend`, engine/kernels.py) one
compiled pass bins the same integers into the same bins (_c_sums; the torch
code here is the reference, tests/test_merge_sums.py holds them together), so
units answered by either backend add up to the same sums.

A request (engine/spec.py SumsRequest) names the products (pairs of the block's
vectors: the weights θ0..θK, or θ0 and the task vectors t_k) and the layout:
one segment for the whole tensor ("tensor"), one per vector along the first
axis ("first": the columns, reduced across the row blocks of a split tensor),
or one per vector along the last axis ("last": inside a row, so always inside
one unit, and never a round). A
combiner's statistics generator yields them (methods/registry.py
Combiner.statistics; engine/tensor_stats.py and cluster/tensor_stats.py drive
it); the Combination its spherical methods return is applied here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .spec import SumsRequest

if TYPE_CHECKING:
    import torch

BIAS = 300  # a product's value is P·2**(bin − BIAS)
SPLIT = 24  # P = hi·2**SPLIT + lo
CHUNK = 1 << 17  # elements per bincount: exact below 2**29, temporaries of a few MB
_LO_MASK = (1 << SPLIT) - 1
_F_SPLIT = 26  # hi = (hi >> 26)·2**26 + (hi mod 2**26): both exact float64


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


def exact_sums(
    chunk: Callable[[int, int], list[torch.Tensor]],
    pairs: tuple[tuple[int, int], ...],
    n: int,
    seg_size: int,
    n_seg: int,
    column: bool,
) -> ExactSums:
    """Exact Σ over each segment of v_i·v_j for every pair, over elements [0, n).

    `chunk(a, b)` is every vector's float32 elements [a, b) (a task vector is
    made a chunk at a time: no block-sized temporary). Element i belongs to
    segment i // seg_size, or (`column`) to segment i % n_seg.
    """
    import torch

    vectors = sorted({j for p in pairs for j in p})
    # each vector's least and greatest exponent e >= 1: the bins the sums take
    lo, hi = dict.fromkeys(vectors, 255), dict.fromkeys(vectors, 1)
    for a in range(0, n, CHUNK):
        vs = chunk(a, min(n, a + CHUNK))
        for j in vectors:
            field = (vs[j].contiguous().view(torch.int32) & 0x7FFFFFFF) >> 23
            lo[j], hi[j] = min(lo[j], int(field.min())), max(hi[j], int(field.max()))
    lo = {j: max(1, min(lo[j], hi[j])) for j in vectors}
    b0 = min(lo[i] + lo[j] for i, j in pairs)
    nb = max(hi[i] + hi[j] for i, j in pairs) + 1 - b0
    s = len(pairs)
    sums_hi = np.zeros((s, n_seg, nb), dtype=np.int64)
    sums_lo = np.zeros_like(sums_hi)
    nonfinite = 0
    step = CHUNK if column or seg_size >= CHUNK else max(1, CHUNK // seg_size) * seg_size
    for a in range(0, n, step):
        b = min(n, a + step)
        vs = chunk(a, b)
        parts = {j: _parts(vs[j]) for j in vectors}
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
            for part, dest in (((p >> SPLIT), sums_hi), ((p & _LO_MASK), sums_lo)):
                w = part.to(torch.float64) * sign
                got = torch.bincount(index, weights=w, minlength=count * nb)
                dest[q, first : first + count] += (
                    got.to(torch.int64).cpu().numpy().reshape(count, nb)
                )
    return ExactSums(sums_hi, sums_lo, b0, nonfinite)


def block_vectors(
    base: torch.Tensor, vs: list[torch.Tensor], kind: str, made: bool = False
) -> Callable[[int, int], list[torch.Tensor]]:
    """chunk(a, b): a request's vectors v_j over elements [a, b). "weights":
    v_0 the base, v_j model j's weights (`vs`); "tasks": v_j the task vector
    t_j, `vs` themselves when `made` (the merge's t_k) or fl32(θ_j − θ0) made
    from the weights."""

    def chunk(a: int, b: int) -> list[torch.Tensor]:
        if kind == "weights" or made:
            return [base[a:b]] + [v[a:b] for v in vs]
        return [base[a:b]] + [v[a:b] - base[a:b] for v in vs]

    return chunk


def block_sums(
    base: torch.Tensor,
    vs: list[torch.Tensor],
    request: SumsRequest,
    shape: tuple[int, ...],
    made: bool = False,
    backend: str = "auto",
) -> ExactSums:
    """One block's share of a request (whole rows of a tensor of `shape`;
    `vs`, `made` as in block_vectors). `backend`: the merge's kernels backend
    (kernels.enabled), handed down from its dispatch; on the CPU with the C
    kernels, the same integers from one compiled pass (_c_sums)."""
    from . import kernels

    n = base.numel()
    seg = _segmenting(request.layout, shape, n)
    if n and kernels.enabled(base, backend) and _c_takes(base, vs):
        return _c_sums(base, vs, request, made, seg)
    chunk = block_vectors(base, vs, request.vectors, made)
    return exact_sums(chunk, request.pairs, n, *seg)


def array_sums(
    base: np.ndarray, models: list[np.ndarray], request: SumsRequest, shape: tuple[int, ...]
) -> ExactSums:
    """block_sums of a block given as its raw inputs, flat numpy arrays of
    kernels.STREAM_DTYPES (a merge that never imports torch: engine/stream.py),
    by the C kernels, which widen them as torch does: the same integers. The
    request is of the weights or of the task vectors, made from them."""
    return _c_sums(base, models, request, False, _segmenting(request.layout, shape, base.size))


def _segmenting(layout: str, shape: tuple[int, ...], n: int) -> tuple[int, int, bool]:
    """(segment size, segments, column) of a block of n elements: exact_sums's."""
    layout = layout_of(layout, shape)
    seg_size = max(1, n if layout == "tensor" else max(1, shape[-1]))
    return seg_size, segments(layout, shape, n), layout == "first"


def _c_takes(base: torch.Tensor, vs: list[torch.Tensor]) -> bool:
    """Whether the C kernels take the block as it is: contiguous float32 vectors."""
    import torch

    ok = base.dtype == torch.float32 and base.is_contiguous()
    return ok and all(v.dtype == torch.float32 and v.is_contiguous() for v in vs)


def _c_sums(
    base: torch.Tensor | np.ndarray,
    vs: list,
    request: SumsRequest,
    made: bool,
    layout: tuple[int, int, bool],
) -> ExactSums:
    """exact_sums's ExactSums (the same bins, the same integers) from the C
    kernels: the vectors' exponent range, then their products binned, in pieces
    of kernels.PIECE entries. A task vector made from the weights is made in
    the kernel (one float32 subtraction, as block_vectors makes it)."""
    from . import kernels

    n = math.prod(base.shape)  # (a tensor or a numpy array)
    vectors = sorted({j for p in request.pairs for j in p})
    at = {j: q for q, j in enumerate(vectors)}
    pairs = [(at[i], at[j]) for i, j in request.pairs]
    sub = [request.vectors == "tasks" and not made and j > 0 for j in vectors]

    def piece(a: int, b: int):
        return [(base if j == 0 else vs[j - 1])[a:b] for j in vectors], base[a:b], sub

    lo = np.full(len(vectors), 255, np.int32)
    hi = np.ones(len(vectors), np.int32)
    for a in range(0, n, kernels.PIECE):
        kernels.sums_range(*piece(a, min(n, a + kernels.PIECE)), lo, hi)
    # the reference's bins [b0, b0 + nb) from the vectors' exponent range
    least = {j: max(1, min(int(lo[q]), int(hi[q]))) for j, q in at.items()}
    most = {j: int(hi[q]) for j, q in at.items()}
    b0 = min(least[i] + least[j] for i, j in request.pairs)
    nb = max(most[i] + most[j] for i, j in request.pairs) + 1 - b0
    sums_hi = np.zeros((len(pairs), layout[1], nb), dtype=np.int64)
    sums_lo = np.zeros_like(sums_hi)
    nonfinite = 0
    for a in range(0, n, kernels.PIECE):
        vs_ab, base_ab, flags = piece(a, min(n, a + kernels.PIECE))
        nonfinite += kernels.sums_accumulate(
            vs_ab, base_ab, flags, pairs, a, layout, b0, sums_hi, sums_lo
        )
    return ExactSums(sums_hi, sums_lo, b0, nonfinite)


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
    chunk = block_vectors(base, models, comb.vectors)
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
        vs = chunk(a, b)
        for j, c in coefs.items():
            cc = c[r0:r1].view(-1, 1) if layout == "last" else c.view(1, -1)
            term = vs[j].view(r1 - r0, width) * cc
            acc = term if acc is None else acc.add_(term)
        if acc is None:
            acc = torch.zeros((r1 - r0, width), dtype=torch.float32, device=base.device)
        if tasks:
            acc = acc.add_(base[a:b].view(r1 - r0, width))
        out[a:b].copy_(acc.reshape(-1))
    return out
