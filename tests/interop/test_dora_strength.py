"""DoRA at strength ≠ 1: each convention (`dora: lycoris | peft`) equals its tool exactly.

LyCORIS's ``multiplier`` and diffusers' ``fuse_lora(lora_scale=s)`` disagree
(by several % at 0.7); loraforge.ops.deltas.dora_increment implements both.
Checked at the formats level (parse the producer's file, add each DoRA
module's increment to the base weight) and end to end: `loraforge build` of
the producer's file at 0.7, with the recipe's ``dora:`` or the file's
default, against the tool's own fused weights.
"""

from __future__ import annotations

import torch

from interop_harness import Bake, assert_same_weights, baked_weights, run_bakes
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


def _specs(setup, names):
    return [spec for spec in setup.arch.modules if spec.diffusers in names]


def test_a_build_at_strength_07_follows_the_recipes_convention(sd1):
    """The recipe's `dora:` reaches the bake: peft (the file's default) equals fuse_lora(lora_scale=0.7);
    `dora: lycoris` on the same file gives the other tool's weights; at strength 1 both give the same bytes."""
    path = sd1.folder / "dora_build_peft.safetensors"
    expected = make_peft(sd1, path, seed=502, alpha=8, dora=True, strength=STRENGTH)
    built = run_bakes(sd1, {
        "default": Bake(path, STRENGTH),
        "peft": Bake(path, STRENGTH, extra="dora: peft"),
        "lycoris": Bake(path, STRENGTH, extra="dora: lycoris"),
        "one_peft": Bake(path, 1.0, extra="dora: peft"),
        "one_lycoris": Bake(path, 1.0, extra="dora: lycoris"),
    })
    specs = _specs(sd1, expected)
    assert len(specs) > 100
    want = {spec.diffusers: expected[spec.diffusers] for spec in specs}
    assert_same_weights(baked_weights(built["default"], specs), want)
    assert all(torch.equal(built["default"][k], built["peft"][k]) for k in built["default"])
    lycoris = _bake_at(sd1, path, STRENGTH, "lycoris")  # only the DoRA modules: the rest is the base
    dora_specs = [spec for spec in specs if spec.diffusers in lycoris]
    assert len(dora_specs) > 100
    assert_same_weights(baked_weights(built["lycoris"], dora_specs), {s.diffusers: lycoris[s.diffusers] for s in dora_specs})
    assert any(not torch.equal(built["lycoris"][k], built["peft"][k]) for k in built["peft"])
    assert all(torch.equal(built["one_peft"][k], built["one_lycoris"][k]) for k in built["one_peft"])
