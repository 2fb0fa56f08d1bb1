"""A Flux LoRA with text-encoder modules baked into BFL's transformer-only file.

The base holds no text encoder, so the LoRA's CLIP-L/T5 modules have nothing
to change: with the default te (= strength) that is one positioned error
(baking would silently drop them); with ``te: 0`` they are skipped knowingly,
reported by `plan`, and the transformer part bakes to the float64 reference
rounded once.
"""

from __future__ import annotations

import json

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from loraforge.cli import app
from loraforge.formats.arch import get_architecture
from loraforge.testing.arch import tiny_architecture
from loraforge.testing.checkpoints import write_synthetic_checkpoint

runner = CliRunner()
RANK = 2


def bare_architecture():
    return get_architecture("flux", {**dict(tiny_architecture("flux").dimensions), "all_in_one": 0})


def write_lora(path, arch, te_arch):
    """One transformer module (fused qkv of double block 0) and one CLIP-L module, kohya names."""
    generator = torch.Generator().manual_seed(5)
    tensors, deltas = {}, {}
    for spec in (next(m for m in arch.modules if m.kohya == "lora_unet_double_blocks_0_img_attn_qkv"),
                 next(m for m in te_arch.modules if m.is_text_encoder and m.kohya.startswith("lora_te1_"))):
        out, inp = spec.shape[0], spec.shape[1]
        down = torch.randn(RANK, inp, generator=generator) * 0.5
        up = torch.randn(out, RANK, generator=generator) * 0.01
        tensors[f"{spec.kohya}.lora_down.weight"] = down
        tensors[f"{spec.kohya}.lora_up.weight"] = up
        tensors[f"{spec.kohya}.alpha"] = torch.tensor(float(RANK))
        deltas[spec.key] = up.double() @ down.double()  # alpha / rank = 1
    save_file(tensors, str(path))
    return deltas, spec.kohya  # the CLIP-L module's name


def recipe(folder, te_line=""):
    path = folder / "recipe.yaml"
    path.write_text(
        'loraforge: 1\nname: bare\ndate: "2026-11-01"\nprecision: {save: same}\n'
        "inputs:\n  base: {source: base.safetensors}\n  lora: {source: lora.safetensors}\n"
        "targets:\n  baked:\n    kind: checkpoint\n    base: base\n    loras:\n"
        f"      - use: lora\n        strength: 0.5\n{te_line}"
    )
    return path


def test_text_encoder_modules_need_te_0_on_a_transformer_only_base(tmp_path):
    arch = bare_architecture()
    assert not any(m.is_text_encoder for m in arch.modules)
    write_synthetic_checkpoint(tmp_path / "base.safetensors", arch, dtype="BF16", seed=2)
    deltas, te_name = write_lora(tmp_path / "lora.safetensors", arch, tiny_architecture("flux"))
    te_key = next(key for key in deltas if key.startswith("text_encoders."))

    refused = runner.invoke(app, ["build", str(recipe(tmp_path))])
    assert refused.exit_code != 0
    assert "1 text-encoder module(s) of 'lora'" in refused.output and "holds no text encoder" in refused.output
    assert "recipe.yaml:13:9:" in refused.output and "te: 0" in refused.output  # at the entry's use: line
    assert not (tmp_path / "dist").exists()

    path = recipe(tmp_path, "        te: 0\n")
    plan = json.loads(runner.invoke(app, ["plan", "--json", str(path)]).output)
    entry = plan["targets"][0]["loras"][0]
    assert entry["not_in_base"] == [te_name]
    assert entry["unmatched"] == [] and entry["applied"] == 1
    built = runner.invoke(app, ["build", "-q", str(path)])
    assert built.exit_code == 0, built.output

    with safe_open(str(tmp_path / "base.safetensors"), "pt") as f:
        base = {k: f.get_tensor(k) for k in f.keys()}
    with safe_open(str(tmp_path / "dist" / "baked.safetensors"), "pt") as f:
        out = {k: f.get_tensor(k) for k in f.keys()}
    assert sorted(out) == sorted(base)
    (key,) = [k for k in deltas if k != te_key]
    want = (base[key].double() + 0.5 * deltas[key]).to(torch.bfloat16)
    assert torch.equal(out[key].view(torch.int16), want.view(torch.int16))
    assert all(torch.equal(out[k].view(torch.int16), base[k].view(torch.int16)) for k in base if k != key)
