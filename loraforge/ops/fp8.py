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

from fractions import Fraction

import numpy as np
import torch
from torch import Tensor

from loraforge.ops.certified import round_magnitude

E4M3_MAX = 448.0
_MANTISSA_BITS = 3
_MIN_EXPONENT = -6  # lowest normal binade; below it the quantum stays 2^-9
_QUANTUM_FLOOR = _MIN_EXPONENT - _MANTISSA_BITS  # -9


def dequantised(weight: Tensor, scale: float) -> Tensor:
    """The weight a scaled-fp8 layer computes with, in float64: stored value x scale, exact.

    An E4M3 value has 4 significant bits and a float32 scale 24, so their
    product has at most 28 and float64 holds it exactly.
    """
    return weight.to(torch.float64) * scale


def scale_value(tensor: Tensor) -> float:
    """The per-tensor scale as a Python float (a one-element tensor of any float dtype; exact)."""
    return float(tensor.reshape(-1)[0].to(torch.float64))


def output_scale(largest: Fraction, scale: float) -> float:
    """The scale a requantised weight is stored with, from the exact largest |value| of the baked weight.

    The base's scale when every value fits under it (largest <= 448 x scale):
    an unchanged tensor keeps its scale and every element the LoRAs leave
    alone keeps its stored byte. Otherwise the least float32 >= largest / 448,
    so no value ever exceeds 448 and nothing is clipped or saturated.
    """
    if largest <= E4M3_MAX * Fraction(scale):
        return scale
    return least_float32_at_least(largest / Fraction(int(E4M3_MAX)))


def least_float32_at_least(value: Fraction) -> float:
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

    ``values`` (contiguous float64, |v| <= 448 where finite) approximate exact
    reals to within ``bound`` (float64, >= 0). Round half to even on the grid
    of each value's binade, read from the float64 bit layout: quantum
    2^(exponent - 3), at least 2^-9. An element is certain when no midpoint
    of the grid lies within its bound (and the bound is under a quarter
    quantum, so no midpoint of a neighbouring binade can be nearer than one
    of its own), and when the bound leaves its sign settled (|v| > bound), so
    a zero comes out with the exact value's sign.
    """
    exponent = (values.view(torch.int64) >> 52) & 0x7FF  # biased float64 exponent; 0 for zeros and subnormals
    quantum_exponent = torch.clamp(exponent - (1023 + _MANTISSA_BITS), min=_QUANTUM_FLOOR)
    quantum = ((quantum_exponent + 1023) << 52).view(torch.float64)  # 2^quantum_exponent, built from its bits
    scaled = values / quantum  # exact: a power-of-two division
    rounded = torch.round(scaled).mul_(quantum)  # half to even
    distance = (scaled - torch.floor(scaled)).sub_(0.5).abs_().mul_(quantum)  # to the nearest midpoint of the binade
    sure = (distance > bound) & (bound < 0.25 * quantum) & (values.abs() > bound) & torch.isfinite(values)
    return rounded, sure


def exact_e4m3(value: Fraction) -> float:
    """RN(value) in E4M3 (round half to even), by exact rational arithmetic; ValueError beyond 448.

    A nonzero value that rounds to zero keeps its sign (IEEE); an exact zero is +0.
    """
    if value == 0:
        return 0.0
    sign = -1.0 if value < 0 else 1.0
    result = round_magnitude(abs(value), _MANTISSA_BITS + 1, _MIN_EXPONENT)
    if result > Fraction(int(E4M3_MAX)):
        raise ValueError(f"{float(value)} is beyond the largest E4M3 value, 448")
    return sign * float(result)


def to_e4m3(rounded: Tensor) -> Tensor:
    """float64 values already on the E4M3 grid (|v| <= 448) as ``float8_e4m3fn``: exact, no rounding left."""
    return rounded.to(torch.float32).to(torch.float8_e4m3fn)
