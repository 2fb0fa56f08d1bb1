"""A model of a known family at dimensions loraforge has no preset for: detected with them, and baked."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

from loraforge.cli import app
from loraforge.formats.arch import detect_architecture, get_architecture
from loraforge.formats.safetensors_reader import open_safetensors
from loraforge.testing.adapters import write_synthetic_adapter
from loraforge.testing.checkpoints import write_synthetic_checkpoint

# SD 1.5's key names at channel counts no preset and no released model has (small: the test is about
# detection and the bake, not size).
DIMS = {"model_channels": 8, "context": 40, "vocab": 50, "vae_channels": 4}

RECIPE = """\
loraforge: 1
name: scaled
title: Scaled SD 1.x
date: "2026-12-01"
inputs:
  base: {source: models/base.safetensors}
  style: {source: models/style.safetensors}
targets:
  baked:
    kind: checkpoint
    base: base
    loras:
      - {use: style, strength: 0.8, te: 0.5}
"""


def _invoke(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def test_scaled_sd1_is_detected_with_its_dimensions_and_bakes(tmp_path: Path):
    arch = get_architecture("sd1", DIMS)  # the product's builders at the chosen dimensions
    models = tmp_path / "models"
    models.mkdir()
    write_synthetic_checkpoint(models / "base.safetensors", arch, seed=1, dtype="F32")
    write_synthetic_adapter(models / "style.safetensors", arch, "lora", rank=4, seed=2)

    with open_safetensors(models / "base.safetensors") as file:
        shapes = {name: file.info(name).shape for name in file.names()}
        base = {name: file.read(name) for name in file.names()}
    detection = detect_architecture(shapes)
    assert detection.architecture.name == "sd1" and dict(detection.architecture.dimensions) == DIMS
    assert (detection.missing, detection.extra) == ((), ())

    inspected = json.loads(_invoke("inspect", models / "base.safetensors", "--json").output)
    assert (inspected["architecture"], inspected["size_class"], inspected["dimensions"]) == ("sd1", "scaled", DIMS)
    assert "(scaled: model channels 8" in _invoke("inspect", models / "base.safetensors").output

    (tmp_path / "recipe.yaml").write_text(RECIPE)
    result = _invoke("build", tmp_path / "recipe.yaml", "--quiet")
    assert result.exit_code == 0, result.output
    with open_safetensors(tmp_path / "dist/baked.safetensors") as baked:
        assert baked.metadata["modelspec.architecture"] == "stable-diffusion-v1"
        assert baked.metadata["modelspec.implementation"] == "https://github.com/CompVis/stable-diffusion"
        assert sorted(baked.names()) == sorted(base)
        out = {name: baked.read(name) for name in baked.names()}
    targets = {m.key for m in arch.modules}
    changed = {name for name in base if not torch.equal(out[name], base[name])}
    assert changed and changed <= targets  # only LoRA targets moved
    assert any(arch.tensor_by_key[k].component == "te" for k in changed)
    assert any(arch.tensor_by_key[k].component == "unet" for k in changed)
    assert _invoke("verify", tmp_path / "recipe.yaml").exit_code == 0
