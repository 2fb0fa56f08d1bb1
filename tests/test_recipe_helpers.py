"""Shared fixtures for the recipe tests (no tests in this module)."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraforge.errors import RecipeError
from loraforge.recipe import load_recipe

SHA = "0123456789abcdef" * 4

EXAMPLE = f"""\
loraforge: 1                       # schema version, required
name: neon-noir                    # required
title: Neon Noir v1.2
description: A moody merge.
date: "2026-11-01"
seed: 7
device: auto
precision: {{compute: float32, save: float16}}
inputs:
  base:  {{source: models/base.safetensors, sha256: "{SHA.upper()}"}}
  neon:  {{source: "hf://org/repo@0123abc/neon.safetensors"}}
  noir:  {{source: "civitai:123456"}}
targets:
  neon-noir:
    kind: checkpoint
    base: base
    loras:
      - use: neon
        strength: 0.8
        te: 0.5
        blocks: OUTD
      - {{use: noir, strength: -0.3}}
    allow_unmatched: false
    output: dist/neon-noir.safetensors
    precision: {{save: bfloat16}}
    device: cpu
"""

MINIMAL = """\
loraforge: 1
name: tiny
inputs:
  base: {source: base.safetensors}
  style: {source: style.safetensors}
targets:
  tiny-baked:
    kind: checkpoint
    base: base
    loras:
      - use: style
"""


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    """Write the recipe; return its path relative to ``tmp_path`` (tests chdir there)."""
    (tmp_path / name).write_text(text, encoding="utf-8")
    return Path(name)


def position_of(text: str, line_contains: str, token: str, occurrence: int = 1) -> tuple[int, int]:
    """1-based (line, column) of ``token`` on the n-th line containing ``line_contains``."""
    seen = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if line_contains in line:
            seen += 1
            if seen == occurrence:
                return number, line.index(token) + 1
    raise AssertionError(f"{line_contains!r} not in the text")


def load_error(tmp_path: Path, text: str, name: str = "recipe.yaml") -> RecipeError:
    path = write(tmp_path, text, name)
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    return caught.value


def assert_points_at(error: RecipeError, name: str, line: int, column: int, field_path: str) -> str:
    """The error has one line that names the file, position and field path; returns it."""
    prefix = f"{name}:{line}:{column}: {field_path}: "
    lines = [line_text for line_text in str(error).splitlines() if prefix in line_text]
    assert lines, f"no line starting {prefix!r} in:\n{error}"
    return lines[0]
