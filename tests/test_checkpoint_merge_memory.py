"""Checkpoint merges stream: peak memory does not grow with the models' size.

Three SD 1.x models and a base are merged (weighted sum: correctly rounded,
in chunks; TIES: trim masks per tensor, then chunks) at two sizes of the same
family, the larger with twice the channels (four times the bytes). Each
build runs in a fresh process, which reports how far its peak RSS
(``ru_maxrss``) rose above its RSS once torch and loraforge were imported.
Holding the models would add their size; streaming adds what the largest
tensors in flight take, a small share of it (the chunks' float64 work is the
same at both sizes).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from loraforge.formats.arch import get_architecture
from loraforge.testing.arch import TINY
from loraforge.testing.checkpoints import write_synthetic_checkpoint

NAMES = ("m1", "m2", "m3", "base")

# Build one target in this process and print the RSS rise (bytes) of the build alone.
MEASURE = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from typer.testing import CliRunner
    from loraforge.cli import app

    def rss():
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize()

    before = rss()
    result = CliRunner().invoke(app, ["build", "-q", sys.argv[1], sys.argv[2]])
    assert result.exit_code == 0, result.output
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"rise": peak - before}))
    """
)

RECIPE = """\
loraforge: 1
name: memory
date: "2026-11-01"
inputs:
  m1: {source: m1.safetensors}
  m2: {source: m2.safetensors}
  m3: {source: m3.safetensors}
  base: {source: base.safetensors}
targets:
  ws:
    kind: checkpoint
    merge: {method: weighted_sum, models: [m1, m2, m3], weights: [0.5, 0.3, 0.2], components: {vae: merge}}
  ties:
    kind: checkpoint
    merge: {method: ties, base: base, models: [m1, m2, m3], density: 0.2, components: {vae: merge}}
"""


@pytest.fixture(scope="module")
def projects(tmp_path_factory) -> dict[int, tuple[Path, int]]:
    """model_channels -> (recipe, bytes of one model)."""
    made = {}
    for channels in (32, 64):
        folder = tmp_path_factory.mktemp(f"memory-{channels}")
        arch = get_architecture("sd1", {**TINY["sd1"], "model_channels": channels, "vae_channels": channels // 2})
        for seed, name in enumerate(NAMES, start=1):
            write_synthetic_checkpoint(folder / f"{name}.safetensors", arch, seed=seed, dtype="F16")
        (folder / "recipe.yaml").write_text(RECIPE)
        made[channels] = (folder / "recipe.yaml", (folder / "m1.safetensors").stat().st_size)
    return made


def _rises(recipes: list[Path], target: str) -> list[int]:
    """The RSS rise of building ``target`` of each recipe, in processes running side by side (each its own peak)."""
    running = []
    for recipe in recipes:
        (recipe.parent / "recipe.lock").unlink(missing_ok=True)  # always a build, never "up to date"
        command = [sys.executable, "-c", MEASURE, str(recipe), target]
        running.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    rises = []
    for process in running:
        output, errors = process.communicate()
        assert process.returncode == 0, errors + output
        rises.append(json.loads(output.strip().splitlines()[-1])["rise"])
    return rises


@pytest.mark.parametrize("target", ["ws", "ties"])
def test_peak_memory_of_a_merge_does_not_grow_with_the_models(projects, target):
    (small, small_bytes), (large, large_bytes) = projects[32], projects[64]
    assert large_bytes > 3.5 * small_bytes  # four times the bytes: the same family at twice the channels
    small_rise, large_rise = _rises([small, large], target)
    growth = large_rise - small_rise
    # Holding the four models would grow the peak by 4 x (large - small) bytes. Streaming grows it by
    # what the largest tensors in flight take (three tensors of each model in the stored dtype, TIES'
    # float64 magnitudes of one tensor per thread) and the allocator's retention of blocks of that size:
    # measured 16 MiB (weighted sum) and 72 MiB (TIES) here for 56 MiB more per model.
    assert growth < 2 * (large_bytes - small_bytes), (target, small_rise, large_rise, small_bytes, large_bytes)
