"""formats/lora_output.py: names, shapes, alpha = rank, metadata, and the plan-time description of the file."""

from __future__ import annotations

import json
import math

import torch

from loraforge.formats.adapters import parse_adapter
from loraforge.testing.arch import tiny_architecture
from loraforge.formats.hashing import file_hashes
from loraforge.formats.lora_output import (
    LoraModuleFactors,
    estimated_lora_bytes,
    is_conv_shape,
    lora_metadata,
    lora_save_dtype,
    planned_lora_adapter,
    write_lora,
)
from loraforge.formats.safetensors_reader import open_safetensors

SDXL = tiny_architecture("sdxl")


def _modules():
    generator = torch.Generator().manual_seed(0)
    chosen = [m for m in SDXL.modules if m.is_text_encoder][:2] + [m for m in SDXL.modules if is_conv_shape(m.shape)][:2]
    modules = []
    for index, spec in enumerate(reversed(chosen)):  # given out of order on purpose
        rank = 2 + index
        up = torch.randn(spec.shape[0], rank, generator=generator, dtype=torch.float64)
        down = torch.randn(rank, math.prod(spec.shape[1:]), generator=generator, dtype=torch.float64)
        modules.append(LoraModuleFactors(spec.kohya, up, down, spec.shape))
    return modules


def test_written_file_parses_as_the_planned_adapter(tmp_path):
    modules = _modules()
    ranks = {m.name: (m.rank, is_conv_shape(m.weight_shape)) for m in modules}
    metadata = lora_metadata(SDXL, ranks, title="t", date=None, merged_from=["a", "b"], provenance={"target": "x"})
    path = tmp_path / "out.safetensors"
    result = write_lora(path, modules, metadata, "F32")
    with open_safetensors(path) as handle:
        parsed = parse_adapter(handle)
        stored = handle.metadata
        names = handle.names()
        tensors = {name: handle.read(name) for name in names}
    planned = planned_lora_adapter(path, [(m.name, m.weight_shape, m.rank) for m in modules])
    assert parsed.modules == planned.modules and parsed.kind == planned.kind == "LoCon"
    assert names == sorted(names)  # data in name order
    assert result.size - sum(t.numel() * 4 for t in tensors.values()) > 0
    assert sum(t.numel() * 4 for t in tensors.values()) == estimated_lora_bytes(
        [(m.name, m.weight_shape, m.rank) for m in modules], "F32"
    )
    for module in modules:
        up = tensors[f"{module.name}.lora_up.weight"]
        down = tensors[f"{module.name}.lora_down.weight"]
        assert float(tensors[f"{module.name}.alpha"]) == module.rank
        if len(module.weight_shape) == 4:
            assert tuple(up.shape) == (module.weight_shape[0], module.rank, 1, 1)
            assert tuple(down.shape) == (module.rank, *module.weight_shape[1:])
        torch.testing.assert_close(up.flatten(1).double() @ down.flatten(1).double(), module.up @ module.down, rtol=1e-5, atol=1e-5)
    assert stored["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert stored["ss_base_model_version"] == "sdxl_base_v1-0" and stored["ss_v2"] == "False"
    assert stored["ss_network_dim"] == stored["ss_network_alpha"] == "Dynamic"  # ranks 4 and 5 on linears
    assert json.loads(stored["ss_network_args"]) == {"conv_alpha": "Dynamic", "conv_dim": "Dynamic"}
    assert stored["sshs_model_hash"] == file_hashes(path).data_sha256 == result.data_sha256
    assert "modelspec.date" not in stored and stored["loraforge.target"] == "x"
    assert list(stored) == sorted(stored)


def test_same_factors_same_bytes(tmp_path):
    modules = _modules()
    metadata = lora_metadata(SDXL, {m.name: (m.rank, False) for m in modules}, title="t", date="2026-01-01", merged_from=[], provenance={})
    first = write_lora(tmp_path / "a.safetensors", modules, metadata, "F16")
    second = write_lora(tmp_path / "b.safetensors", list(reversed(modules)), metadata, "F16")
    assert first.sha256 == second.sha256


def test_save_dtype_same():
    assert lora_save_dtype("same", ["F16"]) == "F16"
    assert lora_save_dtype("same", ["BF16", "F16"]) == "F32"
    assert lora_save_dtype("same", ["F64"]) == "F32"
    assert lora_save_dtype("BF16", ["F16"]) == "BF16"
