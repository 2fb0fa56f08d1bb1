"""Correctly rounded float64 -> float32/float16/bfloat16 conversion.

torch converts float64 to float16 and bfloat16 through float32, rounding
twice: a float64 value just above a float16 halfway point can first round
down onto the halfway point and then round to even, one float16 step away
from the correctly rounded result (1 + 2^-11 + 2^-40 becomes 1.0, not
1 + 2^-10). Bakes promise one rounding, identical on every device, so they
convert with :func:`round_float64`: float64 -> float32 with *round-to-odd*
(truncate, then set the last bit when anything was cut off), then float32 ->
target with round-to-nearest-even. Because float32 keeps at least two more
bits than float16 or bfloat16, round-to-odd followed by nearest-even gives
exactly the correctly rounded result (Boldo & Melquiond, "When double
rounding is odd", 2005). Every step is an elementwise torch operation, so
the result is the same on CPU and CUDA.
"""

from __future__ import annotations

import torch
from torch import Tensor

_NARROW = (torch.float16, torch.bfloat16)


def round_float64(values: Tensor, dtype: torch.dtype) -> Tensor:
    """``values`` (float64) rounded once, to nearest-even, to ``dtype``."""
    if values.dtype != torch.float64 or dtype in (torch.float64,):
        return values.to(dtype)
    if dtype == torch.float32:
        return values.to(torch.float32)  # a single IEEE rounding
    if dtype in _NARROW:
        return float32_round_to_odd(values).to(dtype)
    return values.to(dtype)


def float32_round_to_odd(values: Tensor) -> Tensor:
    """float64 -> float32 rounded to odd: truncate toward zero, set the last bit if inexact."""
    nearest = values.to(torch.float32)
    inexact = nearest.to(torch.float64) != values
    overshot = inexact & (nearest.to(torch.float64).abs() > values.abs())
    truncated = torch.where(overshot, torch.nextafter(nearest, torch.zeros_like(nearest)), nearest)
    bits = truncated.view(torch.int32)
    return torch.where(inexact, bits | 1, bits).view(torch.float32)
