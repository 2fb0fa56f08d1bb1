"""Correctly rounded float64 -> float32/float16/bfloat16 conversion.

torch converts float64 to float16 and bfloat16 through float32, rounding
twice: a float64 value just above a float16 halfway point can first round
down onto the halfway point and then round to even, one float16 step away
from the correctly rounded result (1 + 2^-11 + 2^-40 becomes 1.0, not
1 + 2^-10). Bakes promise one rounding, identical on every device, so they
convert with :func:`round_float64`. float16 goes through numpy, whose
float64 -> float16 conversion rounds once (it runs on the CPU, whatever the
device, so CPU and CUDA bakes agree). bfloat16 takes torch's cast and redoes
the few elements whose float32 intermediate sits exactly on a bfloat16
halfway point with *round-to-odd* (truncate to float32, set the last bit when
anything was cut off) followed by nearest-even, which is exactly the
correctly rounded result because float32 keeps more than two extra bits
(Boldo & Melquiond, "When double rounding is odd", 2005).
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

# float32 bit patterns of a value exactly halfway between two neighbours of the target.
_BFLOAT16_HALFWAY = (0xFFFF, 0x8000)  # 16 bits dropped


def round_float64(values: Tensor, dtype: torch.dtype) -> Tensor:
    """``values`` (float64) rounded once, to nearest-even, to ``dtype``."""
    if values.dtype != torch.float64 or dtype in (torch.float64, torch.float32):
        return values.to(dtype)  # float64 -> float32 is a single IEEE rounding
    if dtype == torch.float16:
        return _float16(values)
    if dtype == torch.bfloat16:
        return _bfloat16(values)
    return values.to(dtype)


def _float16(values: Tensor) -> Tensor:
    """numpy converts float64 to float16 directly with one nearest-even rounding.

    numpy's cast is single-threaded but releases the GIL, so large tensors
    are converted in slices on a few threads (elementwise: same bytes).
    """
    source = values.detach().cpu().contiguous().numpy().reshape(-1)
    rounded = np.empty(source.shape, dtype=np.float16)
    step = max(PARALLEL_SLICE, -(-source.size // _THREADS))

    def convert(start: int) -> None:
        with np.errstate(over="ignore"):  # beyond float16's range is inf, as IEEE says (per thread)
            np.copyto(rounded[start:start + step], source[start:start + step], casting="unsafe")

    list(_pool().map(convert, range(0, source.size, step)))
    return torch.from_numpy(rounded).reshape(values.shape).to(values.device)


PARALLEL_SLICE = 1 << 20  # elements; smaller tensors are converted in one piece
_THREADS = max(1, min(4, os.cpu_count() or 1))


@functools.lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=_THREADS, thread_name_prefix="loraforge-round")


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
