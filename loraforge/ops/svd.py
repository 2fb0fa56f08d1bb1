"""Low-rank approximation: rank policies, exact factored SVD, dense SVD (exact or randomized).

Pure tensor math, no I/O; every function works on the device its inputs live
on and computes in float64 unless told otherwise.

A matrix here is the (out, in·kh·kw) view of a weight delta. Results come as a
:class:`LowRankResult` whose ``up`` (out×k) and ``down`` (k×in) split the
singular values symmetrically (up = U·√S, down = √S·Vᵀ), so neither factor
dominates the other's magnitude when rounded to a half-precision save dtype.

Canonical signs. A singular pair (u, v) is only defined up to a common sign.
We flip each pair so that the entry of ``u`` with the largest absolute value
is positive (the first such entry on an exact tie); the same rule is applied
to every path, so the factored and the dense SVD of the same matrix give the
same factors up to rounding, and a rebuild gives the same bytes.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

DEFAULT_OVERSAMPLE = 10  # extra sketch columns beyond the wanted rank (Halko et al. suggest 5-10)
DEFAULT_POWER_ITERATIONS = 2  # subspace iterations; 1-2 suffice for slowly decaying spectra
# Relative tolerance for "reaches the energy fraction": a float64 cumulative sum may fall a few ulps
# short of a fraction it reaches mathematically (energy 1.0 on an exact low-rank matrix, say).
ENERGY_TOLERANCE = 1e-12


@dataclass(frozen=True)
class RankPolicy:
    """How many singular values to keep.

    Exactly one of ``rank`` (fixed), ``energy`` (the smallest k whose leading
    singular values hold at least this fraction of the squared Frobenius norm)
    or ``ratio`` (every σ_k with σ_max/σ_k ≤ ratio) chooses the rank;
    ``max_rank`` caps the energy and ratio rules (with ``rank`` it is redundant
    but allowed: the smaller wins). The result is never more than the
    numerical rank (singular values above σ_max·max(out, in)·ε of float64,
    the tolerance of ``torch.linalg.matrix_rank``; the rest are rounding
    noise) and never less than 1.

    Ties: singular values are sorted in descending order; when σ_k = σ_{k+1}
    the rule still stops at the first k that satisfies it, so the kept
    subspace is one of several equally good ones (the factorisation's order
    decides which, deterministically).
    """

    rank: int | None = None
    energy: float | None = None
    ratio: float | None = None
    max_rank: int | None = None

    def __post_init__(self) -> None:
        chosen = [name for name in ("rank", "energy", "ratio") if getattr(self, name) is not None]
        if len(chosen) != 1:
            raise ValueError(f"a RankPolicy needs exactly one of rank, energy, ratio (got {chosen or 'none'})")
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"rank must be a whole number ≥ 1, got {self.rank!r}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {self.energy!r}")
        if self.ratio is not None and not self.ratio >= 1.0:
            raise ValueError(f"ratio must be ≥ 1, got {self.ratio!r}")
        if self.max_rank is not None and (not isinstance(self.max_rank, int) or self.max_rank < 1):
            raise ValueError(f"max_rank must be a whole number ≥ 1, got {self.max_rank!r}")

    @property
    def bound(self) -> int | None:
        """The most singular values this policy can keep, when known without the spectrum."""
        bounds = [b for b in (self.rank, self.max_rank) if b is not None]
        return min(bounds) if bounds else None

    def choose(
        self, singular_values: Tensor, total_energy: float | None = None, numerical_rank: int | None = None
    ) -> int:
        """The rank to keep, given singular values in descending order.

        ``total_energy`` is ‖A‖_F²; it defaults to Σσ², which is right when
        every non-zero singular value was computed (factored and exact SVD) and
        must be passed for a randomized SVD, which computes only a few.
        ``numerical_rank`` caps the result (see :func:`numerical_rank`).
        """
        values = singular_values.detach().to("cpu", torch.float64)
        available = int(values.numel())
        if available == 0:
            raise ValueError("no singular values to choose from")
        if self.rank is not None:
            k = self.rank
        elif self.energy is not None:
            k = _energy_rank(values, self.energy, total_energy)
        else:
            k = _ratio_rank(values, float(self.ratio))
        if self.max_rank is not None:
            k = min(k, self.max_rank)
        if numerical_rank is not None:
            k = min(k, numerical_rank)
        return max(1, min(k, available))


def _energy_rank(values: Tensor, fraction: float, total_energy: float | None) -> int:
    squares = values * values
    total = float(squares.sum()) if total_energy is None else float(total_energy)
    if total <= 0.0:
        return 1
    cumulative = torch.cumsum(squares, 0)
    reached = torch.nonzero(cumulative >= fraction * total * (1.0 - ENERGY_TOLERANCE))
    # Not reached within the computed values (randomized, capped sketch): keep them all.
    return int(reached[0]) + 1 if reached.numel() else int(values.numel())


def _ratio_rank(values: Tensor, ratio: float) -> int:
    largest = float(values[0])
    if largest <= 0.0:
        return 1
    return int((values * ratio >= largest).sum())


@dataclass(frozen=True)
class LowRankResult:
    """A rank-k approximation up @ down of a matrix A, and how good it is."""

    up: Tensor  # (out, k), float64
    down: Tensor  # (k, in), float64
    singular_values: Tensor  # every singular value computed, descending, float64 on the CPU
    rank: int  # k
    energy_retained: float  # Σ_{i<k} σᵢ² / ‖A‖_F², the share the rank choice keeps (1.0 for A = 0)
    relative_error: float  # ‖A − up@down‖_F / ‖A‖_F (0.0 for A = 0); includes any clamping


# --------------------------------------------------------------------------- helpers


def numerical_rank(singular_values: Tensor, shape: Sequence[int]) -> int:
    """How many singular values exceed σ_max·max(shape)·ε(float64): the rest are rounding noise."""
    values = singular_values.detach().to("cpu", torch.float64)
    if values.numel() == 0 or float(values[0]) <= 0.0:
        return 0
    tolerance = float(values[0]) * max(shape) * torch.finfo(torch.float64).eps
    return int((values > tolerance).sum())


def module_seed(recipe_seed: int, module_name: str) -> int:
    """A 63-bit generator seed for one module: sha256 of the recipe seed and the name (never hash())."""
    digest = hashlib.sha256(f"loraforge-svd\x00{int(recipe_seed)}\x00{module_name}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def canonical_signs(u: Tensor, vh: Tensor) -> tuple[Tensor, Tensor]:
    """Flip each singular pair so the largest-magnitude entry of its u column is positive (module docstring)."""
    if u.numel() == 0:
        return u, vh
    pivots = torch.argmax(u.abs(), dim=0)  # argmax returns the first index on ties
    signs = torch.sign(u.gather(0, pivots.unsqueeze(0)).squeeze(0))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return u * signs, vh * signs.unsqueeze(1)


def split_symmetric(u: Tensor, s: Tensor, vh: Tensor) -> tuple[Tensor, Tensor]:
    """(up, down) = (U·√S, √S·Vᵀ) for the leading len(s) singular triplets."""
    root = torch.sqrt(s)
    return u * root, root.unsqueeze(1) * vh


def clamp_factors(up: Tensor, down: Tensor, quantile: float) -> tuple[Tensor, Tensor]:
    """Clamp both factors to ±(the ``quantile`` of |all their entries|), as kohya's scripts do.

    Off by default everywhere: clamping trades exactness for smaller outliers
    (see docs/merging.md); it exists for people who must match those scripts.
    """
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"clamp quantile must be in (0, 1], got {quantile!r}")
    values = torch.cat([up.reshape(-1), down.reshape(-1)]).abs()
    # kthvalue, unlike torch.quantile, has no input-size limit; it is the "lower" quantile.
    k = max(1, min(values.numel(), math.ceil(quantile * values.numel())))
    limit = torch.kthvalue(values, k).values
    return up.clamp(-limit, limit), down.clamp(-limit, limit)


def _factored_error_squared(ups: Tensor, downs: Tensor, up: Tensor, down: Tensor) -> float:
    """‖U·V − up·down‖_F² from the factors: ‖X·Y‖² = trace((XᵀX)(YYᵀ)) with X = [U, −up], Y = [V; down]."""
    x = torch.cat([ups, -up], dim=1)
    y = torch.cat([downs, down], dim=0)
    value = float(torch.sum((x.T @ x) * (y @ y.T)))
    return max(value, 0.0)


def _result(u, s, vh, policy, total_energy, all_values, shape, clamp_quantile, error_squared) -> LowRankResult:
    k = policy.choose(all_values, total_energy, numerical_rank(all_values, shape))
    u, vh = canonical_signs(u[:, :k], vh[:k])
    up, down = split_symmetric(u, s[:k], vh)
    kept = float(torch.sum(s[:k].double() ** 2))
    if clamp_quantile is not None:
        up, down = clamp_factors(up, down, clamp_quantile)
        residual = error_squared(up, down)
    else:
        residual = max(total_energy - kept, 0.0)
    if total_energy <= 0.0:
        return LowRankResult(up, down, all_values, k, 1.0, 0.0)
    energy = min(kept / total_energy, 1.0)
    return LowRankResult(up, down, all_values, k, energy, math.sqrt(residual / total_energy))


# --------------------------------------------------------------------------- factored


def factored_svd(
    ups: Sequence[Tensor],
    downs: Sequence[Tensor],
    policy: RankPolicy,
    *,
    clamp_quantile: float | None = None,
) -> LowRankResult:
    """The truncated SVD of Σᵢ upsᵢ @ downsᵢ without forming the (out × in) sum.

    ``ups[i]`` is (out, rᵢ) with every coefficient and scale already folded in;
    ``downs[i]`` is (rᵢ, in). Stacking gives A = U·V with R = Σrᵢ columns;
    U = Q_u R_u and Vᵀ = Q_v R_v (reduced QR), so A = Q_u (R_u R_vᵀ) Q_vᵀ and
    the SVD of the small core R_u R_vᵀ = U_c S V_cᵀ gives A = (Q_u U_c) S (Q_v V_c)ᵀ
    exactly. Cost O((out + in)·R²) instead of O(out·in·min(out, in)).
    """
    if not ups or len(ups) != len(downs):
        raise ValueError("factored_svd needs one down for each up, and at least one pair")
    u_stack = torch.cat([u.to(torch.float64) for u in ups], dim=1)
    v_stack = torch.cat([d.to(torch.float64) for d in downs], dim=0)
    if u_stack.shape[1] != v_stack.shape[0]:
        raise ValueError(f"stacked ups have {u_stack.shape[1]} columns but stacked downs {v_stack.shape[0]} rows")
    q_u, r_u = torch.linalg.qr(u_stack)
    q_v, r_v = torch.linalg.qr(v_stack.T)
    core_u, s, core_vh = torch.linalg.svd(r_u @ r_v.T, full_matrices=False)
    u = q_u @ core_u
    vh = core_vh @ q_v.T
    values = s.detach().to("cpu")
    total = float(torch.sum(values**2))
    shape = (u_stack.shape[0], v_stack.shape[1])
    return _result(
        u, s, vh, policy, total, values, shape, clamp_quantile,
        lambda up, down: _factored_error_squared(u_stack, v_stack, up, down),
    )


# --------------------------------------------------------------------------- dense


def dense_svd(
    matrix: Tensor,
    policy: RankPolicy,
    *,
    method: str = "exact",
    generator_seed: int = 0,
    oversample: int = DEFAULT_OVERSAMPLE,
    power_iterations: int = DEFAULT_POWER_ITERATIONS,
    clamp_quantile: float | None = None,
) -> LowRankResult:
    """The truncated SVD of a dense matrix (2-D; conv deltas flattened to (out, in·kh·kw)).

    ``method="exact"``: LAPACK SVD of the whole matrix. ``"randomized"``:
    Halko, Martinsson & Tropp (2011), Algorithm 4.4: a Gaussian sketch of
    ``policy.bound + oversample`` columns drawn from a CPU ``torch.Generator``
    seeded with ``generator_seed`` (so every device sees the same numbers),
    ``power_iterations`` re-orthonormalised subspace iterations, then the SVD
    of the small projected matrix. A policy without a bound (energy or ratio
    with no max), or a sketch as wide as the matrix, falls back to exact.
    """
    if matrix.dim() != 2:
        raise ValueError(f"dense_svd takes a 2-D matrix, got shape {tuple(matrix.shape)}")
    if method not in ("exact", "randomized"):
        raise ValueError(f"unknown SVD method {method!r}; use 'exact' or 'randomized'")
    a = matrix.to(torch.float64)
    total = float(torch.sum(a * a))
    bound = policy.bound
    width = None if bound is None else bound + max(0, oversample)
    if method == "exact" or width is None or width >= min(a.shape):
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
    else:
        u, s, vh = _randomized_svd(a, width, generator_seed, power_iterations)
    values = s.detach().to("cpu")
    return _result(
        u, s, vh, policy, total, values, tuple(a.shape), clamp_quantile,
        lambda up, down: float(torch.sum((a - up @ down) ** 2)),
    )


def _randomized_svd(a: Tensor, width: int, seed: int, power_iterations: int) -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    omega = torch.randn(a.shape[1], width, generator=generator, dtype=torch.float64).to(a.device)
    q, _ = torch.linalg.qr(a @ omega)
    for _ in range(max(0, power_iterations)):
        z, _ = torch.linalg.qr(a.T @ q)
        q, _ = torch.linalg.qr(a @ z)
    u_small, s, vh = torch.linalg.svd(q.T @ a, full_matrices=False)
    return q @ u_small, s, vh
