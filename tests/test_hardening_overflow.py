"""Issue 17, High 3: an output tensor that overflows its save dtype stops the build, naming it.

A finite but extreme strength, alpha or factor (or a base value beyond the
save dtype) used to be rounded to ±inf and written with exit 0. Now: exit 2,
one paragraph naming the target, the tensor and the count, and nothing
written (the previous output stays). The count is checked against an
independent float64 computation.
"""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from hostile import OUTPUT, RECIPE, assert_clear_refusal, make_project, run_cli, snapshot, write_models

STYLE_MODULE = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
BASE_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def previous_output(tmp_path_factory, models) -> bytes:
    root = make_project(tmp_path_factory.mktemp("good"), models)
    code, output = run_cli("build", root / "recipe.yaml", "-q")
    assert code == 0, output
    return (root / OUTPUT).read_bytes()


def _rewrite(path, change) -> None:
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def _refused(root, before, fragments, command="build"):
    started = time.monotonic()
    code, output = run_cli(command, root / "recipe.yaml", "-q")
    message = assert_clear_refusal(code, output, fragments)
    assert "Nothing was written" in message and len(output.strip().splitlines()) >= 1 and "\n\n" not in output.strip()
    assert snapshot(root) == before  # the previous output unchanged, no temp file, no lock change
    assert time.monotonic() - started < 60  # overflowing elements do not each take the exact path
    return message


def test_an_extreme_strength_is_refused_with_target_tensor_and_count(tmp_path, models, previous_output):
    root = make_project(tmp_path, models, previous_output, RECIPE.replace("strength: 0.7", "strength: 1.0e+30"))
    message = _refused(root, snapshot(root), ["target 'baked'", "infinite or NaN values", "float32"])
    assert "tensor " in message and "the previous output is unchanged" in message


def test_an_extreme_alpha_is_refused(tmp_path, models, previous_output):
    root = make_project(tmp_path, models, previous_output)
    _rewrite(root / "models/style.safetensors",
             lambda t: t.update({k: torch.tensor(1e30, dtype=torch.float32) for k in t if k.endswith(".alpha")}))
    _refused(root, snapshot(root), ["target 'baked'", "infinite or NaN values"])


def test_one_module_with_huge_factors_is_refused_with_the_exact_count(tmp_path, models, previous_output):
    root = make_project(tmp_path, models, previous_output, RECIPE.replace("strength: 0.7", "strength: 1.0"))
    lora = root / "models/style.safetensors"

    def huge(tensors):
        for role in ("lora_up", "lora_down"):
            key = f"{STYLE_MODULE}.{role}.weight"
            tensors[key] = torch.full_like(tensors[key], 60000.0)

    _rewrite(lora, huge)
    tensors = load_file(lora)
    up = tensors[f"{STYLE_MODULE}.lora_up.weight"].double()
    down = tensors[f"{STYLE_MODULE}.lora_down.weight"].double()
    alpha = tensors.get(f"{STYLE_MODULE}.alpha")
    scale = (float(alpha) if alpha is not None else up.shape[1]) / up.shape[1]
    base = load_file(root / "models/base.safetensors")[BASE_KEY].double()
    baked = base + scale * (up @ down).reshape(base.shape)
    expected = int((baked.abs() >= 65520).sum())  # float16's overflow threshold
    assert expected > 0
    message = _refused(root, snapshot(root), ["target 'baked'", BASE_KEY, f"{expected:,} infinite or NaN values"])
    assert "float16" in message or "F16" in message


def test_a_base_value_beyond_the_save_dtype_is_refused_when_converted(tmp_path, models, previous_output):
    root = make_project(tmp_path, models, previous_output)
    untouched = "model.diffusion_model.out.2.weight"

    def big(tensors):
        assert untouched in tensors
        tensors[untouched] = tensors[untouched].clone()
        tensors[untouched].view(-1)[:3] = 1e10

    _rewrite(root / "models/base.safetensors", big)
    _refused(root, snapshot(root), ["target 'baked'", untouched, "3 infinite or NaN values", "converted"])


def test_a_merge_whose_factors_overflow_is_refused(tmp_path, models):
    recipe = RECIPE.replace(
        "targets:\n", "targets:\n  merged:\n    kind: lora\n    method: concat\n    loras:\n      - {use: style, strength: 1.0e+30}\n"
    )
    root = make_project(tmp_path, models, None, recipe)
    _refused(root, snapshot(root), ["target 'merged'", "lora_up.weight", "infinite or NaN values"])


def test_normal_extreme_but_representable_values_still_build(tmp_path, models):
    root = make_project(tmp_path, models, None, RECIPE.replace("strength: 0.7", "strength: 100"))
    code, output = run_cli("build", root / "recipe.yaml", "-q")
    assert code == 0, output
