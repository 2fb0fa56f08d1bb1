"""LyCORIS adapters (create_lycoris on diffusers / transformers models) baked by loraforge equal LyCORIS's forward."""

from __future__ import annotations

import pytest
import torch

from interop_harness import Bake, assert_same_weights, baked_weights, run_bakes
from interop_models import read_tensors
from producers import make_lycoris

# name: (algo, create_lycoris options, float64 producer)
SD1_CASES = {
    "locon": ("locon", dict(linear_dim=4, linear_alpha=2, conv_dim=4, conv_alpha=1), True),
    "locon_tucker": ("locon", dict(linear_dim=4, linear_alpha=2, conv_dim=4, conv_alpha=3, use_tucker=True), True),
    "loha": ("loha", dict(linear_dim=4, linear_alpha=2, conv_dim=4, conv_alpha=1), True),
    "loha_tucker": ("loha", dict(linear_dim=4, linear_alpha=2, conv_dim=4, conv_alpha=1, use_tucker=True), True),
    "lokr": ("lokr", dict(linear_dim=4, linear_alpha=2, factor=4), True),
    "lokr_tucker": ("lokr", dict(linear_dim=4, linear_alpha=2, factor=4, use_tucker=True, decompose_both=True), True),
    "full": ("full", {}, True),
    # DoRA: LyCORIS adds float32's epsilon to the norm, so it runs in float32 as it does in training.
    "dora": ("locon", dict(linear_dim=4, linear_alpha=2, conv_dim=4, conv_alpha=1, dora_wd=True), False),
    "dora_wd_on_input": (
        "locon", dict(linear_dim=4, linear_alpha=2, conv_dim=4, conv_alpha=1, dora_wd=True, wd_on_output=False), False,
    ),
}


@pytest.fixture(scope="module")
def sd1_results(sd1):
    expected, bakes = {}, {}
    for seed, (name, (algo, options, float64)) in enumerate(SD1_CASES.items(), start=300):
        path = sd1.folder / f"lycoris_{name}.safetensors"
        expected[name] = make_lycoris(sd1, path, seed=seed, algo=algo, float64=float64, **options)
        bakes[name] = Bake(path)
    return expected, run_bakes(sd1, bakes)


@pytest.mark.parametrize("name", list(SD1_CASES))
def test_sd1_bake_equals_lycoris_forward(sd1, sd1_results, name):
    expected, outputs = sd1_results
    weights, biases = expected[name]
    specs = sd1.specs(("unet", "text_encoder"))
    base = baked_weights(read_tensors(sd1.base), specs)
    float64 = SD1_CASES[name][2]
    changed = assert_same_weights(
        baked_weights(outputs[name], specs), weights, base=base,
        # float32 producer: its own rounding, a few steps of each weight's largest element
        ulps=1.0 if float64 else 8.0, relative_to_max=not float64,
    )
    assert changed == len(specs)  # LyCORIS's full preset adapts every target, text encoder included
    output, base_tensors = outputs[name], read_tensors(sd1.base)
    for spec in specs:  # biases: only `full` changes them (diff_b)
        bias = output[spec.bias_key] if spec.bias_key else None
        if spec.diffusers in biases:
            assert_same_weights({"b": bias}, {"b": biases[spec.diffusers]})
        elif bias is not None:
            assert torch.equal(bias, base_tensors[spec.bias_key])
    assert bool(biases) == (name == "full")


def test_sdxl_diffusers_named_unet_bakes(sdxl):
    """LyCORIS on diffusers' SDXL UNet writes lora_unet_down_blocks_… names (SGM names are kohya's default)."""
    path = sdxl.folder / "lycoris_locon.safetensors"
    weights, _ = make_lycoris(sdxl, path, seed=400, algo="locon", components=("unet",), linear_dim=4, linear_alpha=2)
    output = run_bakes(sdxl, {"sdxl_locon": Bake(path)})["sdxl_locon"]
    specs = sdxl.specs(("unet",))
    base = baked_weights(read_tensors(sdxl.base), specs)
    assert assert_same_weights(baked_weights(output, specs), weights, base=base) == len(specs)
    with open(path, "rb") as f:
        assert b"lora_unet_down_blocks_1_attentions_0" in f.read(200_000)
