"""LoRA-to-LoRA merging of one module: concat, or the truncated SVD of Σ cᵢ·ΔWᵢ.

Pure tensor math, float64. A module's contributions arrive as factor pairs
(up (out×rᵢ) with its coefficient and scale folded in, down (rᵢ×in·kh·kw)) for
LoRA/LoCon inputs, plus at most one dense matrix (out×in·kh·kw) summing the
LoHa/LoKr/diff inputs. The low-rank machinery is in :mod:`loraforge.ops.svd`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor

from loraforge.ops.certified import gamma, round_certified
from loraforge.ops.exact import dyadic_sum
from loraforge.ops.rounding import round_float64
from loraforge.ops.svd import LowRankResult, RankPolicy, dense_svd, factored_svd


@dataclass(frozen=True)
class FactorSource:
    """One factored contribution as stored: ΔW = coefficient·scale·up @ (down, or mid ⊗ down for Tucker)."""

    up: Tensor  # (out, r), float64
    down: Tensor  # (r, in·kh·kw) or, with mid, the Tucker down (r, in, 1, 1); float64
    mid: Tensor | None
    coefficient: float
    scale: float


@dataclass(frozen=True)
class ModuleTerms:
    """What lands on one module: factored pairs and an optional dense sum."""

    ups: tuple[Tensor, ...]  # (out, rᵢ), float64, coefficient·scale folded in
    downs: tuple[Tensor, ...]  # (rᵢ, in), float64
    dense: Tensor | None  # (out, in), float64, or None
    sources: tuple[FactorSource, ...] = ()  # the factored pairs as stored, for correctly rounded concat

    def materialise(self) -> Tensor:
        """The dense Σ of every term (for the dense path and for measuring errors)."""
        total = None if self.dense is None else self.dense.clone()
        for up, down in zip(self.ups, self.downs):
            total = up @ down if total is None else total.addmm_(up, down)
        assert total is not None
        return total


def tucker_down(mid: Tensor, down: Tensor) -> Tensor:
    """The (r, in·kh·kw) down factor equivalent to a LoCon Tucker core and its 1×1 down.

    ΔW[o,c,h,w] = Σ_ij up[o,i]·mid[i,j,h,w]·down[j,c], so ΔW viewed as a matrix
    is up @ M with M[i,(c,h,w)] = Σ_j mid[i,j,h,w]·down[j,c]: still rank r.
    """
    down2 = down.reshape(down.shape[0], -1)
    return torch.einsum("ijhw,jc->ichw", mid, down2).reshape(mid.shape[0], -1)


def concat(terms: ModuleTerms) -> LowRankResult:
    """Exact: the factors side by side (rank Σrᵢ), dense terms as their exact SVD at numerical rank.

    With scale 1 in the output (alpha = rank), up_cat @ down_cat = Σ cᵢ·ΔWᵢ up to
    float rounding, whatever the inputs' alphas and ranks were.
    """
    ups, downs = list(terms.ups), list(terms.downs)
    if terms.dense is not None:
        # energy 1.0 keeps every singular value above the numerical-rank tolerance.
        exact = dense_svd(terms.dense, RankPolicy(energy=1.0))
        ups.append(exact.up)
        downs.append(exact.down)
    up = torch.cat(ups, dim=1)
    down = torch.cat(downs, dim=0)
    values = torch.zeros(0, dtype=torch.float64)
    return LowRankResult(up, down, values, int(down.shape[0]), 1.0, 0.0)


def concat_rounded(terms: ModuleTerms, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(up, down) of :func:`concat` for factored terms, each element correctly rounded to ``dtype``.

    Each up element is RN(coefficient·scale·u) with the exact product of the
    three stored numbers, and each down element RN(d), or for a Tucker core
    RN(Σ_j mid·down) exactly: the bytes depend on the inputs only.
    Requires ``terms.sources`` and no dense part (that goes through an SVD).
    """
    assert terms.dense is None and len(terms.sources) == len(terms.ups)
    ups, downs = [], []
    for source in terms.sources:
        product = source.up * (source.coefficient * source.scale)
        multiplier = Fraction(source.coefficient) * Fraction(source.scale)
        ups.append(round_certified(product, product.abs().mul_(gamma(3)), dtype,
                                   lambda index, u=source.up, m=multiplier: m * Fraction(u.reshape(-1)[index].item()),
                                   zero_is_exact=True))
        if source.mid is None:
            downs.append(round_float64(source.down, dtype))
        else:
            down = tucker_down(source.mid, source.down)
            envelope = tucker_down(source.mid.abs(), source.down.abs())
            rank = source.mid.shape[1]
            element = _tucker_down_element(source.mid, source.down)
            downs.append(round_certified(down, envelope.mul_(gamma(rank + 3)), dtype, element))
    return torch.cat(ups, dim=1), torch.cat(downs, dim=0)


def _tucker_down_element(mid: Tensor, down: Tensor):
    """Flat index of tucker_down's (r, in·kh·kw) result -> its exact value."""
    down2 = down.reshape(down.shape[0], -1)
    kernel = mid.shape[2:]
    per_row = down2.shape[1] * math.prod(kernel)

    def element(index: int) -> Fraction:
        i, rest = divmod(index, per_row)
        c, k = divmod(rest, math.prod(kernel))
        position = []
        for size in reversed(kernel):
            position.append(k % size)
            k //= size
        column = mid[(i, slice(None), *position[::-1])].tolist()
        return dyadic_sum(list(zip(column, down2[:, c].tolist())))

    return element


def svd_merge(
    terms: ModuleTerms,
    policy: RankPolicy,
    *,
    dense_method: str = "exact",
    generator_seed: int = 0,
    clamp_quantile: float | None = None,
) -> LowRankResult:
    """The best rank-k approximation (Eckart–Young) of the module's Σ under ``policy``.

    Factored inputs only: :func:`factored_svd`, exact without forming the sum.
    Any dense input: the sum is materialised and goes through :func:`dense_svd`.
    """
    if terms.dense is None:
        return factored_svd(terms.ups, terms.downs, policy, clamp_quantile=clamp_quantile)
    return dense_svd(
        terms.materialise(), policy, method=dense_method, generator_seed=generator_seed, clamp_quantile=clamp_quantile
    )


def relative_error(terms: ModuleTerms, up: Tensor, down: Tensor, total_norm: float | None = None) -> float:
    """‖Σ − up@down‖_F / ‖Σ‖_F for any factors (the saved, rounded ones, say); 0 for Σ = 0.

    ``total_norm`` is ‖Σ‖_F when the caller knows it (the root of Σσ² of an
    SVD that computed every singular value), which saves its computation.

    Factored-only terms never form the (out × in) sum: Σ − up@down = X·Y with
    X = [U, −up], Y = [V; down], and ‖X·Y‖_F = ‖R_x·R_yᵀ‖_F from the QR of X
    and Yᵀ, which stays accurate for errors near float64 rounding (a Gram-matrix
    trace would cancel catastrophically there).
    """
    up, down = up.to(torch.float64), down.to(torch.float64)
    if terms.dense is None:
        x = torch.cat([*terms.ups], dim=1)
        y = torch.cat([*terms.downs], dim=0)
        total = _product_norm(x, y) if total_norm is None else total_norm
        error = _product_norm(torch.cat([x, -up], dim=1), torch.cat([y, down], dim=0))
    else:
        matrix = terms.materialise()
        total = float(torch.linalg.norm(matrix)) if total_norm is None else total_norm
        error = float(torch.linalg.norm(matrix - up @ down))
    if total <= 0.0:
        return 0.0 if error <= 0.0 else math.inf
    return error / total


def _product_norm(x: Tensor, y: Tensor) -> float:
    """‖x @ y‖_F through the triangular factors of x and yᵀ."""
    _, r_x = torch.linalg.qr(x)
    _, r_y = torch.linalg.qr(y.T)
    return float(torch.linalg.norm(r_x @ r_y.T))
