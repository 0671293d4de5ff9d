"""Exact, order-independent sums of float32 values.

Every finite float32 x equals M * 2**(e - 150) with an integer M < 2**24 and e the
(biased, at least 1) exponent. So |x| * 2**149 and x**2 * 2**298 are integers,
and sums of them are exact Python integers. We collect, per exponent, the sum of
M and the sum of M**2 (split into two 24-bit halves) with float64 bincounts: each
weight is an integer below 2**24 and at most 2**29 values go into one call, so
every partial sum stays below 2**53 and is exact whatever order the hardware adds
in. The final value is rounded to float64 once (fractions.Fraction rounds
correctly), which equals math.fsum of the float64 terms.

Why: norms (TADrop's L2 rescale) and EMR's rescalers must be bit-identical no
matter how a tensor is split across blocks, workers or devices. Integer partial
sums are mergeable by plain addition; float partial sums are not.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch

from .keys import magnitude_keys

ABS_SCALE_BITS = 149
SQ_SCALE_BITS = 298
_CHUNK = 1 << 20  # bounds temporaries to ~40 MB per call
_N_EXP = 256


@dataclass
class ExactSum:
    """Σ|x| and Σx² of a set of float32 values, as exact scaled integers."""

    abs_scaled: int = 0  # Σ|x| * 2**149
    sq_scaled: int = 0  # Σx² * 2**298
    count: int = 0

    def __add__(self, other: ExactSum) -> ExactSum:
        return ExactSum(
            self.abs_scaled + other.abs_scaled,
            self.sq_scaled + other.sq_scaled,
            self.count + other.count,
        )

    @property
    def abs_sum(self) -> float:
        return float(Fraction(self.abs_scaled, 1 << ABS_SCALE_BITS))

    @property
    def sq_sum(self) -> float:
        return float(Fraction(self.sq_scaled, 1 << SQ_SCALE_BITS))

    @property
    def l2(self) -> float:
        return self.sq_sum**0.5

    @property
    def mean_abs(self) -> float:
        return self.abs_sum / self.count if self.count else 0.0

    def to_json(self) -> list:
        return [str(self.abs_scaled), str(self.sq_scaled), self.count]

    @classmethod
    def from_json(cls, v: list) -> ExactSum:
        return cls(int(v[0]), int(v[1]), int(v[2]))


def mantissa_exponent(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer mantissa M (float64, exact) and effective exponent index (int64)."""
    e = keys >> 23
    m = (keys & 0x7FFFFF) | ((e > 0).to(torch.int32) << 23)
    return m.to(torch.float64), e.clamp_min(1).to(torch.int64)


def split_square(md: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """M² as two float64 halves (high, low 24 bits), each an exact integer < 2**24."""
    sq = md * md  # < 2**48: exact in float64
    hi = torch.floor(sq * (2.0**-24))
    return hi, sq - hi * (2.0**24)


def exact_sums(x: torch.Tensor, *, need_abs: bool = True) -> ExactSum:
    """Exact Σ|x| and Σx² of a float32 tensor (any shape, any device)."""
    if x.numel() == 0:
        return ExactSum()
    keys = magnitude_keys(x)
    s1 = torch.zeros(_N_EXP, dtype=torch.int64, device=keys.device)
    s2h = torch.zeros_like(s1)
    s2l = torch.zeros_like(s1)
    for chunk in keys.split(_CHUNK):
        md, e = mantissa_exponent(chunk)
        hi, lo = split_square(md)
        if need_abs:
            s1 += torch.bincount(e, weights=md, minlength=_N_EXP).to(torch.int64)
        s2h += torch.bincount(e, weights=hi, minlength=_N_EXP).to(torch.int64)
        s2l += torch.bincount(e, weights=lo, minlength=_N_EXP).to(torch.int64)
    return ExactSum(
        abs_scaled=combine_by_exponent(s1.tolist(), 1) if need_abs else 0,
        sq_scaled=combine_by_exponent(s2h.tolist(), 2, s2l.tolist()),
        count=x.numel(),
    )


def combine_by_exponent(hi: list[int], power: int, lo: list[int] | None = None) -> int:
    """Σ_e value_e << (power*e - power), value_e = hi_e (<<24 + lo_e for squares)."""
    total = 0
    for e, h in enumerate(hi):
        v = h if lo is None else (h << 24) + lo[e]
        if v:
            total += v << (power * max(e, 1) - power)
    return total
