"""Certified rounding: the correctly rounded result from a fast approximation and its error bound.

A linear output element has an exact real value x (the formula applied to
the stored input numbers). The fast path computes an approximation y in
float64 (any BLAS, any thread count, CPU or CUDA) together with a rigorous
bound E >= |y - x|. Rounding y gives RN(x) whenever no rounding boundary of
the save dtype (a midpoint between two neighbours, or the overflow
threshold) lies within E of y; only the rare elements where one does are
recomputed exactly (:mod:`loraforge.ops.exact`) and rounded from the exact
rational value. The bytes are then a mathematical function of the inputs,
independent of how the approximation was summed.

Bounds follow Higham, *Accuracy and Stability of Numerical Algorithms*
(2002), §3.1: a sum of n products evaluated in floating point in any order,
with or without FMA, is within γ_n·Σ|products| of the exact sum, where
γ_n = n·u / (1 - n·u) and u = 2^-53 for float64.

Zeros: a zero base element whose terms add up to exactly zero keeps its
zero, sign included (bakes, loraforge.ops.bake._round_exactly); any other
exact zero is +0, as IEEE round-to-nearest gives for x + (-x). A zero
approximation is never certain here, so those elements always reach the
exact path.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Callable

import torch
from torch import Tensor

from loraforge.ops.rounding import round_float64

UNIT_ROUNDOFF = 2.0**-53  # float64
# Bounds are doubled: the bound itself is computed in floating point (norms,
# envelopes, this product), and a factor of 2 covers those relative errors of
# order n·u with a wide margin at the cost of a few more exact recomputations.
BOUND_SLACK = 2.0


def gamma(operations: int) -> float:
    """Higham's γ_n for float64, times the slack: the relative bound of n chained roundings."""
    nu = operations * UNIT_ROUNDOFF
    if nu >= 0.5:
        return math.inf
    return BOUND_SLACK * nu / (1.0 - nu)


# (integer view, precision in bits incl. the hidden one, lowest normal exponent, highest exponent)
_FORMATS = {
    torch.float16: (torch.int16, 11, -14, 15),
    torch.bfloat16: (torch.int16, 8, -126, 127),
    torch.float32: (torch.int32, 24, -126, 127),
}


def certifiable(dtype: torch.dtype) -> bool:
    """Whether outputs of ``dtype`` can be certified from a float64 approximation (float64 itself cannot)."""
    return dtype in _FORMATS


def certify(approx: Tensor, bound: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(RN(approx) in ``dtype``, mask of elements whose exact value is certainly rounded to it).

    ``approx`` is float64 and ``bound`` (float64, same shape, >= 0) bounds
    |approx - exact| element by element. An element is certain when both
    rounding boundaries around RN(approx) lie strictly farther than its bound
    from ``approx``; at a zero result the sign must be certain too. Elements
    not certain (and NaN) must be recomputed exactly by the caller.
    """
    rounded = round_float64(approx, dtype)
    below, above = _neighbours(rounded)
    value = rounded.to(torch.float64)
    # Midpoints of float16/bfloat16/float32 neighbours are exact in float64.
    # Differences are rounded, but rounding is monotonic and the bound is a
    # float64 number, so "rounded difference > bound" implies the exact one is.
    sure = ((approx - (value + below) / 2) > bound) & (((value + above) / 2 - approx) > bound)
    zero = value == 0
    sure &= ~zero | (approx.abs() > bound)
    # Overflow: a finite approximation rounded to ±inf is certain when it lies beyond the overflow
    # threshold by more than its bound (the midpoint formula above meets inf - inf there and would
    # send every overflowing element to the slow exact path; callers refuse such outputs anyway).
    overflowed = value.isinf() & approx.isfinite()
    if bool(overflowed.any()):
        sure |= overflowed & ((approx.abs() - overflow_threshold(dtype)) > bound)
    return rounded, sure


def overflow_threshold(dtype: torch.dtype) -> float:
    """The magnitude from which round-to-nearest gives infinity: halfway between the largest finite
    number and 2^(emax+1) (exact in float64)."""
    _, precision, _, emax = _FORMATS[dtype]
    return 2.0 ** (emax + 1) - 2.0 ** (emax - precision)


def round_certified(
    approx: Tensor,
    bound: Tensor,
    dtype: torch.dtype,
    exact: Callable[[int], Fraction],
    *,
    zero_is_exact: bool = False,
) -> Tensor:
    """RN(exact value) of every element in ``dtype``: ``approx`` rounded where certain, ``exact(flat index)`` elsewhere.

    ``zero_is_exact``: a zero approximation is the exact value with its sign
    (true of a single product, whose zero comes only from a zero factor).
    float64 outputs cannot be certified and get ``approx`` itself.
    """
    if not certifiable(dtype):
        return round_float64(approx, dtype)
    rounded, sure = certify(approx, bound, dtype)
    if zero_is_exact:
        sure |= approx == 0
    # inf/NaN approximations come from inf/NaN inputs: IEEE's result is the only one there is.
    missed = (~sure & approx.isfinite()).reshape(-1).nonzero().reshape(-1).tolist()
    if missed:
        flat = rounded.view(-1)
        values = torch.tensor([exact_round(exact(index), dtype) for index in missed], dtype=torch.float64)
        flat[torch.tensor(missed, dtype=torch.long, device=flat.device)] = values.to(device=flat.device, dtype=dtype)
    return rounded


def _neighbours(rounded: Tensor) -> tuple[Tensor, Tensor]:
    """The next smaller and next larger numbers of the format (float64), around each element.

    Past the largest finite number the next larger is taken as 2^(emax+1), so
    the midpoint above it is the overflow threshold; next to infinity it is
    infinity itself (no boundary on that side).
    """
    dtype = rounded.dtype
    int_type, _, _, emax = _FORMATS[dtype]
    width = 16 if int_type == torch.int16 else 32
    bits = rounded.view(int_type).to(torch.int64) & ((1 << width) - 1)
    sign_bit = 1 << (width - 1)
    magnitude = bits & (sign_bit - 1)
    negative = (bits & sign_bit) != 0
    infinity = _bits_of(math.inf, dtype)
    away = _from_bits(torch.clamp(magnitude + 1, max=infinity), dtype)  # one step away from zero
    away = torch.where(magnitude + 1 == infinity, torch.full_like(away, 2.0 ** (emax + 1)), away)
    away = torch.where(magnitude >= infinity, torch.full_like(away, math.inf), away)
    toward = _from_bits((magnitude - 1).clamp(min=0), dtype)  # one step toward zero
    # At zero both neighbours are the smallest subnormals of either sign.
    toward = torch.where(magnitude == 0, -_from_bits(torch.ones_like(magnitude), dtype), toward)
    above = torch.where(negative, -toward, away)
    below = torch.where(negative, -away, toward)
    return below, above


def _bits_of(value: float, dtype: torch.dtype) -> int:
    int_type = _FORMATS[dtype][0]
    return int(torch.tensor(value, dtype=dtype).view(int_type).item()) & 0xFFFFFFFF


def _from_bits(magnitude_bits: Tensor, dtype: torch.dtype) -> Tensor:
    """Non-negative bit patterns (int64, below the sign bit) of ``dtype`` as float64 values."""
    int_type = _FORMATS[dtype][0]
    return magnitude_bits.to(int_type).view(dtype).to(torch.float64)


def exact_round(value: Fraction, dtype: torch.dtype) -> float:
    """RN(value) in ``dtype`` (round half to even, IEEE overflow to ±inf), as a Python float.

    Exact rational arithmetic: ``value`` is an exact real number, and the
    result is the correctly rounded one by definition. An exact zero is +0.
    """
    if value == 0:
        return 0.0
    _, precision, emin, emax = _FORMATS[dtype]
    sign = -1.0 if value < 0 else 1.0
    result = round_magnitude(abs(value), precision, emin)
    if result >= Fraction(2) ** (emax + 1):
        return sign * math.inf
    return sign * float(result)  # exact: the result has at most `precision` significant bits


def round_magnitude(magnitude: Fraction, precision: int, emin: int) -> Fraction:
    """RN(magnitude > 0) to ``precision`` significant bits, subnormal below 2^emin, half to even; no
    overflow check (each format decides: IEEE's ±inf here, E4M3's refusal in ops/fp8.py)."""
    exponent = magnitude.numerator.bit_length() - magnitude.denominator.bit_length()
    if Fraction(2) ** exponent > magnitude:  # bit lengths can overestimate by one
        exponent -= 1
    quantum = Fraction(2) ** (max(exponent, emin) - (precision - 1))
    scaled = magnitude / quantum
    whole = scaled.numerator // scaled.denominator
    rest = scaled - whole
    if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and whole % 2 == 1):
        whole += 1
    return whole * quantum
