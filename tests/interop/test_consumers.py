"""loraforge's own LoRA outputs (svd merge, extraction) load in diffusers and LyCORIS with no key left over.

diffusers: the pipeline's ``load_lora_weights`` (kohya → PEFT conversion,
injection), every warning captured; the fused weights then equal loraforge's
bake of the same file. LyCORIS: ``create_lycoris_from_weights`` builds a
module for every adapter name of the file, and loading the state dict
reports no missing or unexpected key.
"""

from __future__ import annotations

import logging

import pytest
import torch

from interop_harness import Bake, assert_same_weights, baked_weights, run_bakes
from interop_models import read_tensors
from loraforge.testing.adapters import write_synthetic_adapter
from loraforge.testing.checkpoints import write_synthetic_checkpoint

from typer.testing import CliRunner

from loraforge.cli import app


@pytest.fixture(scope="module")
def outputs(sd1):
    """A 2-LoRA svd merge (LoRA + LoCon) and a rank-4 extraction (LoCon, text encoder included)."""
    folder = sd1.folder
    write_synthetic_adapter(folder / "syn_lora.safetensors", sd1.arch, "lora", seed=1, rank=4, alpha=2, dtype="F32")
    write_synthetic_adapter(
        folder / "syn_locon.safetensors", sd1.arch, "lora", seed=2, rank=4, targets="all", text_encoder=False, dtype="F32"
    )
    write_synthetic_checkpoint(folder / "tuned.safetensors", sd1.arch, seed=8, dtype="F32")
    recipe = folder / "recipe_outputs.yaml"
    recipe.write_text(
        "\n".join([
            "loraforge: 1", "name: outputs", 'date: "2026-12-01"', "inputs:",
            f"  base: {{source: {sd1.base}}}",
            f"  tuned: {{source: {folder / 'tuned.safetensors'}}}",
            f"  a: {{source: {folder / 'syn_lora.safetensors'}}}",
            f"  b: {{source: {folder / 'syn_locon.safetensors'}}}",
            "targets:",
            "  merged:",
            "    kind: lora",
            "    method: svd",
            "    rank: {rank: 6}",
            "    loras: [{use: a, strength: 0.8}, {use: b, strength: 0.5}]",
            "    output: out/merged.safetensors",
            "  extracted:",
            "    kind: extract",
            "    tuned: tuned",
            "    base: base",
            "    rank: {rank: 4}",
            "    conv_rank: 4",
            "    text_encoder: true",
            "    output: out/extracted.safetensors",
        ]) + "\n"
    )
    result = CliRunner().invoke(app, ["build", str(recipe), "--quiet"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return {name: folder / "out" / f"{name}.safetensors" for name in ("merged", "extracted")}


def _module_names(path) -> dict[str, set[str]]:
    names: dict[str, set[str]] = {"unet": set(), "te": set()}
    for key in read_tensors(path):
        module = key.split(".")[0]
        names["unet" if module.startswith("lora_unet_") else "te"].add(module)
    return names


@pytest.mark.parametrize("output", ["merged", "extracted"])
def test_diffusers_loads_every_key(sd1, outputs, output, caplog):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from peft.tuners.tuners_utils import BaseTunerLayer

    path = outputs[output]
    models = sd1.models()

    class Pipeline(StableDiffusionLoraLoaderMixin):
        unet = models["unet"]
        text_encoder = models["text_encoder"]
        num_fused_loras = 0
        hf_device_map = None
        components = {"unet": models["unet"], "text_encoder": models["text_encoder"]}

    with caplog.at_level(logging.WARNING):
        Pipeline().load_lora_weights(str(path), adapter_name="loraforge")
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    names = _module_names(path)
    for component, model in (("unet", models["unet"]), ("te", models["text_encoder"])):
        injected = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        assert len(injected) == len(names[component]), (component, len(injected), len(names[component]))
    assert names["te"], "the outputs should adapt the text encoder too"

    # diffusers' fused weights equal loraforge's bake of the same file.
    from diffusers.loaders.lora_base import fuse_text_encoder_lora

    for model in models.values():
        model.double()
    models["unet"].fuse_lora()
    fuse_text_encoder_lora(models["text_encoder"])
    from interop_harness import fused_weights

    specs = sd1.specs(("unet", "text_encoder"))
    expected = fused_weights(models, specs)
    baked = run_bakes(sd1, {f"consumer_{output}": Bake(path)})[f"consumer_{output}"]
    assert_same_weights(baked_weights(baked, specs), expected)


@pytest.mark.parametrize("output", ["merged", "extracted"])
def test_lycoris_loads_every_key(sd1, outputs, output):
    from lycoris import LycorisNetwork, create_lycoris_from_weights

    path = outputs[output]
    state = read_tensors(path)
    models = sd1.models()
    names = _module_names(path)
    saved = LycorisNetwork.LORA_PREFIX
    # transformers 5's CLIPTextModel lost its `text_model` level; kohya-style names (and LyCORIS under
    # sd-scripts, which pins transformers 4) keep it, so hold the encoder where transformers 4 had it.
    holder = torch.nn.Module()
    holder.text_model = models["text_encoder"]
    try:
        for component, prefix, model in (("unet", "lora_unet", models["unet"]), ("te", "lora_te", holder)):
            LycorisNetwork.LORA_PREFIX = prefix
            own = {k: v for k, v in state.items() if k.split(".")[0] in names[component]}
            network, _ = create_lycoris_from_weights(1.0, str(path), model, weights_sd=own)
            assert {m.lora_name for m in network.loras} == names[component], component
            network.apply_to()
            result = network.load_state_dict(own, strict=False)
            assert not result.unexpected_keys and not result.missing_keys, (component, result)
    finally:
        LycorisNetwork.LORA_PREFIX = saved
