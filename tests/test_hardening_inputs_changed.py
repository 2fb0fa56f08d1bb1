"""Issue 17, Medium 5: an input replaced on disk between two targets of one build stops the build.

Two targets read the same LoRA; right after the first one finishes the file
is replaced (a new file renamed over it, or rewritten in place). The second
target must not be built from the new bytes while the lock records the old
sha256: the build ends in one paragraph naming the input and its file
(execute/state.py: InputFiles, checked before every target).
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from hostile import make_project, run_cli, write_models
from loraforge.execute import state as build_state
from loraforge.testing.adapters import write_synthetic_adapter
from loraforge.testing.arch import tiny_architecture

SECOND = """\
  again:
    kind: checkpoint
    base: base
    output: dist/again.safetensors
    loras:
      - {use: style, strength: 0.3}
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = write_models(tmp_path_factory.mktemp("models"))
    write_synthetic_adapter(folder / "replacement.safetensors", tiny_architecture("sd1"), "lora", rank=4, seed=9)
    return folder


def _replace_by_rename(style, replacement):
    temp = style.with_name("incoming.tmp")
    temp.write_bytes(replacement.read_bytes())
    os.replace(temp, style)


def _rewrite_in_place(style, replacement):
    with open(style, "r+b") as handle:  # same inode; size and mtime change with the bytes
        handle.write(replacement.read_bytes())
        handle.truncate()


def _touch_only(style, replacement):
    os.utime(style, ns=(1, 1))  # stat changes, bytes do not: the build goes on


@pytest.mark.parametrize("change", [_replace_by_rename, _rewrite_in_place])
def test_an_input_replaced_between_two_targets_stops_the_build(tmp_path, models, monkeypatch, change):
    root = make_project(tmp_path, models)
    (root / "recipe.yaml").write_text((root / "recipe.yaml").read_text() + SECOND)
    style = root / "models/style.safetensors"
    old_sha = hashlib.sha256(style.read_bytes()).hexdigest()
    finished = build_state.BuildState.finished
    built = []

    def finished_then_replace(self, target, result):
        finished(self, target, result)
        built.append(target.name)
        if len(built) == 1:
            change(style, root / "models/replacement.safetensors")

    monkeypatch.setattr(build_state.BuildState, "finished", finished_then_replace)
    code, output = run_cli("build", root / "recipe.yaml", "-q")
    assert code == 2 and "Traceback" not in output, output
    message = " ".join(output.split())
    assert message.startswith("error: input 'style' (") and str(style) in message
    assert "changed on disk during this build" in message and old_sha[:16] in message
    assert output.strip().count("\n\n") == 0
    assert len(built) == 1
    first = built[0]
    second = "again" if first == "baked" else "baked"
    assert not (root / "dist" / f"{second}.safetensors").exists()
    lock = json.loads((root / "recipe.lock").read_text())
    assert lock["inputs"]["style"]["sha256"] == old_sha and set(lock["targets"]) == {first}


def test_an_input_touched_but_unchanged_does_not_stop_the_build(tmp_path, models, monkeypatch):
    root = make_project(tmp_path, models)
    (root / "recipe.yaml").write_text((root / "recipe.yaml").read_text() + SECOND)
    style = root / "models/style.safetensors"
    finished = build_state.BuildState.finished

    def finished_then_touch(self, target, result):
        finished(self, target, result)
        _touch_only(style, None)

    monkeypatch.setattr(build_state.BuildState, "finished", finished_then_touch)
    code, output = run_cli("build", root / "recipe.yaml", "-q")
    assert code == 0, output
    assert (root / "dist/baked.safetensors").exists() and (root / "dist/again.safetensors").exists()
