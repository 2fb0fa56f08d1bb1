"""Issue 17, Medium 10: a float8 base honours `save:` and never loses a LoRA's change silently.

A float8 base (E4M3 or E5M2, as Flux fp8 checkpoints ship) baked with
`save: float16` (or bfloat16, float32) is written in that dtype: float8
widens exactly, so every untouched tensor equals the base's value and every
baked tensor equals the bake of the same base stored in float32 (whose
numbers tests/test_bake_reference.py checks against float64 references).
With `save: same` the baked weights would stay float8, where a LoRA's
change mostly rounds away: the plan refuses in one paragraph.
"""

from __future__ import annotations

import struct
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hostile import assert_clear_refusal, make_project, run_cli, snapshot, write_models

FP8 = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
SAVE = {"float16": ("F16", torch.float16), "bfloat16": ("BF16", torch.bfloat16), "float32": ("F32", torch.float32)}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_models(tmp_path_factory.mktemp("models"))


def _fp8_project(root, models, code, save):
    project = make_project(root, models)
    base = load_file(project / "models/base.safetensors")
    narrow = {k: (v.to(FP8[code]) if v.is_floating_point() else v) for k, v in base.items()}
    save_file(narrow, project / "models/base.safetensors")
    # the same values, stored in float32 (exact): the reference bake's base
    save_file({k: (v.to(torch.float32) if v.is_floating_point() else v) for k, v in narrow.items()}, project / "models/wide.safetensors")
    recipe = project / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace("precision: {save: float16}", f"precision: {{save: {save}}}"))
    return project, narrow


def _dtypes(path) -> set[str]:
    data = path.read_bytes()
    header = json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]])
    return {entry["dtype"] for name, entry in header.items() if name != "__metadata__"}


@pytest.mark.parametrize("code", sorted(FP8))
@pytest.mark.parametrize("save", sorted(SAVE))
def test_a_float8_base_is_saved_in_the_save_dtype(tmp_path, models, code, save):
    project, narrow = _fp8_project(tmp_path / "fp8", models, code, save)
    code_out, output = run_cli("build", project / "recipe.yaml", "-q")
    assert code_out == 0, output
    baked = load_file(project / "dist/baked.safetensors")
    assert _dtypes(project / "dist/baked.safetensors") <= {SAVE[save][0], "I64", "I32"}
    # the reference: the same recipe on the float32 copy of the float8 weights
    wide_recipe = (project / "recipe.yaml").read_text().replace("models/base.safetensors", "models/wide.safetensors")
    (project / "wide.yaml").write_text(wide_recipe.replace("baked:", "wide:"))
    code_out, output = run_cli("build", project / "wide.yaml", "-q")
    assert code_out == 0, output
    reference = load_file(project / "dist/wide.safetensors")
    changed = 0
    for name, tensor in baked.items():
        assert torch.equal(tensor, reference[name]), name
        if tensor.is_floating_point():
            widened = narrow[name].to(torch.float64)
            if not torch.equal(tensor.to(torch.float64), widened):
                changed += 1
    assert changed > 100  # the LoRA's change is in the file, not rounded away


@pytest.mark.parametrize("code", sorted(FP8))
def test_a_float8_bake_saved_as_float8_is_refused(tmp_path, models, code):
    project, _ = _fp8_project(tmp_path / "fp8", models, code, "same")
    before = snapshot(project)
    code_out, output = run_cli("build", project / "recipe.yaml", "-q")
    assert_clear_refusal(code_out, output, ["target 'baked' bakes into", f"float8 ({code})", "save: same", "save: bfloat16"])
    assert output.strip().count("\n\n") == 0
    after = snapshot(project)
    assert after == before
    code_out, output = run_cli("plan", project / "recipe.yaml")
    assert code_out == 2 and "float8" in output and "Traceback" not in output
