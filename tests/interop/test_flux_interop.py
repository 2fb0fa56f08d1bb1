"""Flux.1 against diffusers' own code: its BFL -> diffusers converter and a PEFT LoRA it saves.

1. The row layout. diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``
   (the single-file loader) is fed a full-size BFL state dict whose every
   weight holds its own row numbers (shape [out, 1]; the converter only splits
   and concatenates rows, and hard-codes hidden 3072, so this is how it runs
   at full size on a CPU). The rows each diffusers layer receives must be
   the rows loraforge's Flux naming assigns it (split q/k/v/mlp slices,
   norm_out.linear with its halves swapped), for every layer.
2. A real producer. A small ``FluxTransformer2DModel`` gets a PEFT adapter
   (``add_adapter`` + ``LoraConfig``, alpha != rank), is saved with
   ``FluxPipeline.save_lora_weights`` (transformer LoRA metadata included),
   and fused by diffusers (``fuse_lora``). loraforge parses the file with
   every key claimed, matches every module, and its bake of the BFL base,
   mapped through the rows established in 1, equals diffusers' fused weights.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from diffusers import FluxPipeline, FluxTransformer2DModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers  # noqa: E402

from loraforge.formats.adapters import parse_adapter  # noqa: E402
from loraforge.formats.adapters.flux_names import diffusers_layers, lookup  # noqa: E402
from loraforge.formats.adapters.matching import match_adapter  # noqa: E402
from loraforge.formats.arch import get_architecture  # noqa: E402
from loraforge.formats.safetensors_reader import open_safetensors  # noqa: E402
from loraforge.formats.safetensors_writer import save_tensors  # noqa: E402

BARE = {"all_in_one": 0}


def _rows_of(spec, rows_total):
    if spec.swap_halves:
        half = rows_total // 2
        return list(range(half, rows_total)) + list(range(half))
    start, stop = spec.rows if spec.rows is not None else (0, rows_total)
    return list(range(start, stop))


def test_row_layout_equals_diffusers_single_file_converter():
    arch = get_architecture("flux", BARE)
    checkpoint = {}
    for t in arch.tensors:
        ids = torch.arange(t.shape[0], dtype=torch.int64)
        checkpoint[t.key] = ids.view(-1, 1) if len(t.shape) == 2 else ids
    converted = convert_flux_transformer_checkpoint_to_diffusers(dict(checkpoint))
    layers = diffusers_layers(arch)
    assert len(layers) == 10 + 19 * 14 + 38 * 6
    assert {f"{d}.weight" for d, _, _ in layers} == {k for k in converted if k.endswith(".weight") and ".norm_" not in k
                                                     and "attn.norm" not in k}
    for diffusers_path, bfl_path, _ in layers:
        spec = lookup("transformer." + diffusers_path, arch)
        assert spec is not None and spec.key == bfl_path + ".weight", diffusers_path
        rows_total = checkpoint[spec.key].shape[0]
        assert converted[diffusers_path + ".weight"][:, 0].tolist() == _rows_of(spec, rows_total), diffusers_path
        assert converted[diffusers_path + ".bias"].tolist() == _rows_of(spec, rows_total), diffusers_path


# Small model: hidden 32 (4 heads of 8), 2 double + 3 single blocks.
SMALL = dict(patch_size=1, in_channels=16, out_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=8,
             num_attention_heads=4, joint_attention_dim=24, pooled_projection_dim=16, guidance_embeds=True,
             axes_dims_rope=(2, 2, 4))
DIMS = {"hidden": 32, "head_dim": 8, "depth": 2, "depth_single": 3, "in_channels": 16, "out_channels": 16,
        "context_in": 24, "vec_in": 16, "all_in_one": 0}
TARGETS = ["to_q", "to_k", "add_v_proj", "to_out.0", "ff.net.0.proj", "ff_context.net.2", "norm1.linear",
           "proj_mlp", "norm.linear", "proj_out", "norm_out.linear", "x_embedder", "linear_2"]


def _bfl_base(model, arch):
    """The model's own weights in BFL's layout, placed by the rows the converter established."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    base = {t.key: torch.zeros(t.shape, dtype=torch.float64) for t in arch.tensors}
    for diffusers_path, _, _ in diffusers_layers(arch):
        spec = lookup("transformer." + diffusers_path, arch)
        rows = _rows_of(spec, base[spec.key].shape[0])
        base[spec.key][rows] = state[diffusers_path + ".weight"]
    return base, state


def test_peft_lora_saved_by_diffusers_bakes_to_diffusers_fused_weights(tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**SMALL).to(torch.float64)
    arch = get_architecture("flux", DIMS)
    base, before = _bfl_base(model, arch)
    model.add_adapter(LoraConfig(r=4, lora_alpha=6, target_modules=TARGETS, init_lora_weights=False))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float64) * 0.1)
    layers = get_peft_model_state_dict(model)
    FluxPipeline.save_lora_weights(str(tmp_path), weight_name="lora.safetensors", transformer_lora_layers=layers,
                                   transformer_lora_adapter_metadata=model.peft_config["default"].to_dict())
    model.fuse_lora(lora_scale=1.0)
    fused = {k.replace(".base_layer", ""): v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}

    with open_safetensors(tmp_path / "lora.safetensors") as f:
        adapter = parse_adapter(f)
    assert adapter.unclaimed == ()
    match = match_adapter(adapter, arch)
    assert not match.unmatched and not match.shape_mismatches
    assert {m.scale for m in adapter.modules} == {6 / 4}

    # Bake through the library entry points: W_bfl + scale·B@A at the module's rows (the bake's own code).
    from loraforge.ops.bake import LowRankTerm, bake_weight, swap_halves
    from loraforge.formats.adapters import load_factors, module_low_rank

    baked = {}
    with open_safetensors(tmp_path / "lora.safetensors") as f:
        terms: dict[str, list] = {}
        for module, spec in match.matched:
            up, down = module_low_rank(module, load_factors(f, module, device="cpu"))
            term = LowRankTerm(up, down, spec.rows, 1.0, module.scale)
            terms.setdefault(spec.key, []).extend(swap_halves(term, base[spec.key].shape[0]) if spec.swap_halves else [term])
    for key, key_terms in terms.items():
        baked[key] = bake_weight(base[key], key_terms, torch.float64)
    changed = 0
    for diffusers_path, _, _ in diffusers_layers(arch):
        spec = lookup("transformer." + diffusers_path, arch)
        if spec.key not in baked:
            continue
        rows = _rows_of(spec, base[spec.key].shape[0])
        got, want = baked[spec.key][rows], fused[diffusers_path + ".weight"]
        if not torch.equal(want, before[diffusers_path + ".weight"]):
            changed += 1
        assert torch.allclose(got, want, rtol=0, atol=1e-12), diffusers_path
    assert changed == len(match.matched)


def test_xlabs_lora_bakes_like_diffusers_own_conversion_of_it(tmp_path):
    """diffusers' _convert_xlabs_flux_lora_to_diffusers splits an XLabs LoRA into to_q/to_k/to_v; both files bake alike."""
    import sys
    from pathlib import Path

    from diffusers.loaders.lora_conversion_utils import _convert_xlabs_flux_lora_to_diffusers
    from typer.testing import CliRunner

    from loraforge.cli import app
    from loraforge.formats.hashing import data_sha256
    from loraforge.testing.arch import tiny_architecture
    from loraforge.testing.checkpoints import write_synthetic_checkpoint

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from test_flux import xlabs_tensors

    tensors = xlabs_tensors()
    converted = _convert_xlabs_flux_lora_to_diffusers(dict(tensors))
    assert all(k.startswith("transformer.") for k in converted)
    outputs = []
    for name, state in (("xlabs", tensors), ("diffusers", converted)):
        folder = tmp_path / name
        folder.mkdir()
        write_synthetic_checkpoint(folder / "base.safetensors", tiny_architecture("flux"), dtype="BF16", seed=3)
        save_tensors(folder / "lora.safetensors", {k: v.contiguous() for k, v in state.items()})
        (folder / "r.yaml").write_text("\n".join([
            "loraforge: 1", "name: x", 'date: "2026-11-01"', "precision: {save: same}", "inputs:",
            "  base: {source: base.safetensors}", "  lora: {source: lora.safetensors}", "targets:",
            "  baked: {kind: checkpoint, base: base, loras: [{use: lora, strength: 0.6}], output: out/b.safetensors}",
        ]) + "\n")
        result = CliRunner().invoke(app, ["build", str(folder / "r.yaml")])
        assert result.exit_code == 0, result.output
        outputs.append(data_sha256(folder / "out" / "b.safetensors"))
    assert outputs[0] == outputs[1]


def test_kohya_lora_bakes_like_diffusers_own_conversion_of_it(tmp_path):
    """diffusers' _convert_kohya_flux_lora_to_diffusers (split q/k/v, final_layer scale/shift swapped on lora_B)
    and the kohya file itself bake to identical bytes. linear1 is left out: that converter hard-codes 3072."""
    import sys
    from pathlib import Path

    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
    from typer.testing import CliRunner

    from loraforge.cli import app
    from loraforge.formats.hashing import data_sha256
    from loraforge.testing.arch import tiny_architecture
    from loraforge.testing.checkpoints import write_synthetic_checkpoint

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from test_flux import DeltaSet

    deltas = DeltaSet(rank=2, seed=51)
    deltas.kohya_file(tmp_path / "k.safetensors")
    from safetensors.torch import load_file

    kohya = {k: v for k, v in load_file(str(tmp_path / "k.safetensors")).items() if "linear1" not in k}
    converted = _convert_kohya_flux_lora_to_diffusers(dict(kohya))
    assert "norm_out.linear.lora_B.weight" in converted  # written without the transformer. prefix
    outputs = []
    for name, state in (("kohya", kohya), ("diffusers", converted)):
        folder = tmp_path / name
        folder.mkdir()
        write_synthetic_checkpoint(folder / "base.safetensors", tiny_architecture("flux"), dtype="BF16", seed=3)
        save_tensors(folder / "lora.safetensors", {k: v.contiguous() for k, v in state.items()})
        (folder / "r.yaml").write_text("\n".join([
            "loraforge: 1", "name: x", 'date: "2026-11-01"', "precision: {save: same}", "inputs:",
            "  base: {source: base.safetensors}", "  lora: {source: lora.safetensors}", "targets:",
            "  baked: {kind: checkpoint, base: base, loras: [{use: lora, strength: 0.6}], output: out/b.safetensors}",
        ]) + "\n")
        result = CliRunner().invoke(app, ["build", str(folder / "r.yaml")])
        assert result.exit_code == 0, result.output
        outputs.append(data_sha256(folder / "out" / "b.safetensors"))
    assert outputs[0] == outputs[1]
