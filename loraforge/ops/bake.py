"""Baking: W' = W + sum_i c_i * dW_i, accumulated in float64 and rounded once.

Pure tensor math. Terms are added in the order given (the planner's order:
recipe order of the LoRAs, then module name), so the float64 sum and
therefore the rounded output are reproducible.

Plain LoRA/LoCon terms arrive as factors and are added with one in-place
``addmm_`` per row slice (their factors concatenated along the rank axis):
no dense delta is ever allocated for them, which is what keeps the bake close
to the speed of a plain copy. Other kinds arrive as dense deltas.

A CPU weight whose terms are all low-rank is baked in blocks of rows
(:func:`_bake_low_rank_in_blocks`): widen the block to float64, add every
term's GEMM restricted to those rows, round the block, next block. The
float64 block stays in cache across the passes instead of streaming a
float64 copy of the whole weight through memory three times. Each element
still sees the same operations in the same order (one GEMM per run of
same-row terms, the same concatenated factors), so the bytes are the same
as the whole-weight path's.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import groupby
from typing import Iterable, Union

import torch
from torch import Tensor

from loraforge.ops.rounding import float16_into, round_float64


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
    terms = list(terms)
    if _blockable(weight, terms, out_dtype):
        return _bake_low_rank_in_blocks(weight, terms, out_dtype, workspace)
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
    for rows, up, down in _gemm_groups(terms):
        target = _slice(baked, rows)
        target.view(target.shape[0], -1).addmm_(up, down)


def _gemm_groups(terms: list[LowRankTerm]) -> list[tuple[tuple[int, int] | None, Tensor, Tensor]]:
    """(rows, up, down) per run of consecutive same-row terms, factors concatenated along the rank."""
    groups = []
    for rows, group in groupby(terms, key=lambda term: term.rows):
        group = list(group)
        up = group[0].up if len(group) == 1 else torch.cat([t.up for t in group], dim=1)
        down = group[0].down if len(group) == 1 else torch.cat([t.down for t in group], dim=0)
        groups.append((rows, up, down))
    return groups


# Elements per row block: 4 MiB of float64, which stays in this CPU's cache
# while it is widened, accumulated and rounded; much smaller blocks lose to
# per-call overhead and to re-reading each term's down factor.
BLOCK_ELEMENTS = 1 << 19
# Blocks start at multiples of this many rows (of the weight and of every row
# slice a term lands on). The GEMM library's float64 result for a row depends
# on where the row sits in its kernel's row tiles: blocks of 22 rows changed
# 7 of 860 M float16 outputs of the SD 1.5 benchmark, while 64-row-aligned
# blocks give the whole-matrix GEMM's bits (checked on 720 shapes and on the
# full-size benchmark; tests/test_bake_blocks.py keeps checking).
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
        and out_dtype in (torch.float16, torch.float32, torch.float64)  # bfloat16's fix-up is not per block yet
    )


def _bake_low_rank_in_blocks(weight: Tensor, terms: list[LowRankTerm], out_dtype: torch.dtype, workspace: Tensor | None) -> Tensor:
    """bake_weight for low-rank terms, one block of rows at a time (same operations per element).

    Blocks are independent (each element's operations depend only on its
    64-row-aligned block), so BLOCK_THREADS workers take blocks in turn, each
    with its own scratch; which worker takes which block cannot change a byte.
    """
    rows = weight.shape[0]
    width = weight.numel() // rows
    source = weight.reshape(rows, width)
    baked = torch.empty((rows, width), dtype=out_dtype)
    groups = [((0, rows) if span is None else span, up, down) for span, up, down in _gemm_groups(terms)]
    block_rows = max(BLOCK_ROW_ALIGNMENT, BLOCK_ELEMENTS // width // BLOCK_ROW_ALIGNMENT * BLOCK_ROW_ALIGNMENT)
    block_rows = min(rows, block_rows)
    starts = range(0, rows, block_rows)
    workers = min(BLOCK_THREADS, len(starts))
    scratch = _block_scratch(workers, block_rows * width, source.dtype in _WIDE_FROM_SINGLE, workspace)
    pending = iter(starts)  # shared: next() on a range iterator is atomic under the GIL

    def work(buffer: Tensor, single: Tensor | None) -> None:
        for start in pending:
            stop = min(rows, start + block_rows)
            block = buffer[: (stop - start) * width].view(stop - start, width)
            _widen_into(block, source[start:stop], single)
            for (first, end), up, down in groups:
                low, high = max(first, start), min(end, stop)
                if low < high:
                    block[low - start:high - start].addmm_(up[low - first:high - first], down)
            _round_into(block, baked[start:stop])

    if workers == 1:
        work(*scratch[0])
    else:
        for future in [_block_pool().submit(work, *pair) for pair in scratch]:
            future.result()
    return baked.view(weight.shape)


# Workers baking the blocks of one weight. The torch ops and numpy casts in a
# block release the GIL, so two workers keep both cores busy while torch
# itself stays single-threaded (no OpenMP spin-waits).
BLOCK_THREADS = max(1, min(2, os.cpu_count() or 1))


@functools.lru_cache(maxsize=1)
def _block_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=BLOCK_THREADS, thread_name_prefix="loraforge-block")


def _block_scratch(workers: int, numel: int, staged: bool, workspace: Tensor | None) -> list[tuple[Tensor, Tensor | None]]:
    """(float64 block buffer, float32 staging buffer or None) per worker; the first reuses the workspace."""
    scratch = []
    for index in range(workers):
        buffer = _block_buffer(numel, workspace if index == 0 else None)
        scratch.append((buffer, torch.empty(numel, dtype=torch.float32) if staged else None))
    return scratch


def _block_buffer(numel: int, workspace: Tensor | None) -> Tensor:
    if workspace is not None and workspace.numel() >= numel and workspace.device.type == "cpu":
        return workspace
    return torch.empty(numel, dtype=torch.float64)


def _widen_into(block: Tensor, rows: Tensor, single: Tensor | None) -> None:
    """rows -> float64 block, exactly; half formats go through float32 (a direct cast is several times slower)."""
    if single is None:
        block.copy_(rows)
        return
    staged = single[: block.numel()].view(block.shape)
    staged.copy_(rows)
    block.copy_(staged)


def _round_into(block: Tensor, out: Tensor) -> None:
    """One correct rounding of the float64 block into ``out`` (round_float64's result, without its allocations)."""
    if out.dtype == torch.float16:
        float16_into(block, out)
    else:
        out.copy_(round_float64(block, out.dtype))


def _slice(tensor: Tensor, rows: tuple[int, int] | None) -> Tensor:
    return tensor if rows is None else tensor[rows[0]:rows[1]]


def _float64_copy(weight: Tensor, workspace: Tensor | None) -> Tensor:
    if workspace is None or workspace.numel() < weight.numel() or workspace.device != weight.device:
        return weight.to(torch.float64, copy=True)
    return workspace[: weight.numel()].view(weight.shape).copy_(weight)
