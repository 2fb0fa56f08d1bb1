"""Baking: W' = W + sum_i c_i * dW_i, accumulated in float64 and rounded once.

Pure tensor math. Terms are added in the order given (the planner's order:
recipe order of the LoRAs, then module name), so the float64 sum and
therefore the rounded output are reproducible.

Plain LoRA/LoCon terms arrive as factors and are added with one in-place
``addmm_`` per row slice (their factors concatenated along the rank axis):
no dense delta is ever allocated for them, which is what keeps the bake close
to the speed of a plain copy. Other kinds arrive as dense deltas.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby
from typing import Iterable, Union

import torch
from torch import Tensor

from loraforge.ops.rounding import round_float64


@dataclass(frozen=True)
class DenseTerm:
    """A dense delta landing on a weight or on a row slice of it."""

    coefficient: float
    delta: Tensor  # float64, the shape of the weight or of its row slice
    rows: tuple[int, int] | None = None


@dataclass(frozen=True)
class LowRankTerm:
    """up @ down landing on a weight (or row slice) viewed as (out, in*kh*kw)."""

    up: Tensor  # float64 (out, r), already multiplied by coefficient and scale
    down: Tensor  # float64 (r, in*kh*kw)
    rows: tuple[int, int] | None = None


Term = Union[DenseTerm, LowRankTerm]


def bake_weight(weight: Tensor, terms: Iterable[Term], out_dtype: torch.dtype, workspace: Tensor | None = None) -> Tensor:
    """The baked weight in ``out_dtype``: every term added in float64, then one correct rounding.

    ``workspace`` (float64, at least ``weight.numel()`` elements, same device)
    is reused for the float64 copy so large tensors do not page-fault fresh
    memory for every weight.
    """
    baked = _float64_copy(weight, workspace)
    for is_low_rank, run in groupby(terms, key=lambda term: isinstance(term, LowRankTerm)):
        if is_low_rank:
            _add_low_rank(baked, list(run))
        else:
            for term in run:
                _slice(baked, term.rows).add_(term.delta.reshape(_slice(baked, term.rows).shape), alpha=term.coefficient)
    return round_float64(baked, out_dtype)


def _add_low_rank(baked: Tensor, terms: list[LowRankTerm]) -> None:
    """Consecutive terms on the same rows share one GEMM over their concatenated ranks."""
    for rows, group in groupby(terms, key=lambda term: term.rows):
        group = list(group)
        target = _slice(baked, rows)
        up = group[0].up if len(group) == 1 else torch.cat([t.up for t in group], dim=1)
        down = group[0].down if len(group) == 1 else torch.cat([t.down for t in group], dim=0)
        target.view(target.shape[0], -1).addmm_(up, down)


def _slice(tensor: Tensor, rows: tuple[int, int] | None) -> Tensor:
    return tensor if rows is None else tensor[rows[0]:rows[1]]


def _float64_copy(weight: Tensor, workspace: Tensor | None) -> Tensor:
    if workspace is None or workspace.numel() < weight.numel() or workspace.device != weight.device:
        return weight.to(torch.float64, copy=True)
    return workspace[: weight.numel()].view(weight.shape).copy_(weight)
