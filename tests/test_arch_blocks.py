"""Block ids of modules, the LBW vector forms, presets and block-weight spec parsing."""

from __future__ import annotations

import re

import pytest

from loraforge.errors import PlanError
from loraforge.formats.arch import get_architecture
from loraforge.formats.arch.block_weights import PRESETS, BlockWeightError, BlockWeights, parse_block_weights

UNET = "model.diffusion_model."
SD1, SD2, SDXL = get_architecture("sd1"), get_architecture("sd2"), get_architecture("sdxl")


def _ldm_head(key: str) -> str:
    """'input_blocks.4' / 'middle_block' / 'out' / ... of a UNet key."""
    parts = key.removeprefix(UNET).split(".")
    return ".".join(parts[:2]) if parts[0] in ("input_blocks", "output_blocks") else parts[0]


def _modules_in(arch, blocks) -> set[str]:
    return {m.kohya for m in arch.modules if m.block in blocks}


# --- block ids of modules -------------------------------------------------------------------

@pytest.mark.parametrize("arch, last_out", [(SD1, 11), (SD2, 11), (SDXL, 8)])
def test_block_ids_follow_ldm_positions(arch, last_out):
    for module in arch.modules:
        if module.is_text_encoder:
            assert module.block == "BASE"
            continue
        head = _ldm_head(module.key)
        if head.startswith("input_blocks."):
            expected = f"IN{int(head.split('.')[1]):02d}"
        elif head.startswith("output_blocks."):
            expected = f"OUT{int(head.split('.')[1]):02d}"
        else:
            expected = {"middle_block": "M00", "time_embed": "IN00", "label_emb": "IN00", "out": f"OUT{last_out:02d}"}[head]
        assert module.block == expected, module.key


@pytest.mark.parametrize("arch", [SD1, SD2, SDXL])
def test_every_block_of_the_full_form_has_modules_and_no_module_is_outside(arch):
    blocks = {m.block for m in arch.modules}
    assert blocks == set(arch.full_block_form)


def test_forms_are_the_lbw_forms():
    assert SD1.block_forms[26] == ("BASE",) + tuple(f"IN{i:02d}" for i in range(12)) + ("M00",) + tuple(
        f"OUT{i:02d}" for i in range(12))
    assert SD1.block_forms[17] == ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04",
                                   "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11")
    assert SD2.block_forms == SD1.block_forms
    assert SDXL.block_forms[20] == ("BASE",) + tuple(f"IN{i:02d}" for i in range(9)) + ("M00",) + tuple(
        f"OUT{i:02d}" for i in range(9))
    assert SDXL.block_forms[12] == ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03",
                                    "OUT04", "OUT05")
    assert SD1.full_block_form == SD1.block_forms[26] and SDXL.full_block_form == SDXL.block_forms[20]


def _selected_by_rule(arch, heads: set[str]) -> set[str]:
    return {m.kohya for m in arch.modules if m.is_text_encoder or _ldm_head(m.key) in heads}


@pytest.mark.parametrize("arch", [SD1, SD2])
def test_sd_17_form_selects_the_transformer_levels_and_conv_out(arch):
    heads = {f"input_blocks.{i}" for i in (1, 2, 4, 5, 7, 8)} | {"middle_block", "out"}
    heads |= {f"output_blocks.{i}" for i in range(3, 12)}
    assert _modules_in(arch, arch.block_forms[17]) == _selected_by_rule(arch, heads)
    # Every attention module of the UNet is in the 17-value form.
    attention = {m.kohya for m in arch.modules if "transformer_blocks" in m.key}
    assert attention <= _modules_in(arch, arch.block_forms[17])


@pytest.mark.parametrize("arch", [SD1, SD2])
def test_sd_26_form_selects_every_module(arch):
    assert _modules_in(arch, arch.block_forms[26]) == {m.kohya for m in arch.modules}


def test_sdxl_12_form_selects_the_transformer_levels():
    heads = {f"input_blocks.{i}" for i in (4, 5, 7, 8)} | {"middle_block"} | {f"output_blocks.{i}" for i in range(6)}
    assert _modules_in(SDXL, SDXL.block_forms[12]) == _selected_by_rule(SDXL, heads)
    attention = {m.kohya for m in SDXL.modules if "transformer_blocks" in m.key}
    assert attention <= _modules_in(SDXL, SDXL.block_forms[12])


def test_sdxl_20_form_selects_every_module():
    assert _modules_in(SDXL, SDXL.block_forms[20]) == {m.kohya for m in SDXL.modules}


def test_required_block_examples():
    assert SD1.module_by_kohya["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"].block == "IN04"
    assert SDXL.module_by_kohya["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"].block == "IN04"
    assert SD1.module_by_kohya["lora_unet_conv_in"].block == "IN00"
    assert SD1.module_by_kohya["lora_unet_time_embedding_linear_1"].block == "IN00"
    assert SD1.module_by_kohya["lora_unet_conv_out"].block == "OUT11"
    assert SD1.module_by_kohya["lora_unet_up_blocks_0_upsamplers_0_conv"].block == "OUT02"
    assert SDXL.module_by_kohya["lora_unet_label_emb_0_2"].block == "IN00"
    assert SDXL.module_by_kohya["lora_unet_out_2"].block == "OUT08"
    for arch in (SD1, SD2, SDXL):
        assert {m.block for m in arch.modules if m.is_text_encoder} == {"BASE"}


# --- presets ----------------------------------------------------------------------------------

# The LoRA Block Weight extension's default presets, 17 values each.
LBW_PRESETS = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
}


def test_presets_are_the_lbw_vectors():
    assert set(PRESETS) == set(LBW_PRESETS)
    for name, text in LBW_PRESETS.items():
        assert PRESETS[name] == tuple(float(v) for v in text.split(","))


@pytest.mark.parametrize("name", list(LBW_PRESETS))
@pytest.mark.parametrize("arch", [SD1, SD2])
def test_each_preset_on_sd(name, arch):
    weights = parse_block_weights(name, arch)
    expected = dict(zip(arch.block_forms[17], (float(v) for v in LBW_PRESETS[name].split(","))))
    assert dict(weights.weights) == expected
    assert not weights.covers("IN00") and not weights.covers("OUT00")
    assert weights == parse_block_weights(name.lower(), arch)


def test_preset_ind_selects_the_deep_input_blocks():
    weights = parse_block_weights("IND", SD1)
    assert [b for b, w in weights.weights.items() if w == 1.0] == ["BASE", "IN05", "IN07", "IN08"]


@pytest.mark.parametrize("name, value", [("ALL", 1.0), ("NONE", 0.0), ("ALL0.5", 0.5)])
def test_uniform_presets_carry_over_to_sdxl_short_form(name, value):
    weights = parse_block_weights(name, SDXL)
    assert dict(weights.weights) == dict.fromkeys(SDXL.block_forms[12], value)
    assert not weights.covers("IN00")


@pytest.mark.parametrize("name", ["INS", "IND", "INALL", "MIDD", "OUTD", "OUTS", "OUTALL"])
def test_positional_presets_are_refused_for_sdxl(name):
    with pytest.raises(BlockWeightError, match=rf"preset {name} is defined for the 17 blocks.*NONE, ALL, ALL0.5"):
        parse_block_weights(name, SDXL)


# --- vectors, mappings, defaults ---------------------------------------------------------------

def test_none_means_every_block_one():
    for arch in (SD1, SDXL):
        weights = parse_block_weights(None, arch)
        assert dict(weights.weights) == dict.fromkeys(arch.full_block_form, 1.0)


@pytest.mark.parametrize("arch, length", [(SD1, 17), (SD1, 26), (SD2, 17), (SD2, 26), (SDXL, 12), (SDXL, 20)])
def test_vectors_of_each_valid_length(arch, length):
    values = [round(0.1 * i, 1) for i in range(length)]
    from_list = parse_block_weights(values, arch)
    from_text = parse_block_weights(", ".join(str(v) for v in values), arch)
    assert dict(from_list.weights) == dict(zip(arch.block_forms[length], values))
    assert from_text == from_list
    for block, value in zip(arch.block_forms[length], values):
        assert from_list.weight(block) == value


def test_mapping_with_ranges_and_default():
    weights = parse_block_weights({"default": 0, "IN04": 0.5, "OUT03-OUT06": 1}, SD1)
    expected = dict.fromkeys(SD1.full_block_form, 0.0) | {"IN04": 0.5, "OUT03": 1.0, "OUT04": 1.0, "OUT05": 1.0, "OUT06": 1.0}
    assert dict(weights.weights) == expected
    assert list(weights.weights) == list(SD1.full_block_form)
    assert weights.weight("IN00") == 0.0


def test_mapping_without_default_covers_only_named_blocks():
    weights = parse_block_weights({"BASE": 0.25, "in07-in08": 2, "M00": -1}, SDXL)
    assert dict(weights.weights) == {"BASE": 0.25, "IN07": 2.0, "IN08": 2.0, "M00": -1.0}
    assert weights.covers("IN07") and not weights.covers("IN06")
    with pytest.raises(BlockWeightError, match="IN06"):
        weights.weight("IN06")


def test_single_block_range_and_numeric_strings():
    weights = parse_block_weights({"OUT05-OUT05": "0.75"}, SD1)
    assert dict(weights.weights) == {"OUT05": 0.75}


def test_block_weights_is_hashable_and_immutable():
    weights = parse_block_weights("ALL", SD1)
    assert hash(weights) == hash(parse_block_weights("ALL", SD1))
    with pytest.raises(TypeError):
        weights.weights["BASE"] = 3.0  # type: ignore[index]
    assert isinstance(weights, BlockWeights)


def test_short_form_and_an_uncovered_block_explain_the_fix():
    weights = parse_block_weights([1.0] * 17, SD1)
    with pytest.raises(BlockWeightError) as info:
        weights.weight("IN00")
    message = str(info.value)
    assert "IN00" in message and "26-value form" in message and "mapping" in message
    assert isinstance(info.value, PlanError)


# --- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "spec, arch, pattern",
    [
        ([1.0] * 16, SD1, r"must have 26 or 17 values; this one has 16"),
        ([1.0] * 17, SDXL, r"must have 20 or 12 values; this one has 17"),
        ("1,1,1", SD2, r"must have 26 or 17 values; this one has 3"),
        ([1.0] * 26, SDXL, r"must have 20 or 12 values; this one has 26"),
        ("FOO", SD1, r"Unknown block-weight preset 'FOO'. Presets: NONE, ALL"),
        ({"IN12": 1}, SD1, r"Unknown block id 'IN12'.*Valid block ids: BASE, IN00"),
        ({"IN09": 1}, SDXL, r"Unknown block id 'IN09'"),
        ({"OUT06-OUT03": 1}, SD1, r"runs backwards; write it as 'OUT03-OUT06'"),
        ({"IN05-OUT05": 1}, SD1, r"crosses from IN to OUT.*'IN05-IN11' and 'OUT00-OUT05'"),
        ({"IN04": "half"}, SD1, r"'half', which is not a number"),
        ({"IN04": True}, SD1, r"must be a number"),
        ({"IN04": float("nan")}, SD1, r"finite"),
        ([1.0] * 16 + ["x"], SD1, r"position 17 .* 'x', which is not a number"),
        ("1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,oops", SD1, r"'oops', which is not a number"),
        ({"IN04": 1, "IN03-IN05": 0}, SD1, r"Block IN04 is given twice"),
        (3, SD1, r"must be a preset name, a list of numbers.*got 3 \(int\)"),
    ],
)
def test_spec_errors(spec, arch, pattern):
    with pytest.raises(BlockWeightError, match=pattern):
        parse_block_weights(spec, arch)


def test_error_messages_are_one_paragraph():
    with pytest.raises(BlockWeightError) as info:
        parse_block_weights([0.5] * 5, SD1)
    assert "\n" not in str(info.value)
    assert re.search(r"BASE, IN00, .* OUT11", str(info.value))
