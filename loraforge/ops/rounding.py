"""Correctly rounded float64 -> float32/float16/bfloat16 conversion.

torch converts float64 to float16 and bfloat16 through float32, rounding
twice: a float64 value just above a float16 halfway point can first round
down onto the halfway point and then round to even, one float16 step away
from the correctly rounded result (1 + 2^-11 + 2^-40 becomes 1.0, not
1 + 2^-10). Bakes promise one rounding, identical on every device, so they
convert with :func:`round_float64`. float16 takes torch's fast two-step cast
and redoes, with numpy's direct (single-rounding) conversion, the few
elements whose float32 intermediate sits exactly on a float16 halfway point
(see :func:`float16_into`); the result is numpy's conversion bit for bit, on
every device (the fix-up runs on the CPU). bfloat16 takes torch's cast and redoes
the few elements whose float32 intermediate sits exactly on a bfloat16
halfway point with *round-to-odd* (truncate to float32, set the last bit when
anything was cut off) followed by nearest-even, which is exactly the
correctly rounded result because float32 keeps more than two extra bits
(Boldo & Melquiond, "When double rounding is odd", 2005).
"""

from __future__ import annotations

from concurrent.futures import Executor

import numpy as np
import torch
from torch import Tensor

# float32 bit patterns of a value exactly halfway between two neighbours of the target.
_BFLOAT16_HALFWAY = (0xFFFF, 0x8000)  # 16 bits dropped


def round_float64(values: Tensor, dtype: torch.dtype, pool: Executor | None = None) -> Tensor:
    """``values`` (float64) rounded once, to nearest-even, to ``dtype``.

    ``pool``: threads that may convert slices of a large float16 result side by
    side (elementwise, so the bytes are the same without it).
    """
    if values.dtype != torch.float64 or dtype in (torch.float64, torch.float32):
        return values.to(dtype)  # float64 -> float32 is a single IEEE rounding
    if dtype == torch.float16:
        return _float16(values, pool)
    if dtype == torch.bfloat16:
        return _bfloat16(values)
    return values.to(dtype)


def _float16(values: Tensor, pool: Executor | None) -> Tensor:
    """float64 -> float16 with one rounding (the CPU does it, whatever the device)."""
    source = values.detach().cpu().contiguous().reshape(-1)
    rounded = torch.empty(source.shape, dtype=torch.float16)
    if pool is None or source.numel() <= PARALLEL_SLICE:
        float16_into(source, rounded)
    else:
        # Elementwise, so slices on a few threads give the same bytes (the casts release the GIL).
        slices = range(0, source.numel(), PARALLEL_SLICE)
        list(pool.map(lambda start: float16_into(source[start:start + PARALLEL_SLICE], rounded[start:start + PARALLEL_SLICE]), slices))
    return rounded.reshape(values.shape).to(values.device)


# float32 bit patterns (sign cleared) around float16's normal range.
_FLOAT16_SMALLEST_NORMAL_BITS = 0x38800000  # 2^-14: below it float16 halfway points sit on coarser bit positions
_FLOAT16_OVERFLOW_BITS = 0x477FF000  # 65520, halfway to 2^16: from here on (and inf/NaN) numpy decides
_FLOAT16_DROPPED = 0x1FFF  # float32 keeps 13 more significand bits than float16
_FLOAT16_HALFWAY = 0x1000


def float16_into(values: Tensor, out: Tensor) -> None:
    """Round contiguous CPU float64 ``values`` once, to nearest-even, into float16 ``out`` (same shape).

    Bit for bit numpy's direct float64 -> float16 conversion, at the cost of
    torch's vectorised float64 -> float32 -> float16 casts (numpy's direct
    conversion is about 10x slower). The two-step cast can only differ where
    the float32 intermediate lands exactly on a float16 halfway point:
    rounding to float32 is monotonic and every float16 halfway point is a
    float32 number, so a value strictly between two halfway points stays
    between them. Those elements (about 1 in 8192) are found from the float32
    bits and converted again by numpy. Halfway points are 0x1000 in the 13
    dropped bits of a normal float16, a multiple of 0x2000 below 2^-14
    (float16 subnormals drop more bits), and 65520 at the top; both patterns
    have their low 12 bits clear, which is the cheap first filter. A block
    holding anything at or beyond 65520 (inf, NaN included) goes to numpy
    whole, so overflow and NaN payloads are numpy's too.
    """
    source = values.numpy().reshape(-1)
    target = out.numpy().reshape(-1).view(np.uint16)
    nearest = values.to(torch.float32)
    magnitude = nearest.view(torch.int32).numpy().reshape(-1) & 0x7FFFFFFF
    if magnitude.size and magnitude.max() >= _FLOAT16_OVERFLOW_BITS:
        with np.errstate(over="ignore"):  # beyond float16's range is inf, as IEEE says
            target[:] = source.astype(np.float16).view(np.uint16)
        return
    out.copy_(nearest.view(out.shape))
    candidates = np.flatnonzero((magnitude & 0xFFF) == 0)
    low = magnitude[candidates] & _FLOAT16_DROPPED
    subnormal = (magnitude[candidates] < _FLOAT16_SMALLEST_NORMAL_BITS) & (magnitude[candidates] != 0)
    redo = candidates[(low == _FLOAT16_HALFWAY) | (subnormal & (low == 0))]
    if redo.size:
        target[redo] = source[redo].astype(np.float16).view(np.uint16)


def float16_reference(values: Tensor) -> Tensor:
    """numpy's direct float64 -> float16 conversion (one rounding): what :func:`float16_into` must equal."""
    with np.errstate(over="ignore"):
        return torch.from_numpy(values.detach().cpu().numpy().astype(np.float16))


PARALLEL_SLICE = 1 << 20  # elements per slice given to a pool; smaller tensors are converted in one piece


def _bfloat16(values: Tensor) -> Tensor:
    """torch's two-step cast, then the rare elements it may get wrong redone by round-to-odd.

    The cast can only err where the float32 intermediate lands exactly on a
    bfloat16 halfway point (rounding to float32 is monotonic and never
    crosses one), so only those elements need the slower exact path.
    """
    nearest = values.to(torch.float32)
    rounded = nearest.to(torch.bfloat16)
    mask, halfway = _BFLOAT16_HALFWAY
    suspicious = ((nearest.view(torch.int32) & mask) == halfway).nonzero(as_tuple=True)
    if suspicious[0].numel():
        rounded[suspicious] = float32_round_to_odd(values[suspicious]).to(torch.bfloat16)
    return rounded


def float32_round_to_odd(values: Tensor) -> Tensor:
    """float64 -> float32 rounded to odd: truncate toward zero, set the last bit if inexact."""
    nearest = values.to(torch.float32)
    inexact = nearest.to(torch.float64) != values
    overshot = inexact & (nearest.to(torch.float64).abs() > values.abs())
    truncated = torch.where(overshot, torch.nextafter(nearest, torch.zeros_like(nearest)), nearest)
    bits = truncated.view(torch.int32)
    return torch.where(inexact, bits | 1, bits).view(torch.float32)
