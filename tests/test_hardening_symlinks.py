"""Issue 17, High 1: a cloned recipe repository that ships symlinks at the names loraforge writes.

A build must write nothing outside the recipe folder and the cache, whatever
links the repository carries: at the lock, at outputs, at merge/extract
reports, at the release folder, and at temp and move-aside names (old
predictable ones included, with this process's pid, since the CLI runs
in-process here). Links inside the folder at reports and the lock are
replaced by the rename, never written through.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from hostile import run_cli
from loraforge.testing.adapters import write_synthetic_adapter
from loraforge.testing.arch import tiny_architecture
from loraforge.testing.checkpoints import write_synthetic_checkpoint
from loraforge.testing.tuned import write_tuned_checkpoint

RECIPE = """\
loraforge: 1
name: links
date: "2026-11-01"
seed: 5
device: cpu
precision: {save: float16}
inputs:
  base:  {source: models/base.safetensors}
  tuned: {source: models/tuned.safetensors}
  style: {source: models/style.safetensors}
targets:
  extracted:
    kind: extract
    tuned: tuned
    base: base
    rank: {rank: 2}
  merged:
    kind: lora
    method: svd
    loras:
      - {use: style, strength: 0.8}
    rank: 2
  baked:
    kind: checkpoint
    base: base
    loras:
      - {use: merged}
      - {use: extracted, strength: 0.5}
  pack:
    kind: release
    include: [baked, merged, extracted]
    output: dist/pack
"""


def _change(key, weight):
    import torch

    if weight.ndim != 2 or not key.endswith(".weight"):
        return None
    return 0.01 * torch.ones(weight.shape[0], 1, dtype=torch.float64) @ torch.ones(1, weight.shape[1], dtype=torch.float64)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("link-models")
    arch = tiny_architecture("sd1")
    write_synthetic_checkpoint(folder / "base.safetensors", arch, seed=11)
    write_tuned_checkpoint(folder / "tuned.safetensors", folder / "base.safetensors", _change)
    write_synthetic_adapter(folder / "style.safetensors", arch, kind="lora", rank=4, seed=12)
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory, models) -> tuple[Path, list[str]]:
    """A clean build: the folder, and every name (relative path) loraforge created in it."""
    root = tmp_path_factory.mktemp("reference")
    _project(root, models)
    code, output = run_cli("build", root / "recipe.yaml", "-q")
    assert code == 0, output
    created = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.parts[len(root.parts)] != "models")
    return root, created


def _project(root: Path, models: Path) -> Path:
    shutil.copytree(models, root / "models")
    (root / "recipe.yaml").write_text(RECIPE)
    return root


def _victims(folder: Path, lock_text: str) -> Path:
    folder.mkdir()
    (folder / "precious.txt").write_text("precious")
    (folder / "lock.txt").write_text(lock_text)  # a lock-shaped file, so reading it through a link succeeds
    (folder / "dir").mkdir()
    (folder / "dir" / "keep.txt").write_text("keep")
    return folder


def _state(folder: Path) -> dict[str, str]:
    state = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        state[key] = "link" if path.is_symlink() else hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return state


def _guessable_names(name: str) -> list[str]:
    """Temp/aside names of older versions and of this one (the random part cannot be guessed)."""
    pid = os.getpid()
    return [f".{name}.{pid}.tmp", f".{name}.{pid}.old", f".{name}.tmp-{pid}-0", f".{name}.tmp-{pid}", f".{name}.old"]


def test_links_at_every_name_loraforge_could_create_write_nothing_outside(tmp_path, models, reference):
    _, created = reference
    victims = _victims(tmp_path / "victims", (reference[0] / "recipe.lock").read_text())
    before = _state(victims)
    root = _project(tmp_path / "project", models)
    for relative in created:
        path = root / relative
        if relative == "dist" or any(parent.is_symlink() for parent in path.parents):
            continue  # a symlinked dist/ is a separate case (refused by the planner); inside a linked folder: done
        path.parent.mkdir(parents=True, exist_ok=True)
        is_folder = (reference[0] / relative).is_dir()
        target = victims / ("dir" if is_folder else "lock.txt" if relative == "recipe.lock" else "precious.txt")
        for name in [path.name, *_guessable_names(path.name)]:
            if not (path.parent / name).exists() and not (path.parent / name).is_symlink():
                (path.parent / name).symlink_to(target, target_is_directory=is_folder)
    code, output = run_cli("build", root / "recipe.yaml", "-q")
    assert "Traceback" not in output
    assert _state(victims) == before
    code, output = run_cli("build", root / "recipe.yaml", "-q")  # and a second run over whatever the first left
    assert "Traceback" not in output
    assert _state(victims) == before


def test_a_symlinked_dist_folder_writes_nothing_outside(tmp_path, models, reference):
    victims = _victims(tmp_path / "victims", "")
    before = _state(victims)
    root = _project(tmp_path / "project", models)
    (root / "dist").symlink_to(victims / "dir", target_is_directory=True)
    code, output = run_cli("build", root / "recipe.yaml", "-q")
    assert code == 2 and "Traceback" not in output and "outside the recipe's folder" in " ".join(output.split())
    assert _state(victims) == before


def test_links_at_reports_and_the_lock_are_replaced_by_the_rename_not_followed(tmp_path, models, reference):
    """The final rename onto a planted link: the link itself is replaced, its target untouched."""
    ref_root, created = reference
    stale_lock = json.loads((ref_root / "recipe.lock").read_text())
    del stale_lock["targets"]["baked"]  # a valid lock that the build must update
    victims = _victims(tmp_path / "victims", json.dumps(stale_lock))
    before = _state(victims)
    root = _project(tmp_path / "project", models)
    (root / "dist").mkdir()
    planted = ["recipe.lock"] + [name for name in created if name.endswith((".merge.json", ".extract.json")) and "/pack/" not in name]
    assert {"recipe.lock", "dist/merged.merge.json", "dist/extracted.extract.json"} <= set(planted)
    for relative in planted:
        (root / relative).symlink_to(victims / ("lock.txt" if relative == "recipe.lock" else "precious.txt"))
    code, output = run_cli("build", root / "recipe.yaml", "-q")
    assert code == 0, output
    assert _state(victims) == before
    for relative in planted:
        path = root / relative
        assert path.is_file() and not path.is_symlink(), relative
        assert path.read_bytes() == (ref_root / relative).read_bytes() or relative == "recipe.lock"


def test_a_planted_link_at_the_old_aside_name_of_a_release_does_not_break_or_redirect_the_swap(tmp_path, models, reference):
    victims = _victims(tmp_path / "victims", "")
    before = _state(victims)
    root = _project(tmp_path / "project", models)
    assert run_cli("build", root / "recipe.yaml", "-q")[0] == 0
    (root / "dist" / f".pack.{os.getpid()}.old").symlink_to(victims / "dir", target_is_directory=True)
    (root / "recipe.yaml").write_text(RECIPE.replace("strength: 0.5", "strength: 0.25"))
    code, output = run_cli("build", root / "recipe.yaml", "-q")
    assert code == 0, output
    assert _state(victims) == before
    assert (root / "dist" / "pack" / "manifest.json").is_file()
