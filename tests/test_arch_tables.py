"""Architecture tables: key lists, shapes, module names and the LDM <-> diffusers rules."""

from __future__ import annotations

import math
import re
import time

import pytest

from loraforge.errors import LoraforgeError
from loraforge.formats.arch import ARCHITECTURE_NAMES, COMPONENTS, get_architecture, get_config
from loraforge.formats.arch import sdxl
from loraforge.formats.arch.family import assemble
from loraforge.formats.arch.unet import RESNET_RENAMES, diffusers_to_ldm, ldm_to_diffusers, unit_map
from loraforge.testing.arch import TINY, architecture_at, tiny_architecture

# The Stable Diffusion families (UNet, LDM naming); Flux has its own table tests (tests/test_flux.py).
SD_NAMES = tuple(n for n in ARCHITECTURE_NAMES if n != "flux")
ALL_TABLES = [(name, size) for name in SD_NAMES for size in ("full", "tiny")]
UNET = "model.diffusion_model."


def unet_params(arch) -> int:
    return sum(math.prod(t.shape) for t in arch.tensors if t.component == "unet")


# --- counts and spot values known from the released models ------------------------------------

@pytest.mark.parametrize(
    "name, counts",
    [
        ("sd1", {"unet": 686, "te": 197, "vae": 248, "other": 14}),
        ("sd2", {"unet": 686, "te": 294, "vae": 248, "other": 12}),
        ("sdxl", {"unet": 1680, "te1": 197, "te2": 390, "vae": 248}),
    ],
)
def test_tensor_counts_per_component(name, counts):
    for size in ("full", "tiny"):
        arch = architecture_at(name, size)
        seen = {}
        for tensor in arch.tensors:
            seen[tensor.component] = seen.get(tensor.component, 0) + 1
        assert seen == counts


def test_total_key_counts():
    assert len(get_architecture("sd1").tensors) == 1145
    assert len(get_architecture("sd2").tensors) == 1240
    assert len(get_architecture("sdxl").tensors) == 2515


def test_unet_parameter_counts_match_the_released_models():
    # SD1.5 UNet: 859,520,964 parameters; SD2.x: 865,910,724; SDXL base: 2,567,463,684.
    assert unet_params(get_architecture("sd1")) == 859_520_964
    assert unet_params(get_architecture("sd2")) == 865_910_724
    assert unet_params(get_architecture("sdxl")) == 2_567_463_684


@pytest.mark.parametrize(
    "name, key, shape",
    [
        ("sd1", UNET + "input_blocks.4.0.skip_connection.weight", (640, 320, 1, 1)),
        ("sd1", UNET + "input_blocks.1.1.proj_in.weight", (320, 320, 1, 1)),
        ("sd1", UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", (320, 768)),
        ("sd1", UNET + "output_blocks.8.0.skip_connection.weight", (640, 960, 1, 1)),
        ("sd1", UNET + "output_blocks.2.1.conv.weight", (1280, 1280, 3, 3)),
        ("sd1", UNET + "time_embed.0.weight", (1280, 320)),
        ("sd1", UNET + "out.2.weight", (4, 320, 3, 3)),
        ("sd1", "cond_stage_model.transformer.text_model.embeddings.position_ids", (1, 77)),
        ("sd1", "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", (49408, 768)),
        ("sd1", "first_stage_model.decoder.up.1.block.0.nin_shortcut.weight", (256, 512, 1, 1)),
        ("sd1", "first_stage_model.encoder.conv_out.weight", (8, 512, 3, 3)),
        ("sd1", "first_stage_model.quant_conv.weight", (8, 8, 1, 1)),
        ("sd1", "alphas_cumprod", (1000,)),
        ("sd1", "model_ema.num_updates", ()),
        ("sd2", UNET + "input_blocks.1.1.proj_in.weight", (320, 320)),
        ("sd2", UNET + "middle_block.1.transformer_blocks.0.attn2.to_v.weight", (1280, 1024)),
        ("sd2", "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight", (3072, 1024)),
        ("sd2", "cond_stage_model.model.transformer.resblocks.23.mlp.c_fc.weight", (4096, 1024)),
        ("sd2", "cond_stage_model.model.text_projection", (1024, 1024)),
        ("sd2", "cond_stage_model.model.logit_scale", ()),
        ("sdxl", UNET + "label_emb.0.0.weight", (1280, 2816)),
        ("sdxl", UNET + "input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight", (1280, 2048)),
        ("sdxl", UNET + "input_blocks.4.1.proj_in.weight", (640, 640)),
        ("sdxl", UNET + "output_blocks.2.2.conv.weight", (1280, 1280, 3, 3)),
        ("sdxl", UNET + "output_blocks.5.2.conv.weight", (640, 640, 3, 3)),
        ("sdxl", UNET + "input_blocks.6.0.op.weight", (640, 640, 3, 3)),
        ("sdxl", UNET + "middle_block.1.transformer_blocks.9.ff.net.0.proj.weight", (10240, 1280)),
        ("sdxl", "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc1.weight", (3072, 768)),
        ("sdxl", "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight", (3840, 1280)),
        ("sdxl", "conditioner.embedders.1.model.text_projection", (1280, 1280)),
        ("sdxl", "conditioner.embedders.1.model.token_embedding.weight", (49408, 1280)),
    ],
)
def test_spot_shapes_from_the_released_models(name, key, shape):
    assert get_architecture(name).tensor_by_key[key].shape == shape


def test_dtypes():
    sd1, sdxl = get_architecture("sd1"), get_architecture("sdxl")
    assert sd1.tensor_by_key["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == "I64"
    assert sd1.tensor_by_key["model_ema.num_updates"].dtype == "I32"
    assert sd1.tensor_by_key[UNET + "out.2.weight"].dtype == "F32"
    assert sdxl.tensor_by_key[UNET + "out.2.weight"].dtype == "F16"
    assert sdxl.tensor_by_key["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"].dtype == "I64"


def test_sdxl_has_no_unet_attention_at_the_first_level():
    keys = get_architecture("sdxl").tensor_by_key
    assert not any(k.startswith(UNET + "input_blocks.1.1.") for k in keys)
    assert not any(k.startswith(UNET + "input_blocks.9.") for k in keys)
    assert not any(k.startswith(UNET + "output_blocks.6.1.") for k in keys)


# --- structure of every table -----------------------------------------------------------------

@pytest.mark.parametrize("name, size", ALL_TABLES)
def test_every_key_is_unique_and_has_a_component(name, size):
    arch = architecture_at(name, size)
    assert len(arch.tensor_by_key) == len(arch.tensors)
    for tensor in arch.tensors:
        assert tensor.component in COMPONENTS
        prefix = {"unet": UNET, "vae": "first_stage_model."}.get(tensor.component)
        if prefix:
            assert tensor.key.startswith(prefix)


@pytest.mark.parametrize("name, size", ALL_TABLES)
def test_module_shapes_equal_their_tensor_or_slice(name, size):
    arch = architecture_at(name, size)
    for module in arch.modules:
        weight = arch.tensor_by_key[module.key]
        assert module.component == weight.component and module.component not in ("vae", "other")
        if module.rows is None:
            assert module.shape == weight.shape
        else:
            start, stop = module.rows
            assert 0 <= start < stop <= weight.shape[0]
            assert module.shape == (stop - start,) + weight.shape[1:]
        assert len(module.shape) in (2, 4)
        if module.bias_key is not None:
            assert arch.tensor_by_key[module.bias_key].shape[0] == weight.shape[0]


@pytest.mark.parametrize("name, size", ALL_TABLES)
def test_every_linear_and_conv_weight_of_unet_and_text_encoders_is_a_target(name, size):
    arch = architecture_at(name, size)
    targeted = {m.key for m in arch.modules}
    for tensor in arch.tensors:
        is_weight = tensor.key.endswith("weight") and len(tensor.shape) in (2, 4)
        is_embedding = "embedding" in tensor.key
        if tensor.component in ("unet", "te", "te1", "te2") and is_weight and not is_embedding:
            assert tensor.key in targeted, tensor.key
    # ... and nothing else is.
    assert all(arch.tensor_by_key[k].component not in ("vae", "other") for k in targeted)


@pytest.mark.parametrize("name, size", ALL_TABLES)
def test_kohya_names_are_a_bijection_with_key_and_rows(name, size):
    arch = architecture_at(name, size)
    by_target = {(m.key, m.rows): m.kohya for m in arch.modules}
    assert len(by_target) == len(arch.modules) == len(arch.module_by_kohya)
    for module in arch.modules:
        assert arch.module_by_kohya[module.kohya] is module
        assert by_target[(module.key, module.rows)] == module.kohya
        assert re.fullmatch(r"lora_(unet|te|te1|te2)_[a-z0-9_]+", module.kohya)


@pytest.mark.parametrize("name, size", ALL_TABLES)
def test_diffusers_names_are_unique_and_agree_with_kohya(name, size):
    arch = architecture_at(name, size)
    assert len(arch.module_by_diffusers) == len(arch.modules)
    te_prefixes = {"te": ("text_encoder.", "lora_te_"), "te1": ("text_encoder.", "lora_te1_"),
                   "te2": ("text_encoder_2.", "lora_te2_")}
    config = get_config(name, TINY[name] if size == "tiny" else None).unet
    for module in arch.modules:
        assert arch.module_by_diffusers[module.diffusers] is module
        if module.component == "unet":
            path = module.diffusers.removeprefix("unet.")
            ldm = diffusers_to_ldm(config, path)
            assert UNET + ldm + ".weight" == module.key
            kohya_path = ldm if name == "sdxl" else path
            assert module.kohya == "lora_unet_" + kohya_path.replace(".", "_")
        else:
            component_prefix, kohya_prefix = te_prefixes[module.component]
            path = module.diffusers.removeprefix(component_prefix)
            assert module.kohya == kohya_prefix + path.replace(".", "_")
            assert re.fullmatch(r"text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])", path)


@pytest.mark.parametrize("name", SD_NAMES)
def test_tiny_has_the_same_keys_and_modules_with_smaller_shapes(name):
    full, tiny = get_architecture(name), tiny_architecture(name)
    assert [t.key for t in tiny.tensors] == [t.key for t in full.tensors]
    assert [(m.kohya, m.diffusers, m.key, m.block) for m in tiny.modules] == [
        (m.kohya, m.diffusers, m.key, m.block) for m in full.modules
    ]
    assert sum(math.prod(t.shape) for t in tiny.tensors) * 100 < sum(math.prod(t.shape) for t in full.tensors)
    assert tiny.block_forms == full.block_forms


def test_tiny_sd1_and_tiny_sd2_differ_by_shapes():
    sd1, sd2 = tiny_architecture("sd1"), tiny_architecture("sd2")
    key = UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert sd1.tensor_by_key[key].shape != sd2.tensor_by_key[key].shape
    proj = UNET + "input_blocks.1.1.proj_in.weight"
    assert len(sd1.tensor_by_key[proj].shape) == 4 and len(sd2.tensor_by_key[proj].shape) == 2


# --- the required name examples --------------------------------------------------------------

def test_sd1_kohya_example():
    module = get_architecture("sd1").module_by_kohya["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"]
    assert module.key == UNET + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    assert module.block == "IN04"
    assert module.diffusers == "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert module.bias_key is None


def test_sdxl_kohya_example():
    module = get_architecture("sdxl").module_by_kohya["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"]
    assert module.key == UNET + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    assert module.block == "IN04"
    assert module.diffusers == "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.mark.parametrize(
    "name, kohya, key, diffusers",
    [
        ("sd1", "lora_unet_down_blocks_0_resnets_0_conv1", "input_blocks.1.0.in_layers.2", "down_blocks.0.resnets.0.conv1"),
        ("sd1", "lora_unet_down_blocks_1_resnets_0_conv_shortcut", "input_blocks.4.0.skip_connection", "down_blocks.1.resnets.0.conv_shortcut"),
        ("sd1", "lora_unet_down_blocks_2_downsamplers_0_conv", "input_blocks.9.0.op", "down_blocks.2.downsamplers.0.conv"),
        ("sd1", "lora_unet_up_blocks_0_upsamplers_0_conv", "output_blocks.2.1.conv", "up_blocks.0.upsamplers.0.conv"),
        ("sd1", "lora_unet_up_blocks_3_attentions_2_proj_out", "output_blocks.11.1.proj_out", "up_blocks.3.attentions.2.proj_out"),
        ("sd1", "lora_unet_mid_block_resnets_1_time_emb_proj", "middle_block.2.emb_layers.1", "mid_block.resnets.1.time_emb_proj"),
        ("sd1", "lora_unet_time_embedding_linear_2", "time_embed.2", "time_embedding.linear_2"),
        ("sd1", "lora_unet_conv_in", "input_blocks.0.0", "conv_in"),
        ("sd1", "lora_unet_conv_out", "out.2", "conv_out"),
        ("sdxl", "lora_unet_label_emb_0_0", "label_emb.0.0", "add_embedding.linear_1"),
        ("sdxl", "lora_unet_input_blocks_1_0_in_layers_2", "input_blocks.1.0.in_layers.2", "down_blocks.0.resnets.0.conv1"),
        ("sdxl", "lora_unet_output_blocks_2_2_conv", "output_blocks.2.2.conv", "up_blocks.0.upsamplers.0.conv"),
        ("sdxl", "lora_unet_output_blocks_8_0_skip_connection", "output_blocks.8.0.skip_connection", "up_blocks.2.resnets.2.conv_shortcut"),
        ("sdxl", "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2", "middle_block.1.transformer_blocks.9.ff.net.2", "mid_block.attentions.0.transformer_blocks.9.ff.net.2"),
        ("sdxl", "lora_unet_out_2", "out.2", "conv_out"),
    ],
)
def test_unet_name_examples(name, kohya, key, diffusers):
    module = get_architecture(name).module_by_kohya[kohya]
    assert module.key == UNET + key + ".weight"
    assert module.diffusers == "unet." + diffusers


def test_openclip_fused_qkv_are_row_slices():
    arch = get_architecture("sd2")
    fused = "cond_stage_model.model.transformer.resblocks.5.attn.in_proj_weight"
    for n, proj in enumerate(("q", "k", "v")):
        module = arch.module_by_kohya[f"lora_te_text_model_encoder_layers_5_self_attn_{proj}_proj"]
        assert (module.key, module.rows, module.shape) == (fused, (1024 * n, 1024 * (n + 1)), (1024, 1024))
        assert module.bias_key == "cond_stage_model.model.transformer.resblocks.5.attn.in_proj_bias"
    xl = get_architecture("sdxl")
    fc1 = xl.module_by_diffusers["text_encoder_2.text_model.encoder.layers.31.mlp.fc1"]
    assert (fc1.kohya, fc1.key, fc1.shape) == (
        "lora_te2_text_model_encoder_layers_31_mlp_fc1",
        "conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_fc.weight",
        (5120, 1280),
    )
    out = xl.module_by_kohya["lora_te2_text_model_encoder_layers_0_self_attn_out_proj"]
    assert out.key == "conditioner.embedders.1.model.transformer.resblocks.0.attn.out_proj.weight"
    te1 = xl.module_by_kohya["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"]
    assert te1.key == "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    assert te1.diffusers == "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"


# --- the LDM <-> diffusers rule table -------------------------------------------------------------

def _reference_unit_pairs(levels: int, attention_levels: set[int]) -> dict[str, str]:
    """The mapping as the diffusers single-file conversion describes it, written out independently."""
    pairs = {"input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
             "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "middle_block.0": "mid_block.resnets.0", "middle_block.1": "mid_block.attentions.0",
             "middle_block.2": "mid_block.resnets.1"}
    for i in range(levels):
        for j in range(2):
            pairs[f"input_blocks.{3 * i + j + 1}.0"] = f"down_blocks.{i}.resnets.{j}"
            if i in attention_levels:
                pairs[f"input_blocks.{3 * i + j + 1}.1"] = f"down_blocks.{i}.attentions.{j}"
        if i < levels - 1:
            pairs[f"input_blocks.{3 * (i + 1)}.0.op"] = f"down_blocks.{i}.downsamplers.0.conv"
    for i in range(levels):
        level = levels - 1 - i
        for j in range(3):
            pairs[f"output_blocks.{3 * i + j}.0"] = f"up_blocks.{i}.resnets.{j}"
            if level in attention_levels:
                pairs[f"output_blocks.{3 * i + j}.1"] = f"up_blocks.{i}.attentions.{j}"
        if level > 0:
            position = 2 if level in attention_levels else 1
            pairs[f"output_blocks.{3 * i + 2}.{position}.conv"] = f"up_blocks.{i}.upsamplers.0.conv"
    return pairs


@pytest.mark.parametrize("name, levels, attention_levels", [("sd1", 4, {0, 1, 2}), ("sd2", 4, {0, 1, 2}), ("sdxl", 3, {1, 2})])
def test_unit_map_equals_the_reference_rules(name, levels, attention_levels):
    config = get_config(name).unet
    expected = _reference_unit_pairs(levels, attention_levels)
    if name == "sdxl":
        expected |= {"label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"}
    assert {u.ldm: u.diffusers for u in unit_map(config)} == expected


@pytest.mark.parametrize("name", SD_NAMES)
def test_every_unet_key_round_trips_through_diffusers_naming(name):
    config = get_config(name).unet
    seen = set()
    for tensor in get_architecture(name).tensors:
        if tensor.component != "unet":
            continue
        layer, _, suffix = tensor.key.removeprefix(UNET).rpartition(".")
        diffusers = ldm_to_diffusers(config, layer)
        assert diffusers_to_ldm(config, diffusers) == layer
        seen.add(diffusers + "." + suffix)
    assert len(seen) == sum(1 for t in get_architecture(name).tensors if t.component == "unet")


def test_resnet_renames_are_one_to_one():
    assert len({ldm for ldm, _ in RESNET_RENAMES}) == len({d for _, d in RESNET_RENAMES}) == len(RESNET_RENAMES)


def test_unknown_paths_raise_key_error():
    config = get_config("sd1").unet
    with pytest.raises(KeyError):
        ldm_to_diffusers(config, "not_a_block.0")
    with pytest.raises(KeyError):
        diffusers_to_ldm(config, "down_blocks.9.resnets.0")


# --- registry ---------------------------------------------------------------------------------

def test_get_architecture_is_cached_and_fast():
    start = time.perf_counter()
    built = assemble(sdxl.config(dict(sdxl.FAMILY.full)))  # uncached build of the largest table
    assert time.perf_counter() - start < 1.0
    first = get_architecture("sdxl")
    assert built == first
    assert get_architecture("sdxl") is first
    assert get_architecture("sdxl", dict(sdxl.FAMILY.full)) is first
    assert get_architecture("sdxl", {"model_channels": 320}) is first


def test_metadata_fields():
    assert [get_architecture(n).ss_base_model_version for n in SD_NAMES] == ["sd_v1", "sd_v2", "sdxl_base_v1-0"]
    assert get_architecture("sdxl").modelspec_architecture == "stable-diffusion-xl-v1-base"
    assert [get_architecture(n).modelspec_implementation for n in SD_NAMES] == [
        "https://github.com/CompVis/stable-diffusion",
        "https://github.com/Stability-AI/stablediffusion",
        "https://github.com/Stability-AI/generative-models",
    ]
    assert [get_architecture(n).ss_v2 for n in SD_NAMES] == [False, True, False]
    assert get_architecture("sd1").size == "full"
    assert tiny_architecture("sd1").size == "scaled"
    assert tiny_architecture("sd1").dimensions_text == "model channels 16, context 24, vocab 64, vae channels 8"


def test_unknown_architecture_and_dimension_are_user_errors():
    with pytest.raises(LoraforgeError, match=r"Unknown architecture 'sd4'.*sd1, sd2, sdxl, flux"):
        get_architecture("sd4")
    with pytest.raises(LoraforgeError, match=r"sd1 has no dimension huge; its dimensions are model_channels, context"):
        get_architecture("sd1", {"huge": 1})


def test_module_kind_helpers():
    sd1 = get_architecture("sd1")
    assert sd1.module_by_kohya["lora_unet_conv_in"].is_conv
    assert not sd1.module_by_kohya["lora_unet_time_embedding_linear_1"].is_conv
    assert sd1.module_by_kohya["lora_te_text_model_encoder_layers_0_mlp_fc1"].is_text_encoder


def test_generator_guards_reject_unknown_inputs():
    from dataclasses import replace

    from loraforge.formats.arch._builder import TableBuilder
    from loraforge.formats.arch.text_encoders import build_text_encoder
    from loraforge.formats.arch.unet import ldm_block_id

    with pytest.raises(ValueError, match="unknown text encoder naming"):
        build_text_encoder(TableBuilder("F32"), replace(get_config("sd1").text_encoders[0], naming="t6"))
    with pytest.raises(ValueError, match="not a UNet path"):
        ldm_block_id("decoder.up.0", 11)
