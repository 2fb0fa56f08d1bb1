"""Broken and hostile recipes for the tiny SD1 project of tests/hostile.py.

Each case turns the good recipe text into a bad one (``make(folder)`` writes
``recipe.yaml`` there, and whatever else the case needs). Every one is a
RecipeError (or a PlanError for a bad target selection) pointing at a line.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import Case

GOOD = """\
loraforge: 1
name: hostile
date: "2026-11-01"
precision: {save: float16}
inputs:
  base: {source: models/base.safetensors}
  style: {source: models/style.safetensors}
targets:
  baked:
    kind: checkpoint
    base: base
    loras:
      - {use: style, strength: 0.7}
"""
TARGET_END = "      - {use: style, strength: 0.7}\n"


def _recipe(text: str, before=None):
    def make(folder: Path) -> Path:
        folder = Path(folder)
        if before is not None:
            before(folder)
        path = folder / "recipe.yaml"
        path.write_text(text) if isinstance(text, str) else path.write_bytes(text)
        return path

    return make


def _case(text, *fragments: str, before=None, error: str = "RecipeError") -> Case:
    return Case(_recipe(text, before), fragments, error)


def _with_output(path: str) -> str:
    return GOOD + f"    output: {path}\n"


def _alias_bomb() -> str:
    # Billion laughs: 9 levels of 9 aliases would expand to 9**9 strings.
    lines = ['a0: &a0 "lol"']
    for level in range(1, 10):
        lines.append(f"a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * 9) + "]")
    return GOOD + "\n".join(lines) + "\n"


def _symlinked_dist(folder: Path) -> None:
    outside = folder.parent / "elsewhere"
    outside.mkdir(exist_ok=True)
    os.symlink(outside, folder / "dist", target_is_directory=True)


CASES: dict[str, Case] = {
    "yaml alias bomb": _case(_alias_bomb(), "YAML aliases (*name) are not allowed"),
    "yaml merge key": _case(GOOD + "extra: &x {a: 1}\nother:\n  <<: *x\n", "aliases"),
    "huge file": _case(GOOD + "#" + "x" * (1024 * 1024) + "\n", "larger than 1024 KiB"),
    "deep nesting": _case(GOOD + "description: " + "[" * 200 + "]" * 200 + "\n", "nested more than 32 levels"),
    "python tag": _case(GOOD + "description: !!python/object/apply:os.system ['touch pwned']\n", "the YAML tag 'tag:yaml.org,2002:python/object/apply:os.system' is not allowed"),
    "not utf-8": _case(GOOD.encode() + b"description: caf\xe9\n", "not UTF-8"),
    "wrong type": _case(GOOD.replace("strength: 0.7", "strength: [0.7]"), "expected a number, got a list"),
    "unknown key": _case(GOOD.replace("    base: base\n", "    base: base\n    strenght: 1\n"), "strenght"),
    "output absolute": _case(_with_output("/tmp/evil.safetensors"), "is an absolute path"),
    "output in home": _case(_with_output("~/models/sd15.safetensors"), "is an absolute path"),
    "output escapes with ..": _case(_with_output("../../models/sd15.safetensors"), "leads out of the recipe's folder"),
    "output escapes through a symlink": _case(
        _with_output("dist/baked.safetensors"), "through a symbolic link", "outside the recipe's folder", before=_symlinked_dist
    ),
    "output overwrites an input": _case(_with_output("models/base.safetensors"), "building would overwrite an input"),
    "two targets, one output": _case(
        GOOD + "  second:\n    kind: checkpoint\n    base: base\n    output: dist/baked.safetensors\n", "both write"
    ),
    "duplicate target names": _case(GOOD + "  baked:\n    kind: checkpoint\n    base: base\n", "the key 'baked' appears twice"),
    "cycle": _case(
        GOOD + "  a:\n    kind: checkpoint\n    base: b\n  b:\n    kind: checkpoint\n    base: a\n", "targets form a cycle: a -> b -> a"
    ),
    "reference to a missing name": _case(GOOD.replace("base: base\n", "base: bsae\n"), "'bsae' is neither an input nor a target"),
    "input and target share a name": _case(GOOD + "  style:\n    kind: checkpoint\n    base: base\n", "used by an input and by a target"),
    "output not safetensors": _case(_with_output("dist/baked.ckpt"), "does not end in .safetensors"),
}
