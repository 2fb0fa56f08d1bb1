"""overflow_count's fast all-finite path (aminmax) against an element-by-element count in Python."""

from __future__ import annotations

import math

import pytest
import torch

from loraforge.ops.finite import overflow_count

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
DTYPES += [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)]
SPECIALS = (math.nan, math.inf, -math.inf)


def reference(output: torch.Tensor, source: torch.Tensor) -> int:
    out = output.to(torch.float64).reshape(-1).tolist()
    src = source.to(torch.float64).reshape(-1).tolist()
    return sum(1 for o, s in zip(out, src) if not math.isfinite(o) and math.isfinite(s))


def _special_fits(dtype: torch.dtype, value: float) -> bool:
    return not (dtype == getattr(torch, "float8_e4m3fn", None) and math.isinf(value))  # e4m3fn has no infinity


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", [1, 7, 33, 4099, 70001])  # scalar-sized, tails shorter and longer than a SIMD vector
def test_the_count_equals_an_element_by_element_count(dtype, numel):
    generator = torch.Generator().manual_seed(numel)
    source = torch.randn(numel, generator=generator, dtype=torch.float32).to(dtype)
    assert overflow_count(source.clone(), source) == 0 == reference(source, source)
    positions = sorted({0, numel - 1, numel // 2, *torch.randint(numel, (3,), generator=generator).tolist()})
    for special in SPECIALS:
        if not _special_fits(dtype, special):
            continue
        for position in positions:  # one special value anywhere: first, last, middle, random
            output = source.clone()
            output[position] = special
            assert overflow_count(output, source) == reference(output, source) == 1, (special, position)
        output = source.clone()
        output[positions] = special
        assert overflow_count(output, source) == reference(output, source) == len(positions)
        # a special value the source already had is passed through, not counted
        passed = source.clone()
        passed[positions[0]] = special
        assert overflow_count(passed.clone(), passed) == reference(passed, passed) == 0


def test_shapes_empty_and_integer_tensors():
    source = torch.randn(6, 5, dtype=torch.float64).to(torch.bfloat16)
    output = source.clone()
    output[2, 3] = math.inf
    output[5, 4] = math.nan
    assert overflow_count(output, source.reshape(-1)) == 2
    assert overflow_count(torch.empty(0, 3, dtype=torch.float16), torch.empty(0, 3, dtype=torch.float16)) == 0
    assert overflow_count(torch.arange(5), torch.arange(5)) == 0
