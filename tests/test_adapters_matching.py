"""Matching adapter modules onto architectures, and detecting an adapter's architecture."""

from __future__ import annotations

import pytest
import torch

from loraforge.errors import FormatError
from loraforge.formats.adapters import AdapterFile, AdapterModule, parse_adapter
from loraforge.formats.adapters.matching import detect_adapter_architecture, find_spec, match_adapter
from loraforge.formats.arch import get_architecture
from loraforge.testing.arch import tiny_architecture
from loraforge.formats.safetensors_reader import open_safetensors
from loraforge.formats.safetensors_writer import save_tensors
from loraforge.testing.adapters import write_synthetic_adapter

ARCHS = ("sd1", "sd2", "sdxl")
# (kind, options): every adapter kind and variant, LoCon-style "all" where it matters.
VARIANTS = [
    ("lora", {"targets": "all"}),
    ("lora", {"targets": "all", "tucker": True, "dora": "out"}),
    ("loha", {"targets": "all", "tucker": True}),
    ("lokr", {"targets": "all", "dora": "in"}),
    ("lokr-full", {}),
    ("lokr-both", {"tucker": True, "targets": "all"}),
    ("diff", {}),
    ("peft", {"dora": True}),
]


def _parse(path):
    with open_safetensors(path) as file:
        return parse_adapter(file)


@pytest.mark.parametrize("arch_name", ARCHS)
@pytest.mark.parametrize(("kind", "options"), VARIANTS, ids=[f"{k}-{i}" for i, (k, _) in enumerate(VARIANTS)])
def test_synthetic_adapters_match_and_detect(tmp_path, arch_name, kind, options):
    arch = tiny_architecture(arch_name)
    path = tmp_path / "adapter.safetensors"
    write_synthetic_adapter(path, arch, kind, **options)
    adapter = _parse(path)
    match = match_adapter(adapter, arch)
    assert adapter.unclaimed == ()
    assert match.unmatched == () and match.shape_mismatches == ()
    assert len(match.matched) == len(adapter.modules) > 0
    for module, spec in match.matched:
        assert module.name in (spec.kohya, spec.diffusers)
    detected = detect_adapter_architecture(adapter)
    assert _same_family_and_modules(detected, arch, adapter)  # the family, at the dimensions its module shapes imply


def _same_family_and_modules(detected, arch, adapter) -> bool:
    """An adapter shows the widths of the modules it has (not the vocabulary, VAE or untouched layers)."""
    return detected.name == arch.name and all(
        find_spec(m, detected).shape == find_spec(m, arch).shape for m in adapter.modules
    )


def _module(name, delta_shape, naming="kohya"):
    return AdapterModule(
        name=name, naming=naming, kind="lora", tucker=False, dora=False, keys={}, rank=4, alpha=4.0, scale=1.0,
        delta_shape=delta_shape,
    )


def _adapter(*modules):
    return AdapterFile(path="hand.safetensors", modules=tuple(modules), unclaimed=(), metadata={}, kind="LoRA")


TO_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
TO_Q1 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def test_sd1_and_sd2_full_told_apart_by_cross_attention_width():
    assert detect_adapter_architecture(_adapter(_module(TO_K, (320, 768)))).name == "sd1"
    sd2 = detect_adapter_architecture(_adapter(_module(TO_K, (320, 1024))))
    assert (sd2.name, sd2.size) == ("sd2", "full")


def test_sd1_and_sd2_told_apart_by_text_encoder_width():
    te_q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert detect_adapter_architecture(_adapter(_module(te_q, (768, 768)))).name == "sd1"
    assert detect_adapter_architecture(_adapter(_module(te_q, (1024, 1024)))).name == "sd2"


TE_LAST = "lora_te_text_model_encoder_layers_{}_self_attn_q_proj"


def test_sd1_and_sd2_tiny_told_apart(tmp_path):
    # Scaled, the widths no longer tell SD1 from SD2 (any width is some scaled SD1 or SD2); the text
    # encoder's depth does: SD 1.x's CLIP has 12 layers, SD 2.x's OpenCLIP 24.
    for name, last_layer in (("sd1", 11), ("sd2", 23)):
        arch = tiny_architecture(name)
        path = tmp_path / f"{name}.safetensors"
        write_synthetic_adapter(path, arch, "lora", targets=[TO_K, TO_Q1, TE_LAST.format(last_layer)])
        adapter = _parse(path)
        detected = detect_adapter_architecture(adapter)
        assert _same_family_and_modules(detected, arch, adapter)


def test_scaled_unet_attention_reads_as_sd1_at_the_implied_dimensions(tmp_path):
    # to_q and to_k of a scaled SD2 fit SD1 built at the same widths: the earlier family wins.
    path = tmp_path / "sd2.safetensors"
    write_synthetic_adapter(path, tiny_architecture("sd2"), "lora", targets=[TO_K, TO_Q1], text_encoder=False)
    detected = detect_adapter_architecture(_parse(path))
    assert detected.name == "sd1"
    assert dict(detected.dimensions)["model_channels"] == 16 and dict(detected.dimensions)["context"] == 32


def test_self_attention_only_is_ambiguous_and_reads_as_sd1():
    # attn1 to_q is 320×320 in both SD1 and SD2: nothing tells them apart, the earlier candidate wins.
    assert detect_adapter_architecture(_adapter(_module(TO_Q1, (320, 320)))).name == "sd1"


def test_shape_mismatch_and_unmatched_are_reported():
    sd2 = get_architecture("sd2")
    stray = _module("lora_unet_not_a_layer", (4, 4))
    sd1_to_k = _module(TO_K, (320, 768))
    to_q = _module(TO_Q1, (320, 320))
    match = match_adapter(_adapter(sd1_to_k, stray, to_q), sd2)
    assert [m.name for m, _ in match.matched] == [TO_Q1]
    assert [m.name for m in match.unmatched] == ["lora_unet_not_a_layer"]
    ((module, spec),) = match.shape_mismatches
    assert module.name == TO_K and spec.shape == (320, 1024)


def test_linear_lora_on_sd1_1x1_proj_in_matches():
    sd1 = get_architecture("sd1")
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert sd1.module_by_kohya[name].shape == (320, 320, 1, 1)
    match = match_adapter(_adapter(_module(name, (320, 320))), sd1)
    assert len(match.matched) == 1


def test_diffusers_names_with_and_without_unet_prefix():
    sd1 = get_architecture("sd1")
    prefixed = _module("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", (320, 320), "diffusers")
    bare = _module("mid_block.attentions.0.transformer_blocks.0.attn1.to_q", (1280, 1280), "diffusers")
    te = _module("text_encoder.text_model.encoder.layers.3.mlp.fc1", (3072, 768), "diffusers")
    match = match_adapter(_adapter(prefixed, bare, te), sd1)
    assert len(match.matched) == 3 and not match.unmatched
    assert {spec.component for _, spec in match.matched} == {"unet", "te"}


def test_sd2_fused_qkv_rows_match(tmp_path):
    arch = tiny_architecture("sd2")
    names = [f"lora_te_text_model_encoder_layers_0_self_attn_{p}_proj" for p in ("q", "k", "v")]
    path = tmp_path / "te.safetensors"
    write_synthetic_adapter(path, arch, "lora", targets=names)
    match = match_adapter(_parse(path), arch)
    assert sorted(spec.rows for _, spec in match.matched) == [(0, 32), (32, 64), (64, 96)]


def test_sdxl_both_text_encoders(tmp_path):
    arch = tiny_architecture("sdxl")
    path = tmp_path / "xl.safetensors"
    write_synthetic_adapter(path, arch, "peft", targets="attn")
    match = match_adapter(_parse(path), arch)
    assert {spec.component for _, spec in match.matched} == {"unet", "te1", "te2"}


def test_detection_fails_clearly(tmp_path):
    path = tmp_path / "sd3.safetensors"  # SD3 (MMDiT): no family yet (Flux LoRAs are recognised: tests/test_flux.py)
    save_tensors(
        path,
        {
            "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.zeros(4, 1536),
            "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.zeros(4608, 4),
        },
    )
    with pytest.raises(FormatError, match=r"no module of .*sd3\.safetensors matches SD1/SD2/SDXL/Flux.1.*joint_blocks"):
        detect_adapter_architecture(_parse(path))


def test_scaled_sd1_and_sd2_loras_told_apart_by_proj_in_form(tmp_path):
    # A LoRA keeps a layer's form: SD1's proj_in is a 1x1 conv (4-D ΔW), SD2's a linear (2-D ΔW).
    proj_in = "lora_unet_down_blocks_0_attentions_0_proj_in"
    for name in ("sd1", "sd2"):
        arch = tiny_architecture(name)
        path = tmp_path / f"{name}.safetensors"
        write_synthetic_adapter(path, arch, "lora", targets=[TO_K, proj_in], text_encoder=False)
        adapter = _parse(path)
        detected = detect_adapter_architecture(adapter)
        assert _same_family_and_modules(detected, arch, adapter)
