"""A target that turns out up to date during a build counts as built for its readers.

The merged LoRA's output is deleted; the build rebuilds it to the same bytes,
so the bake that reads it is up to date again, and so is the release that
bundles the bake. Before the fix the release was still the plan made while
the bake was waiting (no action key) and was rebuilt with other bytes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from typer.testing import CliRunner

from loraforge.cli import app

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
RECIPE = """\
loraforge: 1
name: chain
date: "2026-11-01"
precision: {save: float16}
inputs:
  base: {source: models/tiny-sd15-base.safetensors}
  neon: {source: models/neon-lora.safetensors}
  noir: {source: models/noir-locon.safetensors}
targets:
  merged:
    kind: lora
    method: concat
    loras: [{use: neon, strength: 0.8}, {use: noir, strength: -0.3}]
  baked:
    kind: checkpoint
    base: base
    loras: [{use: merged}]
  release:
    kind: release
    include: [baked]
"""


def test_a_rebuilt_producer_with_the_same_bytes_leaves_its_readers_and_the_release_up_to_date(tmp_path):
    (tmp_path / "models").mkdir()
    for name in ("tiny-sd15-base", "neon-lora", "noir-locon"):
        shutil.copy(RECIPES / "models" / f"{name}.safetensors", tmp_path / "models")
    recipe = tmp_path / "chain.yaml"
    recipe.write_text(RECIPE)
    runner = CliRunner()
    assert runner.invoke(app, ["build", "-q", str(recipe)]).exit_code == 0
    manifest = tmp_path / "dist" / "release" / "manifest.json"
    first_manifest, first_lock = manifest.read_bytes(), (tmp_path / "chain.lock").read_bytes()

    (tmp_path / "dist" / "merged.safetensors").unlink()
    result = runner.invoke(app, ["build", str(recipe)])
    assert result.exit_code == 0, result.output
    built = [line.split()[1] for line in result.output.splitlines() if line.startswith("built ")]
    assert built == ["merged"]
    assert "up to date baked" in result.output and "up to date release" in result.output
    assert manifest.read_bytes() == first_manifest
    assert (tmp_path / "chain.lock").read_bytes() == first_lock
