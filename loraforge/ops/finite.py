"""Finiteness checks on factors: pure tensor math, no I/O.

A NaN or infinity in one adapter factor spreads through the GEMM to every
element of the baked weight, so factors are checked when they are loaded
(execute/bake.py) rather than trusted.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


# torch has no isfinite/isnan for its float8 types; widening to float32 is exact (NaN stays NaN).
_NARROW = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz") if hasattr(torch, name))


def _checkable(tensor: Tensor) -> Tensor:
    return tensor.to(torch.float32) if tensor.dtype in _NARROW else tensor


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """True when no tensor holds a NaN or an infinity (integer tensors always pass)."""
    return all(bool(torch.isfinite(_checkable(t)).all()) for t in tensors if t.is_floating_point())


def nonfinite_counts(tensor: Tensor) -> tuple[int, int]:
    """(number of NaNs, number of ±infinities) in ``tensor``."""
    if not tensor.is_floating_point():
        return 0, 0
    tensor = _checkable(tensor)
    return int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())


def overflow_count(output: Tensor, source: Tensor) -> int:
    """Elements of ``output`` that are infinite or NaN where ``source`` (same number of elements) is finite.

    What rounding to the save dtype (or a float64 sum) turned from finite into
    non-finite: an output no reader can use, so the executors refuse it. An
    inf/NaN already in ``source`` is passed through, not counted. One
    vectorised reduction over ``output`` when nothing overflowed.
    """
    if not output.is_floating_point() or not output.numel():
        return 0
    checked = _checkable(output)
    # aminmax propagates NaN and returns ±inf when one is present, so two finite extremes mean an all-finite
    # tensor. It is a vectorised reduction: 30-40x faster than the elementwise isfinite mask on one thread
    # (66 M bf16 elements, one Flux linear1 weight: 0.07 s against 2.4 s), which made this check a third of
    # a full-size Flux bake's main loop.
    low, high = torch.aminmax(checked)
    if bool(torch.isfinite(low)) and bool(torch.isfinite(high)):
        return 0
    bad = ~torch.isfinite(checked)
    if not bool(bad.any()):
        return 0
    if source.is_floating_point():
        bad &= torch.isfinite(_checkable(source).reshape(output.shape).to(output.device))
    return int(bad.sum())
