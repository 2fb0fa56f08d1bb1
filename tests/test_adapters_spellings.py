"""Spellings current producers write (issue 14), without the producers: the interop layer (tests/interop)
checks the same files made by diffusers, PEFT and LyCORIS themselves.

Names: transformers ≥ 5 text-encoder paths (no ``text_model``), ``lora_te1_``
on a one-encoder model, diffusers-named kohya UNet modules on SDXL (and
LDM-named on SD 1.x); keys: ``.lora_linear_layer.down/up.weight``; integer
alphas; the DoRA magnitude's layout.
"""

from __future__ import annotations

import pytest
import torch

from loraforge.errors import FormatError
from loraforge.formats.adapters import load_factors, module_effective_delta, parse_adapter
from loraforge.formats.adapters.matching import find_spec, match_adapter
from loraforge.formats.safetensors_reader import open_safetensors
from loraforge.formats.safetensors_writer import save_tensors
from loraforge.ops import deltas
from loraforge.testing.arch import tiny_architecture

SD1 = tiny_architecture("sd1")
SDXL = tiny_architecture("sdxl")


def _parse(tmp_path, tensors, metadata=None):
    path = tmp_path / "adapter.safetensors"
    save_tensors(path, tensors, metadata)
    with open_safetensors(path) as file:
        return parse_adapter(file)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _lora(name, out, cin, kernel=(), rank=2, suffixes=("lora_down.weight", "lora_up.weight"), alpha=None):
    tensors = {
        f"{name}.{suffixes[0]}": _randn(rank, cin, *kernel, seed=1),
        f"{name}.{suffixes[1]}": _randn(out, rank, *((1, 1) if kernel else ()), seed=2),
    }
    if alpha is not None:
        tensors[f"{name}.alpha"] = alpha
    return tensors


def _spec(arch, diffusers):
    return arch.module_by_diffusers[diffusers]


@pytest.mark.parametrize(
    "arch,name,canonical",
    [
        (SD1, "text_encoder.encoder.layers.3.self_attn.q_proj", "text_encoder.text_model.encoder.layers.3.self_attn.q_proj"),
        (SD1, "lora_te_encoder_layers_3_mlp_fc1", "text_encoder.text_model.encoder.layers.3.mlp.fc1"),
        (SD1, "lora_te1_encoder_layers_3_mlp_fc1", "text_encoder.text_model.encoder.layers.3.mlp.fc1"),
        (SD1, "lora_te1_text_model_encoder_layers_3_mlp_fc1", "text_encoder.text_model.encoder.layers.3.mlp.fc1"),
        (SD1, "lora_unet_input_blocks_1_1_proj_in", "unet.down_blocks.0.attentions.0.proj_in"),
        (SDXL, "lora_te1_encoder_layers_0_self_attn_k_proj", "text_encoder.text_model.encoder.layers.0.self_attn.k_proj"),
        (SDXL, "lora_te2_encoder_layers_5_self_attn_v_proj", "text_encoder_2.text_model.encoder.layers.5.self_attn.v_proj"),
        (SDXL, "text_encoder_2.encoder.layers.5.mlp.fc2", "text_encoder_2.text_model.encoder.layers.5.mlp.fc2"),
        (SDXL, "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k",
         "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"),
        (SDXL, "lora_unet_up_blocks_0_resnets_2_conv_shortcut", "unet.up_blocks.0.resnets.2.conv_shortcut"),
        (SDXL, "lora_unet_mid_block_resnets_1_conv2", "unet.mid_block.resnets.1.conv2"),
    ],
)
def test_alias_lands_on_the_table_row(tmp_path, arch, name, canonical):
    spec = _spec(arch, canonical)
    adapter = _parse(tmp_path, _lora(name, spec.shape[0], spec.shape[1], tuple(spec.shape[2:]) if spec.is_conv else ()))
    assert find_spec(adapter.modules[0], arch) is spec
    match = match_adapter(adapter, arch)
    assert len(match.matched) == 1 and not match.unmatched and not match.shape_mismatches


def test_lora_te1_is_not_sd1s_on_sdxl():
    """``lora_te_`` stays unknown on SDXL (two encoders: which one would be a guess)."""
    from loraforge.formats.adapters import aliases

    assert aliases.lookup("lora_te_encoder_layers_0_mlp_fc1", "kohya", SDXL) is None


def test_training_script_lora_linear_layer_keys(tmp_path):
    name = "text_encoder.encoder.layers.0.self_attn.q_proj"
    spec = _spec(SD1, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj")
    tensors = _lora(name, spec.shape[0], spec.shape[1], suffixes=("lora_linear_layer.down.weight", "lora_linear_layer.up.weight"))
    adapter = _parse(tmp_path, tensors)
    assert not adapter.unclaimed and len(adapter.modules) == 1
    assert adapter.modules[0].kind == "lora" and adapter.modules[0].scale == 1.0
    assert find_spec(adapter.modules[0], SD1) is spec


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_integer_alpha(tmp_path, dtype):
    tensors = _lora("lora_unet_mid_block_attentions_0_proj_out", 8, 8, rank=4, alpha=torch.tensor(2, dtype=dtype))
    module = _parse(tmp_path, tensors).modules[0]
    assert module.alpha == 2.0 and module.scale == 0.5


def test_integer_factor_still_refused(tmp_path):
    tensors = _lora("lora_unet_mid_block_attentions_0_proj_out", 8, 8)
    tensors["lora_unet_mid_block_attentions_0_proj_out.lora_up.weight"] = torch.ones(8, 2, dtype=torch.int64)
    with pytest.raises(FormatError, match="not a floating-point type"):
        _parse(tmp_path, tensors)


# --------------------------------------------------------------------------- DoRA magnitude layout

SQUARE = "unet.down_blocks.0.resnets.0.conv2"  # in == out
WIDE = "unet.down_blocks.1.resnets.0.conv1"  # in != out


def _conv_dora(name, spec, magnitude_key, magnitude):
    tensors = _lora(name, spec.shape[0], spec.shape[1], kernel=tuple(spec.shape[2:]))
    tensors[f"{name}.{magnitude_key}"] = magnitude
    return tensors


@pytest.mark.parametrize("which", [SQUARE, WIDE])
def test_peft_conv_magnitude_is_per_output_row(tmp_path, which):
    """PEFT stores a conv magnitude as [1, out, 1, 1]; the norm is per output row, square or not."""
    spec = _spec(SD1, which)
    out = spec.shape[0]
    magnitude = 0.5 + torch.rand(1, out, 1, 1, generator=torch.Generator().manual_seed(3))
    tensors = _conv_dora(which, spec, "lora_magnitude_vector", magnitude)
    module = _parse(tmp_path, tensors).modules[0]
    assert module.dora_axis == "out"
    weight = _randn(*spec.shape, seed=4).double()
    factors = {"up": tensors[f"{which}.lora_up.weight"], "down": tensors[f"{which}.lora_down.weight"],
               "dora_scale": magnitude}
    factors = {role: tensor.double() for role, tensor in factors.items()}
    effective = module_effective_delta(module, factors, weight)
    # PEFT: W' = m · (W + ΔW) / ‖W + ΔW‖ per output row, no epsilon.
    directed = weight + (factors["up"].flatten(1) @ factors["down"].flatten(1)).reshape(weight.shape)
    norm = directed.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    expected = directed * magnitude.double().reshape(-1, 1, 1, 1) / norm - weight
    torch.testing.assert_close(effective, expected, rtol=1e-12, atol=1e-15)


def test_lycoris_square_conv_input_layout_decided_by_the_file(tmp_path):
    """[1, n, 1, 1] on a square conv: the file's linear [1, in] magnitudes say LyCORIS wd_on_out=False."""
    spec = _spec(SD1, SQUARE)
    tensors = _conv_dora(spec.kohya, spec, "dora_scale", torch.ones(1, spec.shape[1], 1, 1))
    q = _spec(SD1, "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    tensors.update(_lora(q.kohya, q.shape[0], q.shape[1]))
    tensors[f"{q.kohya}.dora_scale"] = torch.ones(1, q.shape[1])
    adapter = _parse(tmp_path, tensors)
    assert {m.name: m.dora_axis for m in adapter.modules} == {spec.kohya: "in", q.kohya: "in"}


def test_renamed_peft_square_conv_layout_decided_by_the_file(tmp_path):
    """A PEFT magnitude renamed dora_scale: a non-square conv's [1, out, 1, 1] decides the square one."""
    square, wide = _spec(SD1, SQUARE), _spec(SD1, WIDE)
    tensors = _conv_dora(square.kohya, square, "dora_scale", torch.ones(1, square.shape[0], 1, 1))
    tensors.update(_conv_dora(wide.kohya, wide, "dora_scale", torch.ones(1, wide.shape[0], 1, 1)))
    adapter = _parse(tmp_path, tensors)
    assert {m.dora_axis for m in adapter.modules} == {"out"}


def test_ambiguous_square_conv_magnitude_is_an_error_naming_the_module(tmp_path):
    spec = _spec(SD1, SQUARE)
    tensors = _conv_dora(spec.kohya, spec, "dora_scale", torch.ones(1, spec.shape[1], 1, 1))
    with pytest.raises(FormatError) as error:
        _parse(tmp_path, tensors)
    message = str(error.value)
    assert spec.kohya in message and "as many inputs as outputs" in message and "lora_magnitude_vector" in message


def test_lycoris_output_layout(tmp_path):
    spec = _spec(SD1, SQUARE)
    tensors = _conv_dora(spec.kohya, spec, "dora_scale", torch.ones(spec.shape[0], 1, 1, 1))
    assert _parse(tmp_path, tensors).modules[0].dora_axis == "out"


def test_dora_epsilon_follows_the_spelling():
    """LyCORIS adds float32's epsilon to the norm; PEFT divides by the bare norm."""
    weight = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    delta = torch.zeros(1, 2, dtype=torch.float64)
    magnitude = torch.tensor([5.0], dtype=torch.float64)
    assert torch.equal(deltas.dora_effective_delta(weight, delta, magnitude, axis="out", eps=0.0), torch.zeros(1, 2))
    lycoris = deltas.dora_effective_delta(weight, delta, magnitude, axis="out")
    assert bool((lycoris < 0).all())


@pytest.mark.parametrize("convention", ["lycoris", "peft"])
@pytest.mark.parametrize("axis,shape", [("out", (6, 1)), ("in", (1, 5))])
def test_dora_increment_at_strength_one_is_the_dora_delta_bit_for_bit(convention, axis, shape):
    weight, delta = _randn(6, 5, seed=1).double(), _randn(6, 5, seed=2).double() * 0.1
    magnitude = _randn(*shape, seed=3).abs().double()
    reference = deltas.dora_effective_delta(weight, delta, magnitude, axis=axis)
    increment = deltas.dora_increment(weight, delta, magnitude, 1.0, convention=convention, axis=axis, eps=deltas.DORA_NORM_EPS)
    assert torch.equal(increment, reference)


def test_dora_increment_conventions_by_hand():
    """One row: W = [3, 4], ΔW = [0, 2], m = 10, s = 0.5, no epsilon."""
    weight = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    delta = torch.tensor([[0.0, 2.0]], dtype=torch.float64)
    m = torch.tensor([10.0], dtype=torch.float64)
    # LyCORIS: (W + ΔW)·(s·(m/‖W + ΔW‖ − 1) + 1) = [3, 6]·(0.5·(10/√45 − 1) + 1)
    lycoris = deltas.dora_increment(weight, delta, m, 0.5, convention="lycoris", axis="out", eps=0.0)
    factor = 0.5 * (10 / 45**0.5 - 1) + 1
    torch.testing.assert_close(lycoris + weight, torch.tensor([[3.0, 6.0]], dtype=torch.float64) * factor)
    # PEFT: m·(W + sΔW)/‖W + sΔW‖ = 10·[3, 5]/√34
    peft = deltas.dora_increment(weight, delta, m, 0.5, convention="peft", axis="out", eps=0.0)
    torch.testing.assert_close(peft + weight, torch.tensor([[3.0, 5.0]], dtype=torch.float64) * 10 / 34**0.5)
