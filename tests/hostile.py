"""Shared harness of the hostile-input tests: a tiny SD1 project, the CLI, and "nothing was written" snapshots."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from typer.testing import CliRunner

from corpus.recipes import GOOD
from loraforge.cli import app
from loraforge.testing.arch import tiny_architecture
from loraforge.testing.adapters import write_synthetic_adapter
from loraforge.testing.checkpoints import write_synthetic_checkpoint

RECIPE = GOOD  # the valid baseline every hostile variant starts from
OUTPUT = Path("dist/baked.safetensors")


def write_models(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    sd1 = tiny_architecture("sd1")
    write_synthetic_checkpoint(folder / "base.safetensors", sd1, seed=1, dtype="F32")
    write_synthetic_adapter(folder / "style.safetensors", sd1, "lora", rank=4, seed=2)
    return folder


def make_project(root: Path, models: Path, previous_output: bytes | None = None, recipe: str = RECIPE) -> Path:
    """A recipe folder with its own copy of the models and, optionally, the output of an earlier build."""
    shutil.copytree(models, root / "models")
    (root / "recipe.yaml").write_text(recipe)
    if previous_output is not None:
        (root / OUTPUT).parent.mkdir(parents=True)
        (root / OUTPUT).write_bytes(previous_output)
    return root


def snapshot(*folders: Path) -> dict[str, str]:
    """Every file under the folders with its sha256 (the hash memo under hashes/ and the store's empty lock files
    under store/locks/ excluded: see docs/security.md)."""
    state = {}
    for folder in folders:
        if not folder.exists():
            continue
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder)
            if relative.parts[:1] == ("hashes",) or relative.parts[:2] == ("store", "locks") or relative.parts == ("store",):
                continue
            key = f"{folder.name}/{relative}"
            state[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return state


def run_cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def assert_clear_refusal(code: int, output: str, fragments, exit_code: int = 2) -> str:
    """Exit code 2, one 'error:' paragraph without a traceback, naming every fragment."""
    assert code == exit_code, output
    assert "Traceback" not in output, output
    assert output.startswith("error:"), output
    message = " ".join(output.split())
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message
