"""Baking: W' = RN(W + Σ_i c_i·ΔW_i), the exact sum rounded once to the save dtype.

Pure tensor math. Each output element is the correctly rounded value of the
exact real sum of the stored numbers (base element, factors, and each
term's float64 coefficient and scale), so the bytes do not depend on the
BLAS, its code path, the thread count or the device. The sum is computed
fast in float64 (any summation order) together with a rigorous error bound,
and the few elements whose rounding the bound cannot decide are recomputed
exactly (:mod:`loraforge.ops.certified`, :mod:`loraforge.ops.exact`).

Plain LoRA/LoCon terms arrive as factors and are added with one in-place
``addmm_`` per row slice (their factors concatenated along the rank axis):
no dense delta is ever allocated for them, which keeps the bake close to the
speed of a plain copy. Their error envelope Σ_k|c·u_ik·d_kj| is bounded by
Cauchy–Schwarz, ‖c·u_i‖₂·‖d_j‖₂, an outer product of norms that costs no
second GEMM. Other kinds arrive as dense deltas with their own envelope.

A CPU weight whose terms are all low-rank is baked in blocks of rows
(:func:`_bake_low_rank_in_blocks`): widen the block to float64, add every
term's GEMM restricted to those rows, round the block, next block. The
float64 block stays in cache across the passes instead of streaming a
float64 copy of the whole weight through memory three times. For float16
and bfloat16 outputs only the elements whose float32 image lies within one
float32 step of a rounding midpoint (about 1 in 1400) get their individual
bound checked: every other element is farther from a boundary than any
float64 error bound can reach (see :func:`_block_candidates`).
"""

from __future__ import annotations

import functools
import math
from concurrent.futures import Executor
from dataclasses import dataclass
from fractions import Fraction
from itertools import groupby
from typing import Callable, Iterable, Union

import numpy as np
import torch
from torch import Tensor

from loraforge.ops import fp8
from loraforge.ops.certified import certifiable, certify, exact_round, gamma
from loraforge.ops.exact import dyadic_sum
from loraforge.ops.rounding import round_float64


@dataclass(frozen=True)
class DenseTerm:
    """A dense delta landing on a weight or on a row slice of it.

    ``delta`` is the float64 evaluation of ΔW (scale included). When it was
    computed from factors, ``envelope`` is the same formula on absolute values,
    ``depth`` the number of roundings along any product (Higham's n), and
    ``exact`` gives the exact ΔW element at a flat index of ``delta``. With no
    ``exact``, ``delta`` itself is the term's exact value (stored differences,
    biases, and DoRA, whose float64 evaluation is taken as given).
    """

    coefficient: float
    delta: Tensor  # float64, the shape of the weight or of its row slice
    rows: tuple[int, int] | None = None
    envelope: Tensor | None = None
    depth: int = 0
    exact: Callable[[int], Fraction] | None = None


@dataclass(frozen=True)
class LowRankTerm:
    """coefficient·scale·(up @ down) landing on a weight (or row slice) viewed as (out, in*kh*kw)."""

    up: Tensor  # float64 (out, r), as stored
    down: Tensor  # float64 (r, in*kh*kw), as stored
    rows: tuple[int, int] | None = None
    coefficient: float = 1.0
    scale: float = 1.0

    @functools.cached_property
    def scaled_up(self) -> Tensor:
        """up·(coefficient·scale) in float64: what the GEMM multiplies (its rounding is in the bound)."""
        return self.up * (self.coefficient * self.scale)

    def exact(self, row: int, column: int) -> Fraction:
        """The term's exact value at (row, column) of its slice."""
        products = list(zip(self.up[row].tolist(), self.down[:, column].tolist()))
        return Fraction(self.coefficient) * Fraction(self.scale) * dyadic_sum(products)


Term = Union[DenseTerm, LowRankTerm]


def swap_halves(term: Term, rows: int) -> tuple[Term, Term]:
    """A term on a whole tensor of ``rows`` rows whose ΔW [a; b] lands as [b; a], as two row-slice terms.

    Flux: diffusers' ``norm_out.linear`` is BFL's ``final_layer.adaLN_modulation.1``
    with scale and shift swapped. Each half keeps its exact values, so the bake stays correctly rounded.
    """
    if term.rows is not None or rows % 2:
        raise ValueError("swap_halves needs a term on a whole tensor with an even number of rows")
    half = rows // 2
    if isinstance(term, LowRankTerm):
        return (
            LowRankTerm(term.up[half:], term.down, (0, half), term.coefficient, term.scale),
            LowRankTerm(term.up[:half], term.down, (half, rows), term.coefficient, term.scale),
        )
    width = term.delta[0].numel() if term.delta.dim() > 1 else 1

    def part(first: int, stop: int, target: tuple[int, int]) -> DenseTerm:
        exact = term.exact
        shifted = None if exact is None else (lambda index, _offset=first * width: exact(index + _offset))
        envelope = None if term.envelope is None else term.envelope[first:stop]
        return DenseTerm(term.coefficient, term.delta[first:stop], target, envelope, term.depth, shifted)

    return part(half, rows, (0, half)), part(0, half, (half, rows))


def bake_weight(
    weight: Tensor,
    terms: Iterable[Term],
    out_dtype: torch.dtype,
    workspace: Tensor | None = None,
    pool: Executor | None = None,
    workers: int = 1,
) -> Tensor:
    """The baked weight in ``out_dtype``: the exact sum, correctly rounded once.

    ``workspace`` (float64, at least ``weight.numel()`` elements, same device)
    is reused for the float64 copy so large tensors do not page-fault fresh
    memory for every weight. ``pool`` (with ``workers`` threads) may bake row
    blocks side by side; the bytes do not depend on it. float64 outputs cannot be certified from a
    float64 sum; they get the float64 sum itself (docs/reproducibility.md).
    """
    terms = list(terms)
    if weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        weight = weight.to(torch.float32)  # exact; torch has no min/max or GEMM for float8
    if _blockable(weight, terms, out_dtype):
        return _bake_low_rank_in_blocks(weight, terms, out_dtype, workspace, pool if workers > 1 else None, workers)
    baked, matrix, envelope, depth = _float64_sum(weight, terms, workspace)
    if not certifiable(out_dtype):
        return round_float64(baked, out_dtype)
    rounded, sure = certify(matrix, envelope.mul_(gamma(depth)), out_dtype)
    unsure = (~sure).nonzero().tolist()
    if unsure:
        _round_exactly(rounded, unsure, weight.reshape(matrix.shape), terms, out_dtype)
    return rounded.view(weight.shape)


def _float64_sum(weight: Tensor, terms: list[Term], workspace: Tensor | None) -> tuple[Tensor, Tensor, Tensor, int]:
    """(sum, its matrix view, the envelope Σ|each term|, rounding depth): the fast float64 evaluation of the bake
    and what its error bound is made of (bound = envelope x gamma(depth))."""
    baked = _float64_copy(weight, workspace)
    matrix = baked.view(baked.shape[0], -1) if baked.dim() > 0 else baked.view(1, 1)
    envelope = matrix.abs()
    depth = 2
    for is_low_rank, run in groupby(terms, key=lambda term: isinstance(term, LowRankTerm)):
        if is_low_rank:
            for rows, up, down, _ in _gemm_groups(list(run)):
                _slice(matrix, rows).addmm_(up, down)
                _slice(envelope, rows).addr_(_row_norms(up), _column_norms(down))
                depth += up.shape[1] + 3
        else:
            for term in run:
                target, bound = _slice(matrix, term.rows), _slice(envelope, term.rows)
                target.add_(term.delta.reshape(target.shape), alpha=term.coefficient)
                magnitude = term.envelope if term.envelope is not None else term.delta.abs()
                bound.add_(magnitude.reshape(bound.shape), alpha=abs(term.coefficient))
                depth += term.depth + 3
    return baked, matrix, envelope, depth


def _round_exactly(rounded: Tensor, positions: list, weight: Tensor, terms: list[Term], out_dtype: torch.dtype) -> None:
    """Write RN(exact value) at each (row, column) of ``rounded`` (the matrix view of the weight)."""
    values = []
    for row, column in positions:
        base = weight[row, column].item()
        if not math.isfinite(base):  # inf/NaN in the base: IEEE's result (inf + finite, NaN) is the only one
            values.append(rounded[row, column].item())
            continue
        total = _exact_total(weight, terms, row, column)
        values.append(base if total == 0 and base == 0 else exact_round(total, out_dtype))
    index = torch.tensor(positions, dtype=torch.long, device=rounded.device)
    rounded[index[:, 0], index[:, 1]] = torch.tensor(values, dtype=torch.float64, device=rounded.device).to(out_dtype)


def _exact_total(weight: Tensor, terms: list[Term], row: int, column: int) -> Fraction:
    """The exact value of W + Σ c·ΔW at (row, column) of the matrix view (a finite base element)."""
    width = weight.shape[1]
    total = Fraction(weight[row, column].item())
    for term in terms:
        first, stop = term.rows if term.rows is not None else (0, weight.shape[0])
        if not first <= row < stop:
            continue
        if isinstance(term, LowRankTerm):
            total += term.exact(row - first, column)
        else:
            local = (row - first) * width + column
            delta = term.exact(local) if term.exact is not None else Fraction(term.delta.reshape(-1)[local].item())
            total += Fraction(term.coefficient) * delta
    return total


def bake_weight_scaled_fp8(
    weight: Tensor,
    terms: Iterable[Term],
    scale: float,
    workspace: Tensor | None = None,
) -> tuple[Tensor, float]:
    """(stored F8_E4M3 weight, its scale) for a baked scaled-fp8 weight: RN_E4M3((W + Σ c·ΔW) / s'), rounded once.

    ``weight`` is the dequantised weight in float64 (:func:`loraforge.ops.fp8.dequantised`), ``scale`` the base's.
    The bake is evaluated in float64 with its error bound, as for any save dtype. s' is the base's scale when the
    largest exact |W + Σ| fits under 448 x scale, else the least float32 >= that maximum / 448: the maximum is
    taken exactly, over the few elements the bound cannot rule out, so the choice is a function of the inputs
    only. Then each element is rounded to the E4M3 grid from the float64 quotient, and those whose bound reaches an
    E4M3 midpoint (or whose sign the bound leaves open) from their exact rational value. Never saturates.
    """
    terms = list(terms)
    _, matrix, envelope, depth = _float64_sum(weight, terms, workspace)
    bound = envelope.mul_(gamma(depth))
    base = weight.reshape(matrix.shape)
    out_scale = _output_scale(matrix, bound, base, terms, scale)
    inverse = 1.0 / out_scale
    stored = torch.empty(matrix.shape, dtype=torch.float8_e4m3fn, device=matrix.device)
    unsure: list[int] = []
    step = max(1, SCALED_CHUNK_ELEMENTS // max(1, matrix.shape[1]))
    for first in range(0, matrix.shape[0], step):
        last = min(matrix.shape[0], first + step)
        quotient = matrix[first:last] / out_scale
        slack = bound[first:last] * (inverse * (1 + 2.0**-50)) + quotient.abs() * 2.0**-52
        rounded, sure = fp8.round_e4m3(quotient, slack)
        stored[first:last] = fp8.to_e4m3(rounded)
        unsure.extend((first * matrix.shape[1] + (~sure & torch.isfinite(quotient)).view(-1).nonzero().view(-1)).tolist())
    for index in unsure:
        row, column = divmod(index, matrix.shape[1])
        value = base[row, column].item()
        total = _exact_total(base, terms, row, column)
        exact = value / out_scale if total == 0 and value == 0 else fp8.exact_e4m3(total / Fraction(out_scale))
        stored[row, column] = torch.tensor(exact, dtype=torch.float32).to(torch.float8_e4m3fn)
    return stored.view(weight.shape), out_scale


# Rows per pass of the requantising loop: about this many elements, so its float64 temporaries stay small.
SCALED_CHUNK_ELEMENTS = 1 << 19


def _output_scale(matrix: Tensor, bound: Tensor, base: Tensor, terms: list[Term], scale: float) -> float:
    """s' from the exact max |W + Σ| (see bake_weight_scaled_fp8): only elements within their bound of the
    largest approximation can hold the maximum; their exact values decide it."""
    lowest = -math.inf
    step = max(1, SCALED_CHUNK_ELEMENTS // max(1, matrix.shape[1]))
    for first in range(0, matrix.shape[0], step):
        low = matrix[first:first + step].abs() - bound[first:first + step]
        low = low[torch.isfinite(low)]
        if low.numel():
            lowest = max(lowest, float(low.max()))
    if lowest == -math.inf:
        return scale  # nothing finite: nothing to fit
    candidates = []
    for first in range(0, matrix.shape[0], step):
        high = matrix[first:first + step].abs() + bound[first:first + step]
        found = (high >= lowest).nonzero()
        candidates.extend((first + int(r), int(c)) for r, c in found.tolist())
    largest = max((abs(_exact_total(base, terms, r, c)) for r, c in candidates if math.isfinite(base[r, c].item())),
                  default=Fraction(0))
    return fp8.output_scale(largest, scale)


def _gemm_groups(terms: list[LowRankTerm]) -> list[tuple[tuple[int, int] | None, Tensor, Tensor, list[LowRankTerm]]]:
    """(rows, up, down, terms) per run of consecutive same-row terms, scaled factors concatenated along the rank."""
    groups = []
    for rows, group in groupby(terms, key=lambda term: term.rows):
        group = list(group)
        up = group[0].scaled_up if len(group) == 1 else torch.cat([t.scaled_up for t in group], dim=1)
        down = group[0].down if len(group) == 1 else torch.cat([t.down for t in group], dim=0)
        groups.append((rows, up, down, group))
    return groups


def _row_norms(up: Tensor) -> Tensor:
    return torch.linalg.vector_norm(up, dim=1)


def _column_norms(down: Tensor) -> Tensor:
    return torch.linalg.vector_norm(down, dim=0)


# Elements per row block: 4 MiB of float64, which stays in this CPU's cache
# while it is widened, accumulated and rounded; much smaller blocks lose to
# per-call overhead and to re-reading each term's down factor.
BLOCK_ELEMENTS = 1 << 19
# Blocks start at multiples of this many rows. Certification makes the bytes
# independent of how rows are tiled; the alignment is kept because it keeps
# each block's float64 sums equal to the whole-matrix GEMM's, so the exact
# recomputations happen at the same few elements either way.
BLOCK_ROW_ALIGNMENT = 64
_WIDE_FROM_SINGLE = (torch.float16, torch.bfloat16)  # widened through float32: both casts exact, both vectorised


def _blockable(weight: Tensor, terms: list[Term], out_dtype: torch.dtype) -> bool:
    """Row blocks pay off on the CPU for weights only low-rank terms touch."""
    return (
        weight.device.type == "cpu"
        and weight.dim() >= 2
        and weight.numel() > 0
        and bool(terms)
        and all(isinstance(term, LowRankTerm) for term in terms)
        and all(term.rows is None or term.rows[0] % BLOCK_ROW_ALIGNMENT == 0 for term in terms)
        and out_dtype in _DROPPED_BITS  # float16/bfloat16: the float32 filter finds the few elements to check
    )


@dataclass(frozen=True)
class _Group:
    """One GEMM of the block path, with the norms its error envelope needs."""

    first: int
    stop: int
    up: Tensor
    down: Tensor
    row_norms: Tensor
    column_norms: Tensor


def _bake_low_rank_in_blocks(
    weight: Tensor, terms: list[LowRankTerm], out_dtype: torch.dtype, workspace: Tensor | None, pool: Executor | None, workers: int
) -> Tensor:
    """bake_weight for low-rank terms, one block of rows at a time.

    Blocks are independent, so the pool's workers take blocks in turn, each
    with its own scratch; which worker takes which block cannot change a byte.
    """
    rows = weight.shape[0]
    width = weight.numel() // rows
    source = weight.reshape(rows, width)
    baked = torch.empty((rows, width), dtype=out_dtype)
    groups = [
        _Group(*((0, rows) if span is None else span), up, down, _row_norms(up), _column_norms(down))
        for span, up, down, _ in _gemm_groups(terms)
    ]
    relative = gamma(2 + sum(group.up.shape[1] + 3 for group in groups))
    lowest, highest = torch.aminmax(source)
    largest = max(-float(lowest), float(highest)) + sum(float(g.row_norms.max()) * float(g.column_norms.max()) for g in groups)
    block_rows = max(BLOCK_ROW_ALIGNMENT, BLOCK_ELEMENTS // width // BLOCK_ROW_ALIGNMENT * BLOCK_ROW_ALIGNMENT)
    block_rows = min(rows, block_rows)
    starts = range(0, rows, block_rows)
    workers = 1 if pool is None else min(workers, len(starts))
    scratch = [_Scratch.make(block_rows * width, workspace if index == 0 else None) for index in range(workers)]
    pending = iter(starts)  # shared: next() on a range iterator is atomic under the GIL
    found: list[tuple[Tensor, Tensor]] = []  # (flat indices in the weight, float64 approximations)

    def work(scratch: _Scratch) -> None:
        for start in pending:
            stop = min(rows, start + block_rows)
            block = scratch.wide[: (stop - start) * width].view(stop - start, width)
            _widen_into(block, source[start:stop], scratch.single if source.dtype in _WIDE_FROM_SINGLE else None)
            for group in groups:
                low, high = max(group.first, start), min(group.stop, stop)
                if low < high:
                    block[low - start:high - start].addmm_(group.up[low - group.first:high - group.first], group.down)
            flat = block.view(-1)
            candidates = _block_candidates(flat, baked[start:stop].view(-1), relative * largest, scratch)
            if candidates.numel():
                found.append((candidates + start * width, flat[candidates]))  # list.append is atomic

    if workers == 1:
        work(scratch[0])
    else:
        for future in [pool.submit(work, one) for one in scratch]:
            future.result()
    if found:
        _certify_candidates(baked, source, groups, terms, found, relative, out_dtype)
    return baked.view(weight.shape)


def _certify_candidates(baked, source, groups, terms, found, relative: float, out_dtype: torch.dtype) -> None:
    """Check every candidate of the weight against its own bound (one batch); recompute the undecided exactly."""
    width = source.shape[1]
    indices = torch.cat([index for index, _ in found])
    approx = torch.cat([value for _, value in found])
    rounded, sure = certify(approx, _candidate_bound(source, groups, indices, relative), out_dtype)
    baked.view(-1)[indices] = rounded
    missed = indices[~sure].tolist()
    if missed:
        _round_exactly(baked, sorted([index // width, index % width] for index in missed), source, terms, out_dtype)


# The float32 bits each format drops, and its largest finite value.
_DROPPED_BITS = {torch.float16: 13, torch.bfloat16: 16}
_LARGEST = {torch.float16: 65504.0, torch.bfloat16: float(torch.finfo(torch.bfloat16).max)}
_SMALLEST_STEP = 2.0**-149  # the smallest float32 step: zeros are always candidates


def _block_candidates(block: Tensor, out: Tensor, largest_bound: float, scratch: _Scratch) -> Tensor:
    """Round ``block`` (float64) into ``out``; return the flat indices whose rounding needs their bound checked.

    float16/bfloat16: the block is rounded to float32 and then to ``out`` (a
    double rounding, correct except next to a midpoint). An element whose
    float32 image is two or more float32 steps from every midpoint of the
    format is farther than 1.5 float32 steps, 2^-24·|y| or more, from it; its
    float64 error bound is below that whenever |y| > 2^25·bound, so it is
    certainly rounded right. Candidates are the rest: float32 images within
    one step of a midpoint (the bits below the format's midpoint bit, 12 for
    float16 and 15 for bfloat16, read all ones, zero or one; every midpoint,
    float16 subnormal ones included, has at least that many trailing zero
    bits in float32), elements at or below 2^25·largest bound in magnitude (zeros,
    cancellation), and elements at or beyond the largest finite value
    (overflow).
    """
    count = block.numel()
    nearest = scratch.single[:count]
    nearest.copy_(block)
    out.copy_(nearest)
    # In place, into preallocated arrays: fresh multi-MB temporaries cost a page fault per 4 KiB.
    magnitude = nearest.view(torch.int32).numpy()
    key, near, outside = scratch.key[:count], scratch.near[:count], scratch.outside[:count]
    np.bitwise_and(magnitude, 0x7FFFFFFF, out=magnitude)
    window = (1 << (_DROPPED_BITS[out.dtype] - 1)) - 1  # the bits below the midpoint's bit
    np.add(magnitude, 1, out=key)
    np.bitwise_and(key, window, out=key)
    np.less_equal(key, 2, out=near)
    # Outside (low, high), in one unsigned comparison.
    low = int(np.float32(max(_SMALLEST_STEP, largest_bound * 2.0**25)).view(np.int32))
    high = int(np.float32(_LARGEST[out.dtype]).view(np.int32))
    np.subtract(magnitude, low + 1, out=key)
    np.greater_equal(key.view(np.uint32), high - low - 1, out=outside)
    np.bitwise_or(near, outside, out=near)
    return torch.from_numpy(np.flatnonzero(near))


def _candidate_bound(source: Tensor, groups: list[_Group], indices: Tensor, relative: float) -> Tensor:
    """The error bound γ·(|W| + Σ ‖c·u_i‖·‖d_j‖) at flat indices of the weight's matrix view."""
    width = source.shape[1]
    rows = indices // width
    columns = indices % width
    bound = source[rows, columns].to(torch.float64).abs()
    for group in groups:
        inside = (rows >= group.first) & (rows < group.stop)
        local = (rows - group.first).clamp(0, group.row_norms.numel() - 1)
        bound += torch.where(inside, group.row_norms[local] * group.column_norms[columns], 0.0)
    return bound.mul_(relative)


@dataclass(frozen=True)
class _Scratch:
    """One worker's buffers for a block: float64 sums, float32 staging, and the candidate filter's arrays."""

    wide: Tensor  # float64
    single: Tensor  # float32
    key: np.ndarray  # int32
    near: np.ndarray  # bool
    outside: np.ndarray  # bool

    @staticmethod
    def make(numel: int, workspace: Tensor | None) -> "_Scratch":
        usable = workspace is not None and workspace.numel() >= numel and workspace.device.type == "cpu"
        wide = workspace if usable else torch.empty(numel, dtype=torch.float64)
        return _Scratch(wide, torch.empty(numel, dtype=torch.float32), np.empty(numel, np.int32),
                        np.empty(numel, bool), np.empty(numel, bool))


def _widen_into(block: Tensor, rows: Tensor, single: Tensor | None) -> None:
    """rows -> float64 block, exactly; half formats go through float32 (a direct cast is several times slower)."""
    if single is None:
        block.copy_(rows)
        return
    staged = single[: block.numel()].view(block.shape)
    staged.copy_(rows)
    block.copy_(staged)


def _slice(tensor: Tensor, rows: tuple[int, int] | None) -> Tensor:
    return tensor if rows is None else tensor[rows[0]:rows[1]]


def _float64_copy(weight: Tensor, workspace: Tensor | None) -> Tensor:
    if workspace is None or workspace.numel() < weight.numel() or workspace.device != weight.device:
        return weight.to(torch.float64, copy=True)
    return workspace[: weight.numel()].view(weight.shape).copy_(weight)
