"""Baking: W' = W + sum_i c_i * dW_i, accumulated in float64 and rounded once.

Pure tensor math. Contributions are added in the order given (the planner's
order: recipe order of the LoRAs, then module name), so the float64 sum and
therefore the rounded output are reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor


@dataclass(frozen=True)
class Contribution:
    """One scaled delta landing on a weight or on a row slice of it."""

    coefficient: float
    delta: Tensor  # float64, the shape of the weight or of its row slice
    rows: tuple[int, int] | None = None


def bake_weight(weight: Tensor, contributions: Sequence[Contribution], out_dtype: torch.dtype) -> Tensor:
    """The baked weight in ``out_dtype``: every delta added in float64, then one rounding."""
    baked = weight.to(torch.float64, copy=True)
    for contribution in contributions:
        target = baked if contribution.rows is None else baked[contribution.rows[0]:contribution.rows[1]]
        target.add_(contribution.delta.reshape(target.shape), alpha=contribution.coefficient)
    return baked.to(out_dtype)
