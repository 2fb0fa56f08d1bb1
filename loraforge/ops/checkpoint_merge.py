"""Checkpoint-merge math, one tensor at a time (pure: no I/O, no pools).

Linear methods (:func:`linear_combination`) return RN(exact value) in the
output dtype: the float64 sum of the terms with a rigorous bound (Higham
§3.1, as :mod:`loraforge.ops.bake`), the undecided elements recomputed
exactly with dyadic integer sums (:mod:`loraforge.ops.exact`). Non-linear
methods (:func:`ties_merge`, :func:`dare_delta`, :func:`slerp`) are IEEE
float64 in a fixed order (models in recipe order, elementwise ops; SLERP's
sums with numpy's pairwise summation, which never threads), rounded once by
the caller. Random masks come from numpy's PCG64 seeded per (recipe seed,
tensor, model) by :func:`mask_seed`. Formulas and sources:
docs/merging-checkpoints.md.
"""

from __future__ import annotations

import hashlib
import math
from fractions import Fraction
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from loraforge.ops.certified import UNIT_ROUNDOFF, gamma, round_certified
from loraforge.ops.exact import dyadic_sum
from loraforge.ops.rounding import round_float64

SLERP_DOT_THRESHOLD = 0.9995  # |cos θ| above this: linear interpolation (mergekit's threshold)

Terms = Sequence[tuple[Sequence[float], int]]  # (factors, source index)


def mask_seed(recipe_seed: int, tensor: str, model: int) -> int:
    """A 63-bit seed for one model's mask of one tensor: sha256 of the recipe seed, the name and the position."""
    digest = hashlib.sha256(f"loraforge-merge-mask\x00{int(recipe_seed)}\x00{tensor}\x00{int(model)}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# --- linear: correctly rounded ---------------------------------------------------------


def linear_combination(sources: Sequence[Tensor], terms: Terms, divisor: Sequence[float] | None, dtype: torch.dtype) -> Tensor:
    """RN(Σ_k (Π factors_k)·sources[s_k] [/ Σ divisor]) element by element, in ``dtype``.

    ``sources`` hold the stored numbers (any float dtype, one shape); each
    term's coefficient is the exact product of its float64 factors.
    """
    shape = sources[0].shape
    wide = [s.to(torch.float64).reshape(-1) for s in sources]
    total = torch.zeros(wide[0].numel() if wide else 0, dtype=torch.float64)
    envelope = torch.zeros_like(total)
    depth = 0
    for factors, source in terms:
        coefficient = math.prod(float(f) for f in factors)  # rounded: its error is in the depth
        total.add_(wide[source], alpha=coefficient)
        envelope.add_(wide[source].abs(), alpha=abs(coefficient))
        depth = max(depth, len(factors) + 1)
    depth += len(terms)
    bound = envelope.mul_(gamma(depth))
    exact_divisor = None
    if divisor is not None:
        exact_divisor = sum((Fraction(d) for d in divisor), Fraction(0))
        if exact_divisor == 0:
            raise ValueError("the weights sum to zero, so normalizing divides by zero")
        approx_divisor = float(exact_divisor)  # correctly rounded
        # |fl(Ñ/D̃) − N/D| ≤ (|Ñ − N| + 3u·|Ñ|)·(1 + u)/|D̃| (docs/merging-checkpoints.md), doubled for the slack
        bound = (bound + total.abs() * (3 * UNIT_ROUNDOFF)).mul_(2.0 * (1 + UNIT_ROUNDOFF) / abs(approx_divisor))
        total = total / approx_divisor

    def exact(index: int) -> Fraction:
        value = dyadic_sum([(*factors, wide[source][index].item()) for factors, source in terms])
        return value / exact_divisor if exact_divisor is not None else value

    # Elements whose every product has a zero factor are exactly 0 (written +0). Certification never
    # trusts a zero approximation, so leaving them in would send each to the slow exact path.
    zero = torch.ones_like(total, dtype=torch.bool)
    for factors, source in terms:
        if all(float(f) != 0 for f in factors):  # the exact coefficient is nonzero (even if its float64 product underflows)
            zero &= wide[source] == 0
    if not bool(zero.any()):
        return round_certified(total, bound, dtype, exact).reshape(shape)
    live = (~zero).nonzero().reshape(-1)
    result = torch.zeros(total.shape, dtype=dtype)
    if live.numel():
        result[live] = round_certified(total[live], bound[live], dtype, lambda i: exact(int(live[i])))
    return result.reshape(shape)


# --- non-linear: fixed-order float64 -----------------------------------------------------


def trim_top(delta: Tensor, density: float) -> Tensor:
    """``delta`` with all but its ⌊density·n⌋ largest magnitudes zeroed (ties: the lower flat index wins)."""
    flat = delta.reshape(-1)
    keep = math.floor(Fraction(density) * flat.numel())
    if keep >= flat.numel():
        return delta.clone()
    order = torch.sort(flat.abs(), descending=True, stable=True).indices[:keep]
    trimmed = torch.zeros_like(flat)
    trimmed[order] = flat[order]
    return trimmed.reshape(delta.shape)


def bernoulli_mask(shape: Sequence[int], density: float, seed: int) -> Tensor:
    """Keep each element with probability ``density``: PCG64(seed) uniforms in [0, 1) below density."""
    count = math.prod(shape)
    uniforms = np.random.Generator(np.random.PCG64(seed)).random(count)
    return torch.from_numpy(uniforms < density).reshape(tuple(shape))


def dare_delta(delta: Tensor, density: float, seed: int) -> Tensor:
    """DARE: drop each element with probability 1 − density, divide the kept ones by density."""
    mask = bernoulli_mask(delta.shape, density, seed)
    return torch.where(mask, delta / density, torch.zeros_like(delta))


def weighted_delta_sum(base: Tensor, deltas: Sequence[Tensor], weights: Sequence[float], scale: float) -> Tensor:
    """base + scale·Σ wᵢ·δᵢ, accumulated in model order."""
    total = torch.zeros_like(base)
    for delta, weight in zip(deltas, weights):
        total = total + weight * delta
    return base + scale * total


def ties_merge(base: Tensor, deltas: Sequence[Tensor], weights: Sequence[float], scale: float, normalize: bool) -> Tensor:
    """Sign election by total mass (γ = +1 where Σ wᵢδᵢ ≥ 0) and the (weighted, disjoint) mean of the agreeing deltas."""
    weighted = [weight * delta for delta, weight in zip(deltas, weights)]
    mass = torch.zeros_like(base)
    for term in weighted:
        mass = mass + term
    elected = torch.where(mass >= 0, 1.0, -1.0).to(base.dtype)
    mixed = torch.zeros_like(base)
    divisor = torch.zeros_like(base)
    for term, weight in zip(weighted, weights):
        agree = torch.sign(term) == elected
        mixed = mixed + torch.where(agree, term, torch.zeros_like(term))
        divisor = divisor + torch.where(agree, torch.full_like(term, weight), torch.zeros_like(term))
    if normalize:
        mixed = mixed / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return base + scale * mixed


def magprune_delta(delta: Tensor, density: float, epsilon: float, seed: int) -> Tensor:
    """DELLA's MagPrune: per row (first axis; a vector is one row), rank the magnitudes ascending (ties: lower
    index first), keep the element of rank r of n with probability p = (density − ε) + 2ε·r/(n − 1), divide the
    kept ones by p."""
    rows = delta.reshape(delta.shape[0], -1) if delta.dim() > 1 else delta.reshape(1, -1)
    count = rows.shape[1]
    order = torch.sort(rows.abs(), dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(count).expand_as(order).contiguous())
    if count > 1:
        keep = (density - epsilon) + (2 * epsilon) * (ranks.to(torch.float64) / (count - 1))
    else:
        keep = torch.full(rows.shape, float(density), dtype=torch.float64)
    uniforms = torch.from_numpy(np.random.Generator(np.random.PCG64(seed)).random(rows.numel())).reshape(rows.shape)
    kept = torch.where(uniforms < keep, rows / keep, torch.zeros_like(rows))
    return kept.reshape(delta.shape)


def model_stock(base: Tensor, models: Sequence[Tensor]) -> Tensor:
    """Model Stock: t = N·cos θ / (1 + (N − 1)·cos θ) with cos θ the mean pairwise cosine of the task vectors
    (flattened; norms' product at least 1e-6; each cosine clamped to [−1, 1]); W = t·mean(Wᵢ) + (1 − t)·base.
    A zero denominator gives t = 0 (the base)."""
    deltas = [(model - base).reshape(-1) for model in models]
    norms = [math.sqrt(_pairwise_sum(d * d)) for d in deltas]
    cosines = []
    for i in range(len(deltas)):
        for j in range(i + 1, len(deltas)):
            cosine = _pairwise_sum(deltas[i] * deltas[j]) / max(norms[i] * norms[j], 1e-6)
            cosines.append(min(1.0, max(-1.0, cosine)))
    count = len(models)
    cosine = sum(cosines) / len(cosines)
    denominator = 1 + (count - 1) * cosine
    t = count * cosine / denominator if denominator != 0 else 0.0
    mean = torch.zeros_like(base)
    for model in models:
        mean = mean + model
    mean = mean / count
    return t * mean + (1 - t) * base


def train_difference(a: Tensor, b: Tensor, c: Tensor, alpha: float) -> Tensor:
    """SuperMerger's train difference: A + α·1.8·sign(B − C)·|B − C|·|B − A| / (|B − C| + |B − A|) (0 where both are 0)."""
    difference = b - c
    distance_bc = difference.abs()
    distance_ba = (b - a).abs()
    total = distance_bc + distance_ba
    scale = torch.where(total != 0, distance_ba / torch.where(total != 0, total, torch.ones_like(total)), torch.zeros_like(total))
    delta = (torch.sign(difference) * scale) * distance_bc * 1.8
    return a + alpha * delta


def _pairwise_sum(values: Tensor) -> float:
    return float(np.sum(values.cpu().numpy()))  # numpy's pairwise summation: one fixed order, one thread


def slerp(a: Tensor, b: Tensor, t: float) -> Tensor:
    """Spherical interpolation of the flattened tensors (angle from their normalised copies)."""
    norm_a = math.sqrt(_pairwise_sum(a * a))
    norm_b = math.sqrt(_pairwise_sum(b * b))
    if norm_a == 0.0 or norm_b == 0.0:
        return (1 - t) * a + t * b
    cosine = _pairwise_sum((a / norm_a) * (b / norm_b))
    if abs(cosine) > SLERP_DOT_THRESHOLD:
        return (1 - t) * a + t * b
    theta = math.acos(cosine)
    sine = math.sin(theta)
    return (math.sin((1 - t) * theta) / sine) * a + (math.sin(t * theta) / sine) * b


def rounded(values: Tensor, dtype: torch.dtype) -> Tensor:
    """A non-linear method's float64 result, rounded once to ``dtype``."""
    return round_float64(values, dtype)
