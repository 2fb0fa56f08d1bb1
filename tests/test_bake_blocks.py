"""The row-block bake and the fast float16 rounding give the simple path's bytes."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from loraforge.ops import bake
from loraforge.ops.bake import LowRankTerm, bake_weight
from loraforge.ops.rounding import float16_into, float16_reference, round_float64


def whole_weight_bake(weight, terms, dtype):
    """The reference: the whole-weight path (every element certified from the full envelope)."""
    original = bake._blockable
    try:
        bake._blockable = lambda *args: False
        return bake_weight(weight, terms, dtype)
    finally:
        bake._blockable = original


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(640, 320), (320, 2560, 3, 3), (77, 5), (1280, 768)])
def test_blocks_give_the_whole_weight_bytes(monkeypatch, dtype, shape):
    monkeypatch.setattr(bake, "BLOCK_ELEMENTS", 1 << 14)  # many blocks even for small weights
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(shape, generator=generator) * 0.02).to(dtype)
    width = weight[0].numel()
    terms = [
        LowRankTerm(torch.randn(shape[0], 8, generator=generator, dtype=torch.float64) * 0.01,
                    torch.randn(8, width, generator=generator, dtype=torch.float64) * 0.01, None, 0.8, 0.5),
        LowRankTerm(torch.randn(shape[0], 4, generator=generator, dtype=torch.float64) * 0.01,
                    torch.randn(4, width, generator=generator, dtype=torch.float64) * 0.01),
    ]
    if shape[0] >= 128:  # a term on a 64-aligned row slice, as fused qkv weights get
        terms.append(LowRankTerm(torch.randn(64, 2, generator=generator, dtype=torch.float64),
                                 torch.randn(2, width, generator=generator, dtype=torch.float64) * 0.01, (64, 128), -0.3))
    assert bake._blockable(weight, terms, dtype)
    with ThreadPoolExecutor(max_workers=2) as pool:  # two workers taking blocks in turn, as a bake runs them
        ours = bake_weight(weight, terms, dtype, torch.empty(weight.numel(), dtype=torch.float64), pool, 2)
    assert torch.equal(ours.reshape(-1).view(torch.uint8), whole_weight_bake(weight, terms, dtype).reshape(-1).view(torch.uint8))


def float16_halfway_neighbourhood() -> np.ndarray:
    """Every float16 halfway point (normal, subnormal, overflow), and float64 values a hair around each."""
    halves = np.arange(0, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float64)
    mids = (halves[:-1] + halves[1:]) / 2  # exact in float64
    mids = np.concatenate([mids, [65520.0, 2.0**-25]])
    hairs = [mids]
    for exponent in (-30, -35, -40, -45, -52):
        step = np.abs(mids) * 2.0**exponent
        hairs += [mids + step, mids - step]
    values = np.concatenate(hairs)
    return np.concatenate([values, -values])


def test_float16_into_equals_numpy_near_every_halfway_point():
    values = torch.from_numpy(float16_halfway_neighbourhood())
    out = torch.empty(values.shape, dtype=torch.float16)
    float16_into(values, out)
    assert torch.equal(out.view(torch.int16), float16_reference(values).view(torch.int16))


def test_float16_into_equals_numpy_on_random_scales_and_specials():
    rng = np.random.default_rng(1)
    values = rng.standard_normal(200_000) * 10.0 ** rng.integers(-12, 6, 200_000)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, 65519.99, 65520.0, 1e-300, 2.0**-24, 2.0**-25])
    payload_nan = np.array([0x7FF4000000000001, 0xFFF8000000001234], dtype=np.uint64).view(np.float64)
    for chunk in (values, np.concatenate([values[:1000], specials, payload_nan])):
        tensor = torch.from_numpy(chunk)
        out = torch.empty(tensor.shape, dtype=torch.float16)
        float16_into(tensor, out)
        assert torch.equal(out.view(torch.int16), float16_reference(tensor).view(torch.int16))
        assert torch.equal(round_float64(tensor, torch.float16).view(torch.int16), out.view(torch.int16))


def test_float16_rounding_on_a_pool_gives_the_same_bytes():
    values = torch.randn(3 << 20, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.05
    with ThreadPoolExecutor(max_workers=2) as pool:
        sliced = round_float64(values, torch.float16, pool)
    assert torch.equal(sliced.view(torch.int16), round_float64(values, torch.float16).view(torch.int16))
