"""Synthetic Flux.1 LoRAs in diffusers' split naming (tests, recipes/flux-demo.yaml).

``write_synthetic_adapter`` writes a family's table names (kohya's fused
``lora_unet_double_blocks_0_img_attn_qkv``); this writes the other common
dialect, diffusers/PEFT with q/k/v and ``proj_mlp`` split and
``norm_out.linear``, the way ai-toolkit saves it (``transformer.`` prefix,
``lora_A``/``lora_B``, no alpha: scale 1). Values are a pure function of the
seed and the module name (sha256-derived generator seeds).
"""

from __future__ import annotations

import math
import os

import torch

from loraforge.formats import dtypes
from loraforge.formats.adapters.flux_names import DIFFUSERS_PREFIX, diffusers_layers, lookup
from loraforge.formats.arch.table import Architecture
from loraforge.formats.safetensors_writer import WriteResult, save_tensors
from loraforge.testing.adapters import DELTA_STD, derived_seed


def write_flux_diffusers_lora(
    path: str | os.PathLike[str], arch: Architecture, *, rank: int = 4, seed: int = 0, dtype: str = "BF16",
    blocks: tuple[str, ...] | None = None,
) -> WriteResult:
    """Every diffusers layer of ``arch`` (or those in ``blocks``: "D00", "S01", "IN", "OUT") at ``rank``."""
    code = dtypes.precision_code(dtype)
    tensors = {}
    for diffusers_path, _, _ in diffusers_layers(arch):
        name = DIFFUSERS_PREFIX + diffusers_path
        spec = lookup(name, arch)
        if spec is None or (blocks is not None and spec.block not in blocks):
            continue
        out, inp = spec.shape[0], spec.shape[1]
        for role, shape, std in (("lora_A.weight", (rank, inp), 1.0), ("lora_B.weight", (out, rank), DELTA_STD / math.sqrt(rank))):
            generator = torch.Generator().manual_seed(derived_seed(seed, "flux-diffusers", name, role))
            tensors[f"{name}.{role}"] = (torch.randn(shape, generator=generator, dtype=torch.float32) * std).to(dtypes.torch_dtype(code))
    return save_tensors(path, tensors)
