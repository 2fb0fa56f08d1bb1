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
from concurrent.futures import Executor
from fractions import Fraction
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from loraforge.ops.certified import UNIT_ROUNDOFF, _neighbours, certifiable, certify, exact_round, gamma
from loraforge.ops.exact import dyadic_sum
from loraforge.ops.rounding import round_float64

SLERP_DOT_THRESHOLD = 0.9995  # |cos θ| above this: linear interpolation (mergekit's threshold)

Terms = Sequence[tuple[Sequence[float], int]]  # (factors, source index)


def mask_seed(recipe_seed: int, tensor: str, model: int) -> int:
    """A 63-bit seed for one model's mask of one tensor: sha256 of the recipe seed, the name and the position."""
    digest = hashlib.sha256(f"loraforge-merge-mask\x00{int(recipe_seed)}\x00{tensor}\x00{int(model)}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# --- linear: correctly rounded ---------------------------------------------------------


LINEAR_CHUNK = 1 << 18  # elements computed at once: each float64 work array 2 MiB (about 60 MiB of them per thread)


def linear_combination(
    sources: Sequence[Tensor], terms: Terms, divisor: Sequence[float] | None, dtype: torch.dtype, pool: Executor | None = None
) -> Tensor:
    """RN(Σ_k (Π factors_k)·sources[s_k] [/ Σ divisor]) element by element, in ``dtype``.

    ``sources`` hold the stored numbers (any float dtype, one shape); each
    term's coefficient is the exact product of its float64 factors. Computed
    in chunks of LINEAR_CHUNK elements, side by side on ``pool``'s threads
    when given (elementwise, so the bytes depend neither on the chunking nor
    on the threads).
    """
    shape = sources[0].shape
    flat = [s.reshape(-1) for s in sources]
    count = flat[0].numel()
    if count <= LINEAR_CHUNK:
        return _linear_chunk(flat, terms, divisor, dtype).reshape(shape)
    out = torch.empty(count, dtype=dtype)

    def chunk(start: int) -> None:
        out[start:start + LINEAR_CHUNK] = _linear_chunk([f[start:start + LINEAR_CHUNK] for f in flat], terms, divisor, dtype)

    in_chunks(chunk, count, LINEAR_CHUNK, pool)
    return out.reshape(shape)


def in_chunks(work, count: int, size: int, pool: Executor | None) -> None:
    """``work(start)`` for each chunk start in range(0, count, size): on ``pool`` when given, else in order."""
    starts = range(0, count, size)
    if pool is None or len(starts) == 1:
        for start in starts:
            work(start)
    else:
        for _ in pool.map(work, starts):  # re-raises a worker's error here
            pass


def _linear_chunk(sources: Sequence[Tensor], terms: Terms, divisor: Sequence[float] | None, dtype: torch.dtype) -> Tensor:
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

    if not certifiable(dtype):
        return round_float64(total, dtype).reshape(shape)
    rounded, sure = _certified(total, bound, dtype)
    todo = (~sure).nonzero().reshape(-1)  # the rest is decided; only these need a closer look
    if todo.numel():
        # Elements whose every product has a zero factor are exactly 0 (written +0): certification never
        # trusts a zero approximation (so they are all here), and they would all take the exact path.
        zero = torch.ones_like(todo, dtype=torch.bool)
        for factors, source in terms:
            if all(float(f) != 0 for f in factors):  # the exact coefficient is nonzero (even if its float64 product underflows)
                zero &= wide[source][todo] == 0
        rounded[todo[zero]] = 0
        todo = todo[~zero & total[todo].isfinite()]
    if todo.numel():
        # Dyadic weights (0.5, 0.25) often give a float64 sum that is the exact value, and that value
        # often lies exactly on a rounding midpoint (about 20 % of elements for 0.5·a + 0.25·b): where
        # the sum provably held the exact value, RN of it is the answer, ties included.
        held, value = _exact_in_float64(sources, [w[todo] for w in wide], terms, exact_divisor)
        if held is not None and bool(held.any()):
            rounded[todo[held]] = round_float64(value[held], dtype)
            todo = todo[~held]
    if todo.numel():
        # Decimal weights (0.3, 0.2) times short float16 numbers often land within 1e-17 of a rounding
        # midpoint (about 4 % of elements): decide those with exact float64 expansions, vectorized, and
        # leave only what that cannot decide to Fractions.
        chosen, decided = _round_by_expansion(rounded[todo], bound[todo], [w[todo] for w in wide], terms, exact_divisor)
        rounded[todo[decided]] = chosen[decided].to(dtype)
        for index in todo[~decided].tolist():
            rounded[index] = exact_round(exact(index), dtype)
    return rounded.reshape(shape)


_SIGNIFICANT_BITS = {torch.float16: 11, torch.bfloat16: 8, torch.float32: 24, torch.float64: 53}
_SMALLEST_NORMAL = 2.0**-1022


def _significant_bits(value: float) -> int:
    """Bits from the leading to the last nonzero one of a finite float64."""
    numerator, denominator = abs(value).as_integer_ratio()  # denominator a power of two
    return (numerator.bit_length() - ((numerator & -numerator).bit_length() - 1)) if numerator else 0


def _exact_in_float64(sources: Sequence[Tensor], wide: Sequence[Tensor], terms: Terms, divisor: Fraction | None):
    """(mask, value): where float64 arithmetic provably holds the exact value (then ``value`` is it), or
    (None, None) when the terms cannot give exact products.

    Each product coefficient·x is exact when the coefficient is its exact factors' product, its
    significant bits and the source format's add up to at most 53 and the product is normal or zero;
    each sum is exact where TwoSum's error term is zero; dividing by a power of two is exact unless
    the quotient is subnormal."""
    coefficients = []
    for factors, source in terms:
        exact = math.prod((Fraction(f) for f in factors), start=Fraction(1))
        coefficient = float(exact)
        bits = _SIGNIFICANT_BITS.get(sources[source].dtype)
        if Fraction(coefficient) != exact or bits is None or _significant_bits(coefficient) + bits > 53:
            return None, None
        coefficients.append((coefficient, source))
    scale = None
    if divisor is not None:
        if divisor == 0 or any(part & (part - 1) for part in (abs(divisor.numerator), divisor.denominator)):
            return None, None
        scale = float(1 / divisor)  # a power of two: exact unless out of range
        if Fraction(scale) != 1 / divisor:
            return None, None
    total = torch.zeros_like(wide[0])
    held = torch.ones_like(total, dtype=torch.bool)
    for coefficient, source in coefficients:
        product = wide[source] * coefficient
        if coefficient != 0:
            held &= (product.abs() >= _SMALLEST_NORMAL) | (wide[source] == 0)
        step = total + product  # TwoSum (Knuth): step + error == total + product exactly
        back = step - total
        held &= ((total - (step - back)) + (product - back)) == 0
        total = step
    if scale is not None:
        quotient = total * scale
        held &= (quotient.abs() >= _SMALLEST_NORMAL) | (total == 0)
        total = quotient
    held &= total.isfinite()
    return held, total


DISTILL_PASSES = 4  # error-free TwoSum passes deciding which side of a midpoint an exact value lies

_DROPPED_BITS = {torch.float16: 13, torch.bfloat16: 16}  # float32 mantissa bits below the format's last one


def _certified(total: Tensor, bound: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """certify() (RN(total) and the certain elements), checking only the candidates that need it.

    float16/bfloat16 (ops/bake.py's _block_candidates argument): round through float32; an element
    whose float32 image is two or more float32 steps from every midpoint of the format is at least
    2^-24·|y| from it, farther than its bound when |y| > 2^25·bound, so only the elements within one
    step of a midpoint, those at or below 2^25·bound and those near overflow are certified one by one.
    """
    if dtype not in _DROPPED_BITS:
        return certify(total, bound, dtype)
    single = total.to(torch.float32)
    rounded = single.to(dtype)
    magnitude = single.view(torch.int32) & 0x7FFFFFFF
    window = (1 << (_DROPPED_BITS[dtype] - 1)) - 1
    check = ((magnitude + 1) & window) <= 2
    check |= ~(total.abs() > bound * 2.0**25)  # small, zero or NaN
    check |= ~(single.abs() < torch.finfo(dtype).max)  # at or past the largest finite number
    sure = torch.ones_like(total, dtype=torch.bool)
    candidates = check.nonzero().reshape(-1)
    if candidates.numel():
        rounded[candidates], sure[candidates] = certify(total[candidates], bound[candidates], dtype)
    return rounded, sure


def _expansion(value: Fraction, limit: int = 8) -> list[float] | None:
    """``value`` as a sum of float64 numbers, each of at most 26 significant bits (None if it needs more than ``limit``)."""
    pieces, rest = [], value
    while rest != 0:
        if len(pieces) >= limit:
            return None
        head = float(rest)
        pieces += _split(head)
        rest -= Fraction(head)
    return pieces


def _split(value: float) -> list[float]:
    """Veltkamp's split: value = high + low exactly, each of at most 26 significant bits."""
    scaled = value * 134217729.0  # 2^27 + 1
    high = scaled - (scaled - value)
    return [high, value - high] if value - high else [high]


def _split_tensor(values: Tensor) -> list[Tensor]:
    scaled = values * 134217729.0
    high = scaled - (scaled - values)
    return [high, values - high]


def _round_by_expansion(candidate: Tensor, bound: Tensor, sources: list[Tensor], terms: Terms, divisor: Fraction | None) -> tuple[Tensor, Tensor]:
    """(RN(exact value) as float64, mask of the elements it decided), from ``candidate`` = RN(approximation).

    The exact value's side of each midpoint around the candidate is the sign of Σ (exact float64
    products) − midpoint·divisor, found with an error-free TwoSum chain and a rigorous bound on the
    rounding of its error term. Strictly between both: the candidate. Beyond one of them while the
    approximation's bound is under a quarter of that gap (so the exact value cannot reach the next
    midpoint): that neighbour. Exactly on a midpoint (the sum and every error term zero): the neighbour with
    an even last bit. Anything else (a zero, overflow, near underflow) is left undecided."""
    below, above = _neighbours(candidate)
    value = candidate.to(torch.float64)
    low_mid, high_mid = (value + below) / 2, (value + above) / 2  # exact in float64
    coefficients = [_expansion(math.prod((Fraction(f) for f in factors), start=Fraction(1))) for factors, _ in terms]
    denominator = _expansion(divisor if divisor is not None else Fraction(1))
    if denominator is None or any(c is None for c in coefficients):
        return torch.zeros_like(value, dtype=torch.bool)
    flip = -1.0 if (divisor is not None and divisor < 0) else 1.0  # N/D > m  <=>  sign(D)·(N − m·D) > 0
    products = []
    for pieces, (_, source) in zip(coefficients, terms):
        stored = sources[source]
        halves = [stored] if _short(stored) else _split_tensor(stored)
        products += [(flip * piece) * half for piece in pieces for half in halves]  # each exact: <= 26 x 27 bits

    def sign_against(midpoint: Tensor) -> Tensor:
        finite = midpoint.isfinite()
        midpoint = torch.where(finite, midpoint, torch.zeros_like(midpoint))
        parts = products + [(-flip * piece) * midpoint for piece in denominator]  # midpoint: <= 25 bits
        tiny = torch.zeros_like(midpoint, dtype=torch.bool)
        for product in parts:
            tiny |= (product != 0) & (product.abs() < 2.0**-960)  # near underflow: products may be inexact
        # Distillation (Ogita, Rump & Oishi's VecSum): each pass replaces the parts by TwoSum's error terms
        # and their float sum, last; the exact sum never changes. Where the last part outweighs all the
        # others (their magnitudes summed with a rounding margin), its sign is the exact sum's. Decimal
        # weights put exact values within 1e-19 of a midpoint after heavy cancellation; one pass leaves
        # those undecided, a few more decide them.
        sign = torch.zeros_like(midpoint)
        decided = torch.zeros_like(midpoint, dtype=torch.bool)
        margin = 1 + gamma(len(parts) + 2)
        for _ in range(DISTILL_PASSES):
            for i in range(1, len(parts)):
                low, high = parts[i - 1], parts[i]
                step = low + high  # TwoSum (Knuth): step + err == low + high exactly
                back = step - low
                parts[i - 1], parts[i] = (low - (step - back)) + (high - back), step
            head, rest = parts[-1], torch.zeros_like(midpoint)
            for part in parts[:-1]:
                rest = rest + part.abs()
            sure = (head.abs() > rest * margin) & ~decided
            sign = torch.where(sure, torch.sign(head), sign)
            decided |= sure
            if bool(decided.all()):
                break
        # every part zero: the exact value is the midpoint itself
        on = torch.ones_like(decided)
        for part in parts:
            on &= part == 0
        on &= ~tiny & finite
        sign[tiny | ~finite] = 0.0  # undecided
        return sign, finite, on

    above_low, low_finite, on_low = sign_against(low_mid)
    below_high, high_finite, on_high = sign_against(high_mid)
    # a midpoint at infinity (next to the overflow threshold) is no boundary on that side
    inside = (above_low > 0) & (below_high < 0) & (value != 0)  # a zero's sign is the exact value's: undecided
    up = (below_high > 0) & (bound < (above - value) / 4) & (above != 0)
    down = (above_low < 0) & (bound < (value - below) / 4) & (below != 0)
    # exactly on a midpoint: ties to even (neighbours of one sign alternate in the last bit)
    even = (candidate.view(torch.int16 if candidate.element_size() == 2 else torch.int32) & 1) == 0
    tie_low = on_low & (value != 0) & (below != 0)
    tie_high = on_high & (value != 0) & (above != 0) & ~tie_low
    up = up | (tie_high & ~even)
    down = down | (tie_low & ~even)
    finite = low_finite & high_finite & value.isfinite()
    chosen = torch.where(up, above, torch.where(down, below, value))
    return chosen, (inside | up | down | tie_low | tie_high) & finite


def _short(values: Tensor) -> bool:
    """Stored numbers of at most 27 significant bits (everything but float64 inputs)."""
    return bool((values.to(torch.float32).to(torch.float64) == values).all())


# --- non-linear: fixed-order float64 -----------------------------------------------------


def trim_top(delta: Tensor, density: float) -> Tensor:
    """``delta`` with all but its ⌊density·n⌋ largest magnitudes zeroed (ties: the lower flat index wins)."""
    flat = delta.reshape(-1)
    kept = trim_mask(flat, density)
    return torch.where(kept, flat, torch.zeros_like(flat)).reshape(delta.shape)


def trim_mask(delta: Tensor, density: float) -> Tensor:
    """The elements :func:`trim_top` keeps (flat bool mask): the ⌊density·n⌋ largest magnitudes, ties by lower index.

    The set a stable descending sort of the magnitudes would take first, found in linear time: every
    magnitude above the ⌊density·n⌋-th largest (a selection), then as many of those equal to it as are
    still missing, lowest flat index first. NaNs (which the sort puts first) take the sort.
    """
    flat = delta.reshape(-1)
    return _top_mask(lambda: flat.abs(), flat.numel(), density)


def _top_mask(magnitudes, count: int, density: float) -> Tensor:
    """``magnitudes()``: a fresh float64 array of the |task vector| (called twice: the selection reorders the first)."""
    keep = math.floor(Fraction(density) * count)
    if keep >= count:
        return torch.ones(count, dtype=torch.bool)
    if keep == 0:
        return torch.zeros(count, dtype=torch.bool)
    values = magnitudes()
    if bool(values.isnan().any()):
        kept = torch.zeros(count, dtype=torch.bool)
        kept[torch.sort(values, descending=True, stable=True).indices[:keep]] = True
        return kept
    selected = values.numpy()
    selected.partition(count - keep)  # in place (no copy, unlike kthvalue): the keep-th largest at count - keep
    threshold = float(selected[count - keep])
    del values, selected
    values = magnitudes()
    kept = values > threshold
    missing = keep - int(kept.sum())
    if missing:
        kept[(values == threshold).nonzero().reshape(-1)[:missing]] = True
    return kept


def bernoulli_mask(shape: Sequence[int], density: float, seed: int, start: int = 0) -> Tensor:
    """Keep each element with probability ``density``: PCG64(seed) uniforms in [0, 1) below density.

    ``start``: the mask of elements start, start+1, ... of the flattened tensor (``shape`` is the part's):
    each uniform takes one 64-bit draw, so advancing the generator by ``start`` draws gives the same
    numbers as drawing the whole tensor's and slicing them (a chunked merge has the same masks)."""
    count = math.prod(shape)
    generator = np.random.PCG64(seed)
    if start:
        generator.advance(start)
    uniforms = np.random.Generator(generator).random(count)
    return torch.from_numpy(uniforms < density).reshape(tuple(shape))


def dare_delta(delta: Tensor, density: float, seed: int, start: int = 0) -> Tensor:
    """DARE: drop each element with probability 1 − density, divide the kept ones by density."""
    mask = bernoulli_mask(delta.shape, density, seed, start)
    return torch.where(mask, delta / density, torch.zeros_like(delta))


def top_magnitudes(models: Sequence[Tensor], base: Tensor, density: float, pool: Executor | None = None) -> list[Tensor]:
    """TIES' trim of each model's task vector as a flat bool mask (:func:`trim_mask` of model − base).

    Takes the stored tensors; one float64 magnitude array per model at a time on each thread (selected in
    place, then computed again for the mask), so a chunked merge never holds every model's float64 delta."""
    flat_base = base.reshape(-1)

    def mask(model: Tensor) -> Tensor:
        flat = model.reshape(-1)
        # exact upcasts, one rounding: the same numbers as (model − base) in float64
        return _top_mask(lambda: flat.to(torch.float64).sub_(flat_base).abs_(), flat.numel(), density)

    return list(pool.map(mask, models)) if pool is not None else [mask(m) for m in models]


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
