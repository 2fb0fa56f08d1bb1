"""Bakes into ComfyUI "scaled fp8" Flux bases (issue 15, item 1).

Format (ComfyUI comfy/ops.py scaled_fp8_ops, comfy/model_detection.py): a
``scaled_fp8`` marker tensor, each Linear weight stored F8_E4M3 as
``<module>.weight`` with a float32 ``<module>.scale_weight``; the weight a
model computes with is their product; ``<module>.scale_input`` only scales
activations for fp8 matrix multiplication.

Every expected value here is computed independently of loraforge: ΔW in
float64 from the LoRA's factors (test_flux.DeltaSet), the base dequantised in
numpy float64, E4M3 rounding from the format's bit layout (all 254 finite
codes decoded here, nearest value, ties to the even code), the output scale by
the rule docs/baking.md states, evaluated with Fractions.
"""

from __future__ import annotations

import hashlib
import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from test_flux import DeltaSet, invoke

from loraforge.build import plan_build
from loraforge.formats.safetensors_reader import open_safetensors
from loraforge.formats.safetensors_writer import save_tensors
from loraforge.recipe.loader import load_recipe
from loraforge.testing.arch import tiny_architecture
from loraforge.testing.checkpoints import write_synthetic_checkpoint

TRANSFORMER = "model.diffusion_model."
SCALE_INPUT_KEYS = ("model.diffusion_model.img_in.scale_input", "model.diffusion_model.single_blocks.2.linear2.scale_input")


# --------------------------------------------------------------------------- E4M3 from its bit layout

def _decode(code: int) -> float | None:
    """The value of an E4M3 (float8_e4m3fn) byte: sign, 4 exponent bits (bias 7), 3 mantissa bits; S.1111.111 is NaN."""
    sign, exponent, mantissa = code >> 7, (code >> 3) & 0xF, code & 0x7
    if exponent == 0xF and mantissa == 0x7:
        return None
    magnitude = mantissa / 8 * 2.0**-6 if exponent == 0 else (1 + mantissa / 8) * 2.0 ** (exponent - 7)
    return -magnitude if sign else magnitude


POSITIVE = sorted((value, code) for code in range(128) if (value := _decode(code)) is not None)
POSITIVE_VALUES = np.array([value for value, _ in POSITIVE])
POSITIVE_CODES = np.array([code for _, code in POSITIVE], dtype=np.uint8)


def e4m3_codes(x: np.ndarray) -> np.ndarray:
    """RN to E4M3 (ties to the even code), as bytes; |x| must not exceed 448 (no saturation here either)."""
    magnitude = np.abs(x)
    assert magnitude.max() <= 448.0
    above = np.searchsorted(POSITIVE_VALUES, magnitude)  # first value >= |x|
    above = np.minimum(above, len(POSITIVE_VALUES) - 1)
    below = np.maximum(above - 1, 0)
    up, down = POSITIVE_VALUES[above] - magnitude, magnitude - POSITIVE_VALUES[below]
    take_up = (up < down) | ((up == down) & (POSITIVE_CODES[above] % 2 == 0))
    exact = POSITIVE_VALUES[above] == magnitude
    codes = np.where(exact | take_up, POSITIVE_CODES[above], POSITIVE_CODES[below])
    return np.where(np.signbit(x), codes | 0x80, codes).astype(np.uint8).reshape(-1)


def test_the_decoded_table_is_e4m3():
    assert len(POSITIVE) == 127 and POSITIVE_VALUES[-1] == 448.0 and POSITIVE_VALUES[1] == 2.0**-9
    every = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float64).numpy()
    mine = np.array([np.nan if _decode(c) is None else _decode(c) for c in range(256)])
    np.testing.assert_array_equal(every, mine)


def _round_bf16(x: np.ndarray) -> np.ndarray:
    """float64 -> nearest bfloat16 (ties to even), as float64, from the bit layout (normal range)."""
    bits = x.astype(np.float64).view(np.uint64)
    drop = np.uint64(45)
    odd = (bits >> drop) & np.uint64(1)
    return ((bits + (np.uint64(1) << np.uint64(44)) - np.uint64(1) + odd) >> drop << drop).view(np.float64)


def _least_float32_at_least(value: Fraction) -> float:
    candidate = np.float32(float(value))
    while Fraction(float(candidate)) < value:
        candidate = np.nextafter(candidate, np.float32(np.inf))
    while Fraction(float(np.nextafter(candidate, np.float32(0)))) >= value:
        candidate = np.nextafter(candidate, np.float32(0))
    return float(candidate)


def expected_scale(exact: np.ndarray, scale: float) -> float:
    """docs/baking.md: keep the scale unless max |X| > 448 scale; then the least float32 >= max |X| / 448."""
    amax = Fraction(float(np.abs(exact).max()))
    return scale if amax <= 448 * Fraction(scale) else _least_float32_at_least(amax / 448)


# --------------------------------------------------------------------------- files

def _read(path: Path) -> dict:
    with open_safetensors(path) as f:
        return {name: f.read(name) for name in f.names()}


def _bytes(tensor: torch.Tensor) -> np.ndarray:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy()


def _scaled_base(path: Path, headroom: float) -> dict:
    """A small Flux.1 dev (the family's builders) stored as ComfyUI scaled fp8: every 2-D transformer weight as
    F8_E4M3 with scale = headroom x amax / 448 (float32), two scale_input tensors, the empty F8_E4M3 marker."""
    bf16 = path.parent / "bf16.safetensors"
    write_synthetic_checkpoint(bf16, tiny_architecture("flux"), dtype="BF16", seed=3)
    out = {}
    for key, value in _read(bf16).items():
        if key.startswith(TRANSFORMER) and key.endswith(".weight") and value.dim() == 2:
            scale = torch.tensor(float(value.abs().max()) * headroom / 448, dtype=torch.float32)
            out[key] = (value.to(torch.float64) / float(scale)).to(torch.float8_e4m3fn)
            out[key[: -len(".weight")] + ".scale_weight"] = scale
        else:
            out[key] = value
    for key in SCALE_INPUT_KEYS:
        out[key] = torch.tensor(1.0, dtype=torch.float32)
    out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_tensors(path, out)
    bf16.unlink()
    return _read(path)  # in the file's order


def _recipe(folder: Path, save: str, strength: float = 1.0) -> Path:
    lines = ["loraforge: 1", "name: scaled", 'date: "2026-11-01"', f"precision: {{save: {save}}}", "inputs:",
             "  base: {source: base.safetensors}", "  lora: {source: lora.safetensors}", "targets:",
             f"  baked: {{kind: checkpoint, base: base, loras: [{{use: lora, strength: {strength}}}], "
             "output: out/baked.safetensors}"]
    (folder / "recipe.yaml").write_text("\n".join(lines) + "\n")
    return folder / "recipe.yaml"


def _project(folder: Path, headroom: float, save: str, strength: float = 1.0, seed: int = 31):
    folder.mkdir(parents=True, exist_ok=True)
    base = _scaled_base(folder / "base.safetensors", headroom)
    deltas = DeltaSet(rank=2, seed=seed)
    deltas.kohya_file(folder / "lora.safetensors")
    return base, deltas, _recipe(folder, save, strength)


def _build(recipe: Path) -> Path:
    result = invoke("build", recipe)
    assert result.exit_code == 0, result.output
    return recipe.parent / "out" / "baked.safetensors"


def _plus(base: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """base + delta, where a zero base plus nothing keeps its zero, sign included (docs/reproducibility.md)."""
    return np.where((delta == 0) & (base == 0), base, base + delta)


def _dequantised(base: dict, key: str) -> np.ndarray:
    scale = float(base[key[: -len(".weight")] + ".scale_weight"])
    return base[key].to(torch.float64).numpy() * scale  # exact: 4 x 24 significant bits


# --------------------------------------------------------------------------- save: same (requantised)

def test_save_same_requantises_baked_weights_with_their_scale(tmp_path):
    base, deltas, recipe = _project(tmp_path, headroom=2.0, save="same", strength=1.0)
    got = _read(_build(recipe))
    assert list(got) == list(base)  # same names, same order
    expected = deltas.expected_deltas()
    changed_codes = 0
    for key, value in base.items():
        if key in expected:
            scale = float(base[key[: -len(".weight")] + ".scale_weight"])
            exact = _plus(_dequantised(base, key), expected[key].numpy())
            assert expected_scale(exact, scale) == scale  # headroom: every value fits, the scale is kept
            want = e4m3_codes(exact / scale)
            assert got[key].dtype == torch.float8_e4m3fn
            np.testing.assert_array_equal(_bytes(got[key]), want, err_msg=key)
            changed_codes += int((want != _bytes(value)).sum())
        else:  # untouched weights, scales, scale_input, the marker: the base's bytes
            assert got[key].dtype == value.dtype and np.array_equal(_bytes(got[key]), _bytes(value)), key
    assert changed_codes > 0


def test_a_delta_beyond_448_x_scale_gets_a_new_scale_and_nothing_clips(tmp_path):
    base, deltas, recipe = _project(tmp_path, headroom=1.0, save="same", strength=40.0)
    got = _read(_build(recipe))
    rescaled = 0
    for key, delta in deltas.expected_deltas().items():
        scale_key = key[: -len(".weight")] + ".scale_weight"
        scale = float(base[scale_key])
        exact = _plus(_dequantised(base, key), 40.0 * delta.numpy())
        new_scale = expected_scale(exact, scale)
        assert float(got[scale_key]) == new_scale and got[scale_key].dtype == torch.float32
        assert got[scale_key].shape == base[scale_key].shape
        if new_scale != scale:
            rescaled += 1
            assert np.abs(exact).max() > 448 * scale  # the old scale would have clipped
        np.testing.assert_array_equal(_bytes(got[key]), e4m3_codes(exact / new_scale), err_msg=key)
        assert np.abs(got[key].to(torch.float64).numpy()).max() <= 448.0
        assert not torch.isnan(got[key].to(torch.float32)).any()
    assert rescaled >= 4


def test_requantised_bytes_are_reproducible(tmp_path):
    outputs = []
    for folder in ("one", "two"):
        _, _, recipe = _project(tmp_path / folder, headroom=1.0, save="same", strength=40.0)
        outputs.append(hashlib.sha256(_build(recipe).read_bytes()).hexdigest())
    assert outputs[0] == outputs[1]


# --------------------------------------------------------------------------- save: a float dtype (dequantised)

def test_save_bfloat16_dequantises_every_scaled_weight_and_leaves_the_scales_out(tmp_path):
    base, deltas, recipe = _project(tmp_path, headroom=1.0, save="bfloat16", strength=0.75)
    got = _read(_build(recipe))
    dropped = {k for k in base if k.endswith((".scale_weight", ".scale_input")) or k == "scaled_fp8"}
    assert len(dropped) == sum(1 for k in base if k.endswith(".scale_weight")) + len(SCALE_INPUT_KEYS) + 1
    assert list(got) == [k for k in base if k not in dropped]
    expected = deltas.expected_deltas()
    for key, tensor in got.items():
        assert tensor.dtype == torch.bfloat16, key
        if key[: -len(".weight")] + ".scale_weight" in base:
            exact = _plus(_dequantised(base, key), 0.75 * expected[key].numpy() if key in expected else 0.0)
            np.testing.assert_array_equal(tensor.to(torch.float64).numpy(), _round_bf16(exact), err_msg=key)
        else:
            assert np.array_equal(_bytes(tensor), _bytes(base[key])), key  # bf16 already: unchanged


# --------------------------------------------------------------------------- plan, inspect, refusals

def test_plan_reports_the_scaled_base_and_its_memory(tmp_path):
    base, _, recipe = _project(tmp_path, headroom=2.0, save="same")
    scaled_count = sum(1 for k in base if k.endswith(".scale_weight"))
    planned = invoke("plan", recipe, "--json")
    assert planned.exit_code == 0, planned.output
    target = json.loads(planned.output)["targets"][0]
    assert target["scaled_fp8"] == {"scaled_weights": scaled_count, "baked": 8, "saved_as": "F8_E4M3 + scale_weight"}
    text = invoke("plan", recipe).output
    assert "scaled fp8 base" in text and "requantised to F8_E4M3" in text

    # The same bake on a plain fp8 copy (scales and marker removed) differs in memory only by the requantising buffers.
    plain = tmp_path / "plain"
    plain.mkdir()
    save_tensors(plain / "base.safetensors", {k: v for k, v in base.items() if not k.endswith((".scale_weight", ".scale_input")) and k != "scaled_fp8"})
    (plain / "lora.safetensors").write_bytes((tmp_path / "lora.safetensors").read_bytes())
    plain_target = json.loads(invoke("plan", _recipe(plain, "bfloat16"), "--json").output)["targets"][0]
    scaled_bf16 = json.loads(invoke("plan", _recipe(tmp_path, "bfloat16"), "--json").output)["targets"][0]
    assert "scaled_fp8" not in plain_target and scaled_bf16["scaled_fp8"]["saved_as"] == "BF16, scales left out"
    largest = max(int(np.prod(base[k].shape)) for k in DeltaSet(rank=2, seed=31).expected_deltas())
    memory = {name: plan_build(load_recipe(folder / "recipe.yaml")).targets[0].memory_bytes
              for name, folder in (("plain", plain), ("scaled", tmp_path))}
    assert memory["scaled"] - memory["plain"] == (8 + 1) * largest


def test_the_scaled_policy_is_in_the_action_key_of_scaled_bases_only(tmp_path, monkeypatch):
    """Existing locks keep verifying: a bake's key gains the scaled-fp8 policy only when its base is scaled."""
    from loraforge.plan import bake

    _project(tmp_path, headroom=2.0, save="same")
    plain = tmp_path / "plain"
    plain.mkdir()
    base = _read(tmp_path / "base.safetensors")
    save_tensors(plain / "base.safetensors", {k: v for k, v in base.items() if not k.endswith((".scale_weight", ".scale_input")) and k != "scaled_fp8"})
    (plain / "lora.safetensors").write_bytes((tmp_path / "lora.safetensors").read_bytes())
    _recipe(plain, "bfloat16")
    _recipe(tmp_path, "bfloat16")
    keys = {}
    for policy in (bake.SCALED_FP8_POLICY, "another policy text"):
        monkeypatch.setattr(bake, "SCALED_FP8_POLICY", policy)
        keys[policy] = [plan_build(load_recipe(folder / "recipe.yaml")).targets[0].action_key for folder in (plain, tmp_path)]
    (plain_a, scaled_a), (plain_b, scaled_b) = keys.values()
    assert plain_a == plain_b and scaled_a != scaled_b


def test_inspect_says_scaled_fp8(tmp_path):
    _project(tmp_path, headroom=2.0, save="same")
    report = json.loads(invoke("inspect", "--json", tmp_path / "base.safetensors").output)
    assert report["float8"]["kind"] == "scaled" and report["float8"]["marker"] == "scaled_fp8"
    assert report["float8"]["scale_input"] == 2 and report["float8"]["scaled_weights"] == report["float8"]["float8_tensors"]
    from loraforge.render import _kind_line

    assert _kind_line(report).endswith("[scaled fp8]")  # the kind line of `loraforge inspect`


def test_a_scale_that_is_not_float32_is_refused_for_requantising(tmp_path):
    base, _, recipe = _project(tmp_path, headroom=2.0, save="same")
    key = "model.diffusion_model.double_blocks.1.img_attn.qkv.scale_weight"
    save_tensors(tmp_path / "base.safetensors", {k: (v.to(torch.float16) if k == key else v) for k, v in base.items()})
    result = invoke("build", recipe)
    assert result.exit_code != 0 and "not F8_E4M3 with a float32 scalar scale" in result.output
    assert "save: bfloat16" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out" / "baked.safetensors").exists()
    assert invoke("build", _recipe(tmp_path, "bfloat16")).exit_code == 0  # dequantising takes any scale dtype


# --------------------------------------------------------------------------- ties and near-ties (ops level)

def test_values_at_and_next_to_e4m3_midpoints_round_once_from_the_exact_value():
    """X / scale at an E4M3 midpoint ties to the even code; 2^-30 off a midpoint (below float32's resolution,
    so float32 sees the midpoint itself) goes to the nearer neighbour: one rounding, from the exact value."""
    from loraforge.ops.bake import LowRankTerm, bake_weight_scaled_fp8

    tiny = 2.0**-30
    # midpoints: 1.0625 (1 | 1.125: even is 1), 1.1875 (1.125 | 1.25: even is 1.25), -2.125 (-2 | -2.25: even is -2)
    values = [1.0625, 1.0625 + tiny, 1.0625 - tiny, 1.1875, 1.1875 - tiny, -2.125, -2.125 - tiny, 0.0]
    weight = torch.zeros(1, len(values), dtype=torch.float64)
    term = LowRankTerm(torch.ones(1, 1, dtype=torch.float64), torch.tensor([values], dtype=torch.float64))
    stored, scale = bake_weight_scaled_fp8(weight, [term], 1.0)
    assert scale == 1.0
    got = stored.to(torch.float64).view(-1).tolist()
    assert got == [1.0, 1.125, 1.0, 1.25, 1.125, -2.0, -2.25, 0.0]
    np.testing.assert_array_equal(_bytes(stored), e4m3_codes(np.array(values)))  # the table's rounding agrees
    half = bake_weight_scaled_fp8(weight, [term], 0.5)  # 448 x 0.5 = 224 still holds every value: the scale stays
    assert half[1] == 0.5 and half[0].to(torch.float64).view(-1).tolist() == [2.0, 2.25, 2.0, 2.5, 2.25, -4.0, -4.5, 0.0]


def test_a_file_with_each_weight_before_its_scale_bakes_to_the_same_tensors(tmp_path):
    """The scale may come before its weight (sorted files) or after it: the same bytes per tensor either way."""
    from loraforge.formats.safetensors_writer import SafetensorsWriter, TensorPlan

    base, _, recipe = _project(tmp_path / "sorted", headroom=1.0, save="same", strength=40.0)
    sorted_out = _read(_build(recipe))
    order = sorted(base, key=lambda k: (k.rsplit(".", 1)[0], k.endswith(".scale_weight")))  # weight, then its scale
    assert order.index("model.diffusion_model.img_in.weight") < order.index("model.diffusion_model.img_in.scale_weight")
    other = tmp_path / "weight-first"
    other.mkdir()
    with SafetensorsWriter(other / "base.safetensors", [TensorPlan.of(k, base[k]) for k in order]) as writer:
        for key in order:
            writer.write(key, base[key])
        writer.commit()
    (other / "lora.safetensors").write_bytes((tmp_path / "sorted" / "lora.safetensors").read_bytes())
    got = _read(_build(_recipe(other, "same", 40.0)))
    assert sorted(got) == sorted(sorted_out)
    for key, tensor in got.items():
        assert tensor.dtype == sorted_out[key].dtype and np.array_equal(_bytes(tensor), _bytes(sorted_out[key])), key


def test_kind_convert_dequantises_a_scaled_base_too(tmp_path):
    """`kind: convert` to bfloat16 writes stored x scale rounded once, and leaves the scales and marker out (it
    used to round the float32 scales to bfloat16 and keep the fp8 weights)."""
    base, _, _ = _project(tmp_path, headroom=1.0, save="same")
    (tmp_path / "recipe.yaml").write_text("\n".join([
        "loraforge: 1", "name: conv", 'date: "2026-11-01"', "inputs:", "  base: {source: base.safetensors}",
        "targets:", "  plain: {kind: convert, source: base, dtype: bfloat16, output: out/plain.safetensors}"]) + "\n")
    result = invoke("build", tmp_path / "recipe.yaml")
    assert result.exit_code == 0, result.output
    got = _read(tmp_path / "out" / "plain.safetensors")
    assert list(got) == [k for k in base if not k.endswith((".scale_weight", ".scale_input")) and k != "scaled_fp8"]
    for key, tensor in got.items():
        assert tensor.dtype == torch.bfloat16, key
        if key[: -len(".weight")] + ".scale_weight" in base:
            np.testing.assert_array_equal(tensor.to(torch.float64).numpy(), _round_bf16(_dequantised(base, key)), err_msg=key)
