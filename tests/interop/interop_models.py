"""Small diffusers / transformers models whose LoRA targets are loraforge's tiny SD 1.5 and SDXL tables.

The producers (diffusers + PEFT, LyCORIS, diffusers' kohya converter) run on
these models; loraforge bakes the same adapters into a synthetic checkpoint
(loraforge.testing) whose target weights are copied into the models first, so
both sides start from the same W. Module paths: the table's diffusers name
minus its component prefix, without transformers' ``text_model`` level (gone
in transformers ≥ 5).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from loraforge.formats.arch import Architecture

COMPONENTS = {"unet": "unet", "text_encoder": "te", "text_encoder_2": "te2"}


def build_models(arch: Architecture) -> dict[str, nn.Module]:
    """{"unet", "text_encoder"[, "text_encoder_2"]} at the table's dimensions, float32, eval mode."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    dims = dict(arch.dimensions)
    mc = dims["model_channels"]
    torch.manual_seed(0)
    if arch.name == "sd1":
        unet = UNet2DConditionModel(
            sample_size=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(mc, 2 * mc, 4 * mc, 4 * mc),
            layers_per_block=2,
            cross_attention_dim=dims["context"],
            attention_head_dim=2,
            norm_num_groups=8,
        )
        encoders = {"text_encoder": CLIPTextModel(_clip(dims["context"], 12, dims["vocab"]))}
    elif arch.name == "sdxl":
        unet = UNet2DConditionModel(
            sample_size=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(mc, 2 * mc, 4 * mc),
            layers_per_block=2,
            transformer_layers_per_block=(1, 2, 10),
            cross_attention_dim=dims["context"],
            attention_head_dim=(2, 2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=(dims["adm_in_channels"] - dims["clip_g_width"]) // 6,
            projection_class_embeddings_input_dim=dims["adm_in_channels"],
            norm_num_groups=8,
        )
        encoders = {
            "text_encoder": CLIPTextModel(_clip(dims["clip_l_width"], 12, dims["vocab"])),
            "text_encoder_2": CLIPTextModelWithProjection(
                _clip(dims["clip_g_width"], 32, dims["vocab"], projection=dims["clip_g_width"])
            ),
        }
    else:
        raise ValueError(arch.name)
    models = {"unet": unet, **encoders}
    for model in models.values():
        model.eval().requires_grad_(False)
    return models


def _clip(width: int, layers: int, vocab: int, projection: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=2,
        vocab_size=vocab, max_position_embeddings=77, projection_dim=projection or width,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )


def module_path(models: dict[str, nn.Module], diffusers_name: str) -> tuple[str, str]:
    """(component, path in that model) of a table diffusers name.

    transformers 5's CLIPTextModel has no ``text_model`` level (its
    CLIPTextModelWithProjection still has one).
    """
    component, _, path = diffusers_name.partition(".")
    has_text_model = hasattr(models[component], "text_model")
    return component, path if has_text_model or component == "unet" else path.removeprefix("text_model.")


def target_module(models: dict[str, nn.Module], spec) -> nn.Module:
    component, path = module_path(models, spec.diffusers)
    return models[component].get_submodule(path)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _rows(tensor: torch.Tensor, spec) -> torch.Tensor:
    return tensor if spec.rows is None else tensor[spec.rows[0]:spec.rows[1]]


@torch.no_grad()
def load_targets(models: dict[str, nn.Module], arch: Architecture, checkpoint: Path) -> None:
    """Copy every LoRA target's weight and bias from the checkpoint into the models (shapes must agree)."""
    tensors = read_tensors(checkpoint)
    for spec in arch.modules:
        if spec.diffusers.partition(".")[0] not in models:
            continue
        layer = target_module(models, spec)
        weight = _rows(tensors[spec.key], spec)
        assert math.prod(weight.shape) == layer.weight.numel(), (spec.diffusers, weight.shape, layer.weight.shape)
        assert weight.shape[0] == layer.weight.shape[0], (spec.diffusers, weight.shape, layer.weight.shape)
        layer.weight.copy_(weight.reshape(layer.weight.shape))
        if spec.bias_key is not None and getattr(layer, "bias", None) is not None:
            layer.bias.copy_(_rows(tensors[spec.bias_key], spec))


def base_weight(layer: nn.Module) -> torch.Tensor:
    """A layer's weight, through a PEFT wrapper if there is one."""
    inner = getattr(layer, "base_layer", layer)
    return inner.weight.detach()


@torch.no_grad()
def forward_weight(layer: nn.Module, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The weight a layer's forward applies, read from the forward itself (LyCORIS replaces forwards).

    forward(x) = x·W'ᵀ + b is linear in x, so feeding one-hot inputs and subtracting
    forward(0) gives W' column by column; for a conv each one-hot image lights one
    (channel, kernel tap) under one output position.
    """
    if len(shape) == 2:
        eye = torch.eye(shape[1], dtype=dtype)
        return (layer(eye) - layer(torch.zeros(1, shape[1], dtype=dtype))).T.contiguous()
    out, cin, kh, kw = shape
    stride, padding = tuple(layer.stride), tuple(layer.padding)
    if stride == (1, 1) and padding == ((kh - 1) // 2, (kw - 1) // 2) and kh % 2 and kw % 2:
        # One image per input channel with a single 1 at its centre: the k×k outputs are the kernel, flipped.
        basis = torch.zeros(cin, cin, kh, kw, dtype=dtype)
        basis[torch.arange(cin), torch.arange(cin), kh // 2, kw // 2] = 1
        response = layer(basis) - layer(torch.zeros(1, cin, kh, kw, dtype=dtype))
        return response.flip(-1, -2).transpose(0, 1).contiguous()
    pos = [math.ceil(p / s) for p, s in zip(padding, stride)]
    start = [q * s - p for q, s, p in zip(pos, stride, padding)]
    size = [start[0] + kh, start[1] + kw]
    basis = torch.zeros(cin * kh * kw, cin, *size, dtype=dtype)
    index = 0
    for c in range(cin):
        for i in range(kh):
            for j in range(kw):
                basis[index, c, start[0] + i, start[1] + j] = 1
                index += 1
    response = layer(basis)[:, :, pos[0], pos[1]] - layer(torch.zeros(1, cin, *size, dtype=dtype))[:, :, pos[0], pos[1]]
    return response.T.reshape(out, cin, kh, kw).contiguous()


@torch.no_grad()
def forward_bias(layer: nn.Module, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The bias a layer's forward adds: its output on a zero input."""
    if len(shape) == 2:
        return layer(torch.zeros(1, shape[1], dtype=dtype))[0]
    size = [k + 2 for k in shape[2:]]
    return layer(torch.zeros(1, shape[1], *size, dtype=dtype))[0, :, 0, 0]
