"""diffusers + PEFT adapters (and diffusers' own converters) baked by loraforge equal diffusers' fuse_lora."""

from __future__ import annotations

import pytest
import torch

from interop_harness import Bake, assert_same_weights, baked_weights, run_bakes
from interop_models import read_tensors
from producers import make_peft

SD1_CASES = {
    # name: (make_peft options, strength)
    "lora": (dict(alpha=8), 0.7),  # alpha ≠ rank, from lora_adapter_metadata; strength through fuse_lora's lora_scale
    "rslora": (dict(alpha=6, rslora=True), 1.0),
    "dora": (dict(alpha=8, dora=True), 1.0),  # linear and conv (3×3 conv1/conv2, 1×1 proj_in) magnitudes
    "training_script": (dict(alpha=4, layout="training_script"), 1.0),  # .lora_linear_layer / .lora keys
    "kohya": (dict(alpha=4, layout="kohya"), 1.0),  # lora_te1_encoder_… names, int64 alphas
}


@pytest.fixture(scope="module")
def sd1_results(sd1):
    expected, bakes = {}, {}
    for seed, (name, (options, strength)) in enumerate(SD1_CASES.items(), start=100):
        path = sd1.folder / f"peft_{name}.safetensors"
        expected[name] = make_peft(sd1, path, seed=seed, strength=strength, **options)
        bakes[name] = Bake(path, strength)
    return expected, run_bakes(sd1, bakes)


@pytest.mark.parametrize("name", list(SD1_CASES))
def test_sd1_bake_equals_diffusers_fuse_lora(sd1, sd1_results, name):
    expected, outputs = sd1_results
    specs = sd1.specs(("unet", "text_encoder"))
    base = baked_weights(read_tensors(sd1.base), specs)
    changed = assert_same_weights(baked_weights(outputs[name], specs), expected[name], base=base)
    adapted = [s for s in specs if not torch.equal(expected[name][s.diffusers], base[s.diffusers].double())]
    assert changed == len(adapted) > 0
    assert any(s.is_text_encoder for s in adapted), "the text encoder must be baked, not left out"
    if name == "dora":
        assert any(s.is_conv and s.shape[0] == s.shape[1] and s.shape[2:] == (3, 3) for s in adapted)


SDXL_CASES = {
    "lora": (dict(alpha=8), 1.0),  # unet, text_encoder (no text_model level) and text_encoder_2 (fused q/k/v rows)
    "kohya": (dict(alpha=4, layout="kohya"), 1.0),  # lora_unet_down_blocks_… (diffusers names) on SDXL
}


@pytest.fixture(scope="module")
def sdxl_results(sdxl):
    expected, bakes = {}, {}
    for seed, (name, (options, strength)) in enumerate(SDXL_CASES.items(), start=200):
        path = sdxl.folder / f"peft_{name}.safetensors"
        expected[name] = make_peft(
            sdxl, path, seed=seed, strength=strength, components=("unet", "text_encoder", "text_encoder_2"), **options
        )
        bakes[name] = Bake(path, strength)
    return expected, run_bakes(sdxl, bakes)


@pytest.mark.parametrize("name", list(SDXL_CASES))
def test_sdxl_bake_equals_diffusers_fuse_lora(sdxl, sdxl_results, name):
    expected, outputs = sdxl_results
    specs = sdxl.specs(("unet", "text_encoder", "text_encoder_2"))
    base = baked_weights(read_tensors(sdxl.base), specs)
    changed = assert_same_weights(baked_weights(outputs[name], specs), expected[name], base=base)
    adapted = [s for s in specs if not torch.equal(expected[name][s.diffusers], base[s.diffusers].double())]
    assert changed == len(adapted) > 0
    assert {s.component for s in adapted} == {"unet", "te1", "te2"}
