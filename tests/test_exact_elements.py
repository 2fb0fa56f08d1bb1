"""Each adapter kind's exact ΔW element (the certified bake's fallback) agrees with its float64 ΔW, everywhere.

The exact functions only run for the rare elements certified rounding cannot
decide, so a bake alone would hardly ever exercise them: here every element
of every kind's natural ΔW is compared with the float64 evaluation of
loraforge.ops.deltas (within float64 rounding), and the kind's envelope must
bound |ΔW|.
"""

from __future__ import annotations

import pytest
import torch

from loraforge.ops import deltas, exact


def _f32(*shape, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator).to(torch.float64)  # float32 values, exact in float64


def _agree(delta: torch.Tensor, element, envelope: torch.Tensor | None = None) -> None:
    flat = delta.reshape(-1)
    exact_values = torch.tensor([float(element(index)) for index in range(flat.numel())], dtype=torch.float64)
    assert torch.allclose(exact_values, flat, rtol=1e-12, atol=1e-12)
    if envelope is not None:
        assert bool((envelope.reshape(-1) >= flat.abs() * (1 - 1e-12)).all())


@pytest.mark.parametrize("tucker", [False, True])
@pytest.mark.parametrize("conv", [False, True])
def test_lora_and_locon(tucker, conv):
    up = _f32(6, 3, seed=1)
    if tucker:
        down, mid = _f32(3, 5, 1, 1, seed=2), _f32(3, 3, 3, 3, seed=3)
    else:
        down, mid = (_f32(3, 5, 3, 3, seed=2) if conv else _f32(3, 5, seed=2)), None
    delta = deltas.lora_delta(up, down, mid=mid)
    _agree(delta, lambda i: exact.lora_element(up, down, mid, i),
           deltas.lora_delta(up.abs(), down.abs(), mid=None if mid is None else mid.abs()))
    assert exact.lora_depth(up, mid) >= 3 * (3 if tucker else 1)


@pytest.mark.parametrize("tucker", [False, True])
def test_loha(tucker):
    if tucker:
        w1a, w1b, w2a, w2b = _f32(2, 6, seed=1), _f32(2, 5, seed=2), _f32(3, 6, seed=3), _f32(3, 5, seed=4)
        t1, t2 = _f32(2, 2, 3, 3, seed=5), _f32(3, 3, 3, 3, seed=6)
    else:
        w1a, w1b, w2a, w2b = _f32(6, 2, seed=1), _f32(2, 45, seed=2), _f32(6, 3, seed=3), _f32(3, 45, seed=4)
        t1 = t2 = None
    delta = deltas.loha_delta(w1a, w1b, w2a, w2b, t1=t1, t2=t2)
    _agree(delta, lambda i: exact.loha_element(w1a, w1b, w2a, w2b, t1, t2, i))


@pytest.mark.parametrize("form", ["full-full", "factored-full", "full-factored-conv", "factored-tucker"])
def test_lokr(form):
    if form == "full-full":
        w1, w2 = (_f32(2, 3, seed=1), None, None, None), (_f32(4, 5, seed=2), None, None, None)
    elif form == "factored-full":
        w1, w2 = (None, _f32(2, 2, seed=1), _f32(2, 3, seed=2), None), (_f32(4, 5, seed=3), None, None, None)
    elif form == "full-factored-conv":
        w1, w2 = (_f32(2, 3, seed=1), None, None, None), (None, _f32(4, 2, seed=2), _f32(2, 5, 3, 3, seed=3), None)
    else:
        w1 = (None, _f32(2, 2, seed=1), _f32(2, 3, seed=2), None)
        w2 = (None, _f32(2, 4, seed=3), _f32(2, 5, seed=4), _f32(2, 2, 3, 3, seed=5))
    factors = [deltas.lokr_factor(*w) for w in (w1, w2)]
    shapes = [tuple(f.shape) for f in factors]
    delta = deltas.lokr_delta(*factors)
    _agree(delta, lambda i: exact.lokr_element(w1, w2, shapes[0], shapes[1], i))
