"""DoRA at strength ≠ 1: each convention (`dora: lycoris | peft`) equals its tool exactly.

LyCORIS's ``multiplier`` and diffusers' ``fuse_lora(lora_scale=s)`` disagree
(by several % at 0.7); loraforge.ops.deltas.dora_increment implements both.
Checked here at the formats level (parse the producer's file, add each DoRA
module's increment to the base weight): the recipe's ``dora:`` field still
has to be passed through the planner and the bake executor.
"""

from __future__ import annotations

import torch

from interop_harness import assert_same_weights
from interop_models import read_tensors
from loraforge.formats.adapters import load_factors, module_dora_increment, parse_adapter
from loraforge.formats.adapters.matching import find_spec
from loraforge.formats.safetensors_reader import open_safetensors
from producers import make_lycoris, make_peft

STRENGTH = 0.7


def _bake_at(setup, path, strength, convention):
    """{diffusers name: W + increment} for every DoRA module of the file, through loraforge.formats."""
    base = read_tensors(setup.base)
    result = {}
    with open_safetensors(path) as file:
        adapter = parse_adapter(file)
        for module in adapter.modules:
            spec = find_spec(module, setup.arch)
            weight = base[spec.key].double()
            factors = load_factors(file, module)
            result[spec.diffusers] = weight + module_dora_increment(module, factors, weight, strength, convention)
    return result


def test_peft_convention_equals_fuse_lora_scale(sd1):
    path = sd1.folder / "dora_strength_peft.safetensors"
    expected = make_peft(sd1, path, seed=500, alpha=8, dora=True, strength=STRENGTH)
    ours = _bake_at(sd1, path, STRENGTH, None)  # PEFT-spelled: "peft" by default
    assert ours.keys() <= expected.keys() and len(ours) > 100
    for name, value in ours.items():
        torch.testing.assert_close(value, expected[name], rtol=1e-12, atol=1e-15)
    other = _bake_at(sd1, path, STRENGTH, "lycoris")
    assert max(float((other[n] - ours[n]).abs().max() / ours[n].abs().max()) for n in ours) > 0.01
    # At strength 1 the two conventions agree.
    one = _bake_at(sd1, path, 1.0, "peft")
    for name, value in _bake_at(sd1, path, 1.0, "lycoris").items():
        torch.testing.assert_close(value, one[name], rtol=1e-12, atol=1e-15)


def test_lycoris_convention_equals_lycoris_multiplier(sd1):
    path = sd1.folder / "dora_strength_lycoris.safetensors"
    options = dict(linear_dim=4, linear_alpha=2, conv_dim=4, conv_alpha=1, dora_wd=True)
    expected, _ = make_lycoris(sd1, path, seed=501, algo="locon", float64=False, multiplier=STRENGTH, **options)
    ours = _bake_at(sd1, path, STRENGTH, None)  # LyCORIS-spelled: "lycoris" by default
    assert len(ours) > 100
    # LyCORIS ran in float32 (its epsilon is float32's): within its own rounding.
    assert_same_weights({n: v.float() for n, v in ours.items()}, {n: expected[n] for n in ours}, ulps=8, relative_to_max=True)
    other = _bake_at(sd1, path, STRENGTH, "peft")
    assert max(float((other[n] - ours[n]).abs().max() / ours[n].abs().max()) for n in ours) > 0.01
