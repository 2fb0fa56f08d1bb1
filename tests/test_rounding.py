"""round_float64 rounds float64 once, to nearest-even, unlike torch's two-step cast."""

import numpy as np
import pytest
import torch

from loraforge.ops.rounding import round_float64

MANTISSA_BITS = {torch.float16: 11, torch.bfloat16: 8}  # significant bits, implicit one included
SMALLEST_NORMAL = {torch.float16: 2.0**-14, torch.bfloat16: 2.0**-126}


def reference_round(values: np.ndarray, significant_bits: int) -> np.ndarray:
    """Nearest-even rounding to `significant_bits` bits, done on float64 bit patterns (normal range only)."""
    bits = values.view(np.int64)
    drop = 53 - significant_bits
    mask = (1 << drop) - 1
    truncated_bits = bits & ~mask
    truncated = truncated_bits.view(np.float64)
    ulp = (truncated_bits + (1 << drop)).view(np.float64) - truncated
    remainder = np.abs(values - truncated)  # exact: same binade
    half = np.abs(ulp) / 2
    kept_last_bit = (truncated_bits >> drop) & 1
    round_up = (remainder > half) | ((remainder == half) & (kept_last_bit == 1))
    return np.where(round_up, truncated + np.sign(values) * np.abs(ulp), truncated)


def tricky_values(significant_bits: int, count: int = 20000) -> np.ndarray:
    """Random values, and values a hair above/below halfway points between representable neighbours."""
    rng = np.random.default_rng(0)
    base = rng.uniform(-4, 4, count) * 10.0 ** rng.integers(-3, 3, count)
    bits = base.view(np.int64) & ~((1 << (53 - significant_bits)) - 1)  # representable
    grid = bits.view(np.float64)
    half_step = np.abs(grid) * 2.0 ** -significant_bits
    nudges = rng.choice([-1.0, 1.0, 0.0], count) * np.abs(grid) * 2.0 ** -45
    return np.concatenate([base, grid + np.sign(grid) * half_step + nudges])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matches_exact_nearest_even(dtype):
    values = tricky_values(MANTISSA_BITS[dtype])
    values = values[np.abs(values) >= SMALLEST_NORMAL[dtype]]  # the bit-pattern reference covers normals
    ours = round_float64(torch.from_numpy(values), dtype).to(torch.float64).numpy()
    assert np.array_equal(ours, reference_round(values, MANTISSA_BITS[dtype]))


def test_float16_agrees_with_numpy_direct_conversion():
    values = tricky_values(11)
    ours = round_float64(torch.from_numpy(values), torch.float16).numpy()
    assert np.array_equal(ours.view(np.uint16), values.astype(np.float16).view(np.uint16))


def test_the_double_rounding_case_torch_gets_wrong():
    value = torch.tensor([1 + 2**-11 + 2**-40], dtype=torch.float64)
    assert value.to(torch.float16).item() == 1.0  # torch's two-step cast
    assert round_float64(value, torch.float16).item() == 1 + 2**-10


def test_specials_and_overflow():
    values = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e39, -1e39, 70000.0, 5e-8], dtype=torch.float64)
    half = round_float64(values, torch.float16)
    assert half.tolist()[:6] == [0.0, -0.0, float("inf"), -float("inf"), float("inf"), -float("inf")]
    assert torch.signbit(half[1]) and half[6].item() == float("inf")
    assert half[7].item() == np.float64(5e-8).astype(np.float16).item()  # float16 subnormal
    assert torch.isnan(round_float64(torch.tensor([float("nan")], dtype=torch.float64), torch.bfloat16)).all()
    assert round_float64(values, torch.float32).tolist()[:4] == [0.0, -0.0, float("inf"), -float("inf")]
