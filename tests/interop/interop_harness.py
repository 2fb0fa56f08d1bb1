"""Bake producer-made adapters with loraforge (recipe + CLI) and compare with the producers' own weights."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from typer.testing import CliRunner

from loraforge.cli import app
from loraforge.formats.arch import Architecture
from loraforge.testing.checkpoints import write_synthetic_checkpoint

from interop_models import base_weight, build_models, load_targets, read_tensors, target_module

EPS32 = float(torch.finfo(torch.float32).eps)


@dataclass
class Setup:
    """A tiny checkpoint of one family on disk, and a way to get producer models holding its weights."""

    arch: Architecture
    folder: Path
    base: Path = field(init=False)

    def __post_init__(self):
        self.base = self.folder / "base.safetensors"
        write_synthetic_checkpoint(self.base, self.arch, seed=7, dtype="F32")

    def models(self, components=None) -> dict[str, torch.nn.Module]:
        models = build_models(self.arch)
        if components is not None:
            models = {k: v for k, v in models.items() if k in components}
        load_targets(models, self.arch, self.base)
        return models

    def specs(self, components) -> list:
        return [s for s in self.arch.modules if s.diffusers.partition(".")[0] in components]


@dataclass(frozen=True)
class Bake:
    """One loraforge target: an adapter file baked at a strength (te defaults to strength)."""

    adapter: Path
    strength: float = 1.0
    te: float | None = None
    extra: str = ""  # more YAML flow-mapping entries for the LoRA use, e.g. "dora: peft"


def run_bakes(setup: Setup, bakes: Mapping[str, Bake]) -> dict[str, dict[str, torch.Tensor]]:
    """Write one recipe with a checkpoint target per bake, run `loraforge build`, return each output."""
    lines = ["loraforge: 1", "name: interop", 'date: "2026-12-01"', "inputs:", f"  base: {{source: {setup.base}}}"]
    for name, bake in bakes.items():
        lines.append(f"  {name}: {{source: {bake.adapter}}}")
    lines.append("targets:")
    for name, bake in bakes.items():
        use = f"use: {name}, strength: {bake.strength}"
        if bake.te is not None:
            use += f", te: {bake.te}"
        if bake.extra:
            use += ", " + bake.extra
        lines += [
            f"  baked_{name}:",
            "    kind: checkpoint",
            "    base: base",
            f"    loras: [{{{use}}}]",
            f"    output: out/{name}.safetensors",
        ]
    recipe = setup.folder / f"recipe_{'_'.join(bakes)}.yaml"
    recipe.write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(app, ["build", str(recipe), "--quiet"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return {name: read_tensors(setup.folder / "out" / f"{name}.safetensors") for name in bakes}


def build_error(setup: Setup, bake: Bake) -> str:
    """The message of a failing `loraforge build` of one bake."""
    recipe = setup.folder / "recipe_error.yaml"
    recipe.write_text(
        "\n".join([
            "loraforge: 1", "name: interop", 'date: "2026-12-01"', "inputs:",
            f"  base: {{source: {setup.base}}}", f"  lora: {{source: {bake.adapter}}}",
            "targets:", "  baked:", "    kind: checkpoint", "    base: base",
            f"    loras: [{{use: lora, strength: {bake.strength}}}]", "    output: out/error.safetensors",
        ]) + "\n"
    )
    result = CliRunner().invoke(app, ["build", str(recipe), "--quiet"])
    assert result.exit_code != 0, "the build should have failed"
    return result.output


def fused_weights(models: Mapping[str, torch.nn.Module], specs, *, forward=False, dtype=torch.float64) -> dict[str, torch.Tensor]:
    """{table diffusers name: the weight each model now applies}: after fuse_lora, or through the forward."""
    from interop_models import forward_weight

    result = {}
    for spec in specs:
        layer = target_module(models, spec)
        weight = forward_weight(layer, spec.shape, dtype) if forward else base_weight(layer)
        result[spec.diffusers] = weight.detach().clone().reshape(spec.shape)
    return result


def baked_weights(output: Mapping[str, torch.Tensor], specs) -> dict[str, torch.Tensor]:
    result = {}
    for spec in specs:
        weight = output[spec.key]
        if spec.rows is not None:
            weight = weight[spec.rows[0]:spec.rows[1]]
        result[spec.diffusers] = weight.reshape(spec.shape)
    return result


def assert_same_weights(baked: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], *, ulps: float = 1.0,
                        relative_to_max: bool = False, base: Mapping[str, torch.Tensor] | None = None) -> int:
    """Every weight equal within ``ulps`` float32 steps; returns how many differ from the base (if given).

    Elementwise (expected in float64 from the producer run in float64): within
    ``ulps`` of each element's own float32 spacing. ``relative_to_max``
    (producer run in float32): within ``ulps`` float32 steps of the tensor's
    largest element, the error a float32 computation of the producer makes.
    """
    assert set(baked) == set(expected)
    bad = []
    for name, want in expected.items():
        got = baked[name].double()
        want = want.double()
        if relative_to_max:
            bound = ulps * EPS32 * want.abs().max().clamp_min(1e-30)
        else:
            spacing = torch.nextafter(want.float().abs(), torch.tensor(math.inf)).double() - want.float().abs().double()
            bound = ulps * spacing + 1e-300
        error = (got - want).abs()
        if not bool((error <= bound).all()):
            relative = float((error / want.abs().max().clamp_min(1e-30)).max())
            bad.append(f"{name}: max error {float(error.max()):.3g} (relative to max {relative:.3g})")
    assert not bad, f"{len(bad)} weight(s) differ from the producer's:\n" + "\n".join(bad[:20])
    if base is None:
        return 0
    return sum(1 for name in expected if not torch.equal(baked[name].double(), base[name].double()))
