"""Named Flux block-weight presets (issue 15, item 3).

The expected vectors are written out here by position in the LoRA Block Weight
extension's 61-value Flux order (CLIP, T5, IN, D00-D18, S00-S37, OUT;
hako-mikan/sd-webui-lora-block-weight, scripts/lora_block_weight.py
BLOCKIDFLUX), not derived from loraforge's tables. FLUXALL is that extension's
own Flux preset (DEF_WEIGHT_PRESET: 61 ones); DOUBLES, SINGLES and NOTEXT are
loraforge's (docs/architectures.md).
"""

from __future__ import annotations

import pytest
import torch
from test_flux import DeltaSet, _bake, _f64, _read, base_path  # noqa: F401  (fixture)

from loraforge.formats.arch import get_architecture, parse_block_weights
from loraforge.formats.arch.block_weights import PRESETS, BlockWeightError
from loraforge.testing.arch import tiny_architecture

FULL = get_architecture("flux")
TINY = tiny_architecture("flux")  # 2 double blocks, 3 single blocks: 9 values

LBW_FLUX_IDS = ["CLIP", "T5", "IN"] + [f"D{i:02d}" for i in range(19)] + [f"S{i:02d}" for i in range(38)] + ["OUT"]

FULL_VECTORS = {
    "FLUXALL": "1," * 60 + "1",
    "DOUBLES": "0,0,0," + "1," * 19 + "0," * 38 + "0",
    "SINGLES": "0,0,0," + "0," * 19 + "1," * 38 + "0",
    "NOTEXT": "0,0," + "1," * 58 + "1",
    "ALL": "1," * 60 + "1",
    "NONE": "0," * 60 + "0",
    "ALL0.5": "0.5," * 60 + "0.5",
}
TINY_VECTORS = {  # CLIP, T5, IN, D00, D01, S00, S01, S02, OUT
    "FLUXALL": [1, 1, 1, 1, 1, 1, 1, 1, 1],
    "DOUBLES": [0, 0, 0, 1, 1, 0, 0, 0, 0],
    "SINGLES": [0, 0, 0, 0, 0, 1, 1, 1, 0],
    "NOTEXT": [0, 0, 1, 1, 1, 1, 1, 1, 1],
}


def test_the_full_form_is_the_extensions_order():
    assert list(FULL.full_block_form) == LBW_FLUX_IDS and len(LBW_FLUX_IDS) == 61


@pytest.mark.parametrize("name", sorted(FULL_VECTORS))
def test_each_preset_is_its_61_value_vector(name):
    expected = [float(v) for v in FULL_VECTORS[name].split(",")]
    assert len(expected) == 61
    weights = parse_block_weights(name, FULL)
    assert list(weights.weights) == LBW_FLUX_IDS
    assert list(weights.weights.values()) == expected
    assert weights == parse_block_weights(name.lower(), FULL)  # names are case-insensitive
    assert dict(weights.weights) == dict(parse_block_weights(FULL_VECTORS[name], FULL).weights)


@pytest.mark.parametrize("name", sorted(TINY_VECTORS))
def test_presets_fit_a_scaled_model_with_other_block_counts(name):
    weights = parse_block_weights(name, TINY)
    assert list(weights.weights) == ["CLIP", "T5", "IN", "D00", "D01", "S00", "S01", "S02", "OUT"]
    assert list(weights.weights.values()) == [float(v) for v in TINY_VECTORS[name]]


def test_flux_presets_are_not_sd_presets():
    # The SD presets table stays the extension's 17-value one; Flux's are kept apart.
    assert not {"FLUXALL", "DOUBLES", "SINGLES", "NOTEXT"} & set(PRESETS)


@pytest.mark.parametrize("name", ["INS", "IND", "INALL", "MIDD", "OUTD", "OUTS", "OUTALL"])
def test_sd_presets_are_refused_on_flux_with_the_valid_ones(name):
    with pytest.raises(BlockWeightError) as caught:
        parse_block_weights(name, FULL)
    message = str(caught.value)
    assert f"preset {name} is defined for the 17 blocks of SD 1.x/2.x" in message
    assert "no UNet levels (its blocks are CLIP, T5, IN, D00-D18, S00-S37, OUT)" in message
    assert "Presets valid for Flux.1 dev: NONE, ALL, ALL0.5, FLUXALL, DOUBLES, SINGLES, NOTEXT" in message
    assert "61 numbers" in message


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("name", ["FLUXALL", "DOUBLES", "SINGLES", "NOTEXT"])
def test_flux_presets_are_refused_on_sd(arch, name):
    sd = get_architecture(arch)
    with pytest.raises(BlockWeightError, match=rf"preset {name} is defined for the blocks of Flux.1 and has no meaning for {sd.title}"):
        parse_block_weights(name, sd)


def test_an_unknown_preset_lists_the_flux_ones():
    with pytest.raises(BlockWeightError, match=r"Unknown block-weight preset 'DOUBLE'. Presets: NONE, ALL, ALL0.5, FLUXALL, DOUBLES, SINGLES, NOTEXT"):
        parse_block_weights("DOUBLE", FULL)


def test_doubles_preset_in_a_bake_changes_only_the_double_blocks(tmp_path, base_path):  # noqa: F811
    deltas = DeltaSet(rank=2, seed=19)
    out = _bake(tmp_path, base_path, lambda p: deltas.kohya_file(p), blocks="DOUBLES", strength=1.0)
    got, base = _read(out), _read(base_path)
    touched = 0
    for key, delta in deltas.expected_deltas().items():
        weight = 1.0 if ".double_blocks." in key else 0.0
        touched += weight == 1.0
        want = (_f64(base[key]) + weight * delta).to(torch.bfloat16) if weight else base[key]
        assert torch.equal(got[key].view(torch.int16), want.view(torch.int16)), key
    assert touched and touched < len(deltas.expected_deltas())
