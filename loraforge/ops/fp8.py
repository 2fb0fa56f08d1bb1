"""ComfyUI "scaled fp8" weights: dequantise, choose the output scale, round to F8_E4M3 once.

A scaled-fp8 checkpoint (ComfyUI's ``scaled_fp8`` marker tensor, e.g. Flux
``*_fp8_scaled.safetensors``) stores a Linear weight as ``<module>.weight``
(F8_E4M3) next to ``<module>.scale_weight`` (a float32 scalar); the weight
a model computes with is the product of the two (comfy/ops.py
``scaled_fp8_ops``: ``convert_weight`` multiplies by ``scale_weight``,
``set_weight`` divides by it before rounding back to fp8).
``<module>.scale_input``, where present, scales activations for fp8 matrix
multiplication and does not change the weight's value.

E4M3 (``float8_e4m3fn``): 1 sign bit, 4 exponent bits (bias 7), 3 mantissa
bits; normal numbers from 2^-6 up to 448 = 1.75 * 2^8, subnormals k * 2^-9;
no infinities (the all-ones pattern is NaN). So 448 is the largest value and
there is nothing to saturate to silently: :func:`output_scale` picks a scale
under which every baked value fits.

Pure functions on tensors and numbers; no I/O.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import torch
from torch import Tensor

E4M3_MAX = 448.0
_MANTISSA_BITS = 3
_MIN_EXPONENT = -6  # lowest normal binade; below it the quantum stays 2^-9
_QUANTUM_FLOOR = _MIN_EXPONENT - _MANTISSA_BITS  # -9
# A float32 result y = RN(x) is within half a float32 step of x: |x - y| <= 2^-24 |y| for normal y, at most
# 2^-150 for subnormal ones. The bound used is twice that, so its own float64 evaluation needs no care.
_F32_RELATIVE = 2.0**-23
_F32_ABSOLUTE = 2.0**-149


def dequantised(weight: Tensor, scale: float) -> Tensor:
    """The weight a scaled-fp8 layer computes with, in float64: stored value x scale, exact.

    An E4M3 value has 4 significant bits and a float32 scale 24, so their
    product has at most 28 and float64 holds it exactly.
    """
    return weight.to(torch.float64) * scale


def scale_value(tensor: Tensor) -> float:
    """The per-tensor scale as a Python float (a one-element tensor of any float dtype; exact)."""
    return float(tensor.reshape(-1)[0].to(torch.float64))


def output_scale(rounded32: Tensor, scale: float) -> float:
    """The scale the requantised weight is stored with: the base's own when every value fits, else the least
    float32 under which they all do.

    ``rounded32`` is the baked weight correctly rounded to float32 (a function
    of the inputs only, so the choice is too: no BLAS-dependent float64 sum
    decides it). The exact baked values lie within 2^-23 of it relatively;
    the scale is kept when that whole interval, for the largest magnitude,
    fits under 448 x scale, so an unchanged tensor keeps its scale and every
    element whose delta is zero keeps its stored byte. Otherwise the scale is
    rounded up from amax (1 + 2^-23) / 448, so no value ever exceeds 448.
    """
    if rounded32.numel() == 0:
        return scale
    amax = float(rounded32.abs().max().to(torch.float64))
    if not math.isfinite(amax):
        return scale  # NaN/inf in the base: nothing to fit (the bake's overflow check reports new ones)
    needed = Fraction(amax) * (1 + Fraction(1, 2**23))
    if needed <= E4M3_MAX * Fraction(scale):
        return scale
    return _round_up_float32(needed / Fraction(int(E4M3_MAX)))


def _round_up_float32(value: Fraction) -> float:
    """The least float32 >= ``value`` (> 0), as a Python float."""
    candidate = np.float32(float(value))
    while Fraction(float(candidate)) < value:
        candidate = np.nextafter(candidate, np.float32(np.inf))
    while candidate > 0:
        lower = np.nextafter(candidate, np.float32(0))
        if Fraction(float(lower)) < value:
            break
        candidate = lower
    return float(candidate)


def round_e4m3(values: Tensor, bound: Tensor) -> tuple[Tensor, Tensor]:
    """(RN(values) on the E4M3 grid as float64, mask of elements certainly rounded as their exact value would be).

    ``values`` (float64, |v| <= 448 where finite) approximate exact reals to
    within ``bound`` (float64, >= 0). Round half to even on the grid of each
    value's binade, from the bit layout: quantum 2^(floor(log2|v|) - 3), at
    least 2^-9. An element is certain when no midpoint of the grid lies
    within its bound (and the bound is under a quarter quantum, so no
    midpoint of a neighbouring binade can be nearer than one of its own).
    """
    _, exponent = torch.frexp(values)  # |v| = m 2^e, m in [0.5, 1): floor(log2 |v|) = e - 1
    quantum_exponent = torch.clamp(exponent.to(torch.float64) - 1 - _MANTISSA_BITS, min=float(_QUANTUM_FLOOR))
    quantum = torch.pow(2.0, quantum_exponent)
    scaled = values / quantum  # exact: a power-of-two division
    whole = torch.round(scaled)  # half to even
    rounded = whole * quantum
    distance = ((scaled - torch.floor(scaled)) - 0.5).abs() * quantum  # to the nearest midpoint of the binade
    sure = (distance > bound) & (bound < 0.25 * quantum) & torch.isfinite(values)
    return rounded, sure


def requantise_bound(rounded32: Tensor, out_scale: float, quotient: Tensor) -> Tensor:
    """A bound on |exact / out_scale - quotient|, where quotient = float64(rounded32 / out_scale)."""
    wide = rounded32.to(torch.float64).abs()
    return (wide * _F32_RELATIVE + _F32_ABSOLUTE) / out_scale * (1 + 2.0**-40) + quotient.abs() * 2.0**-50


def exact_e4m3(value: Fraction) -> float:
    """RN(value) in E4M3 (round half to even), by exact rational arithmetic; ValueError beyond 448.

    A nonzero value that rounds to zero keeps its sign (IEEE); an exact zero is +0.
    """
    if value == 0:
        return 0.0
    sign = -1.0 if value < 0 else 1.0
    magnitude = abs(value)
    exponent = magnitude.numerator.bit_length() - magnitude.denominator.bit_length()
    if Fraction(2) ** exponent > magnitude:  # bit lengths can overestimate by one
        exponent -= 1
    quantum = Fraction(2) ** max(exponent - _MANTISSA_BITS, _QUANTUM_FLOOR)
    scaled = magnitude / quantum
    whole = scaled.numerator // scaled.denominator
    rest = scaled - whole
    if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and whole % 2 == 1):
        whole += 1
    result = whole * quantum
    if result > Fraction(int(E4M3_MAX)):
        raise ValueError(f"{float(value)} is beyond the largest E4M3 value, 448")
    return sign * float(result)


def to_e4m3(rounded: Tensor) -> Tensor:
    """float64 values already on the E4M3 grid (|v| <= 448) as ``float8_e4m3fn``: exact, no rounding left."""
    return rounded.to(torch.float32).to(torch.float8_e4m3fn)
