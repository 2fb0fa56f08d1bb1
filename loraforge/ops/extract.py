"""Extraction math: the per-module weight difference, whether it counts, its low-rank factors.

Pure tensor math, no I/O: works on whatever device its inputs live on. The
executor (execute/extract.py) reads the checkpoints and writes the LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from loraforge.ops.svd import LowRankResult, RankPolicy, dense_svd, module_seed

COMPUTE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class DeltaStats:
    """How large a module's difference is (before any SVD)."""

    max_abs: float  # max |dW|: compared with min_diff to decide whether the module changed
    norm: float  # ||dW||_F
    base_norm: float  # ||W_base||_F, for the relative change

    @property
    def relative_change(self) -> float:
        return self.norm / self.base_norm if self.base_norm > 0 else float("inf") if self.norm > 0 else 0.0


def weight_delta(tuned: Tensor, base: Tensor, compute: str) -> Tensor:
    """tuned - base in the compute dtype (float32 subtraction of float16/bfloat16 weights is exact)."""
    dtype = COMPUTE_DTYPES[compute]
    return tuned.to(dtype) - base.to(dtype)


def module_matrix(delta: Tensor, rows: tuple[int, int] | None) -> Tensor:
    """The module's part of a weight difference as (out, in*kh*kw): a row slice for fused qkv weights."""
    part = delta if rows is None else delta[rows[0]:rows[1]]
    return part.reshape(part.shape[0], -1)


def delta_stats(matrix: Tensor, base_part: Tensor) -> DeltaStats:
    return DeltaStats(
        max_abs=float(matrix.abs().max()) if matrix.numel() else 0.0,
        norm=float(torch.linalg.vector_norm(matrix, dtype=torch.float64)),
        base_norm=float(torch.linalg.vector_norm(base_part, dtype=torch.float64)),
    )


def is_changed(stats: DeltaStats, min_diff: float) -> bool:
    """A module counts as changed when some entry moved by more than ``min_diff`` (and never when dW = 0)."""
    return stats.max_abs > min_diff and stats.norm > 0.0


def policy_for(rank: int | None, energy: float | None, ratio: float | None, max_rank: int | None) -> RankPolicy:
    return RankPolicy(rank=rank, energy=energy, ratio=ratio, max_rank=max_rank)


def extract_low_rank(
    matrix: Tensor,
    policy: RankPolicy,
    *,
    method: str,
    recipe_seed: int,
    module_name: str,
    clamp_quantile: float | None = None,
) -> LowRankResult:
    """The module's rank-k factors (up = U*sqrt(S), down = sqrt(S)*V^T), seeded per module.

    The seed depends only on the recipe seed and the module's kohya name, so
    the result does not depend on which other modules are extracted or in
    which order they run.
    """
    return dense_svd(
        matrix,
        policy,
        method=method,
        generator_seed=module_seed(recipe_seed, module_name),
        clamp_quantile=clamp_quantile,
    )
