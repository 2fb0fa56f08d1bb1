"""`kind: convert` end to end from the CLI, against references computed here from the raw bits.

The references share no code with loraforge: float16 from numpy's IEEE
cast of float32, bfloat16 from round-to-nearest-even on the float32 bit
pattern written out by hand, files read with the `safetensors` package.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from loraforge.cli import app
from loraforge.testing.adapters import write_synthetic_adapter
from loraforge.testing.arch import tiny_architecture
from loraforge.testing.checkpoints import write_synthetic_checkpoint

runner = CliRunner()


def invoke(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


def bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, round to nearest, ties to even (finite inputs)."""
    bits = values.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def read(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as handle:
        return handle.metadata() or {}


def data_sha256(path: Path) -> str:
    raw = path.read_bytes()
    (header_size,) = struct.unpack("<Q", raw[:8])
    return hashlib.sha256(raw[8 + header_size:]).hexdigest()


RECIPE = """\
loraforge: 1
name: convert
date: "2026-11-01"
inputs:
  base: {source: base.safetensors}
  style: {source: style.safetensors}
targets:
  base16:
    kind: convert
    source: base
    dtype: float16
  basebf:
    kind: convert
    source: base
    dtype: bfloat16
  style16:
    kind: convert
    source: style
    dtype: float16
  baked:
    kind: checkpoint
    base: base16
    loras:
      - {use: style16, strength: 0.7}
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("convert")
    sd1 = tiny_architecture("sd1")
    write_synthetic_checkpoint(folder / "base.safetensors", sd1, seed=1, dtype="F32", metadata={"note": "kept", "modelspec.hash_sha256": "0xstale"})
    write_synthetic_adapter(
        folder / "style.safetensors", sd1, "lora", rank=4, seed=2, dtype="F32",
        metadata={"ss_network_dim": "4", "sshs_legacy_hash": "deadbeef", "sshs_model_hash": "stale"},
    )
    (folder / "recipe.yaml").write_text(RECIPE)
    result = invoke("build", folder / "recipe.yaml", "-q")
    assert result.exit_code == 0, result.output
    return folder


def test_checkpoint_floats_are_rounded_once_to_the_target_dtype(built):
    source = read(built / "base.safetensors")
    half = read(built / "dist" / "base16.safetensors")
    brain = read(built / "dist" / "basebf.safetensors")
    assert list(half) == list(source) and list(brain) == list(source)
    floats = 0
    for key, tensor in source.items():
        if tensor.dtype != torch.float32:  # integer tensors are copied as they are
            assert torch.equal(half[key], tensor) and torch.equal(brain[key], tensor)
            continue
        floats += 1
        values = tensor.numpy()
        assert half[key].dtype == torch.float16
        assert np.array_equal(half[key].numpy().view(np.uint16), values.astype(np.float16).view(np.uint16)), key
        assert brain[key].dtype == torch.bfloat16
        assert np.array_equal(brain[key].view(torch.int16).numpy().view(np.uint16), bfloat16_bits(values)), key
    assert floats > 10


def test_metadata_is_kept_provenance_rewritten_and_data_hashes_recomputed(built):
    meta = metadata(built / "dist" / "style16.safetensors")
    assert meta["ss_network_dim"] == "4"
    assert "sshs_legacy_hash" not in meta  # a hash of file bytes that the rewrite invalidates
    assert meta["sshs_model_hash"] == data_sha256(built / "dist" / "style16.safetensors")
    assert meta["loraforge.target"] == "style16"
    assert json.loads(meta["loraforge.inputs"])["style"] == hashlib.sha256((built / "style.safetensors").read_bytes()).hexdigest()
    base_meta = metadata(built / "dist" / "base16.safetensors")
    assert base_meta["note"] == "kept"
    assert base_meta["modelspec.hash_sha256"] == "0x" + data_sha256(built / "dist" / "base16.safetensors")


def test_a_converted_lora_bakes_like_the_same_lora_converted_by_hand(built, tmp_path):
    """The bake reads the converted LoRA (planned before it existed); the same bake from a hand-made F16 copy agrees."""
    style = read(built / "style.safetensors")
    by_hand = {key: torch.from_numpy(t.numpy().astype(np.float16)) if t.dtype == torch.float32 else t for key, t in style.items()}
    save_file(by_hand, str(tmp_path / "style16.safetensors"), metadata=metadata(built / "style.safetensors"))
    (tmp_path / "base16.safetensors").symlink_to(built / "dist" / "base16.safetensors")
    (tmp_path / "recipe.yaml").write_text(
        'loraforge: 1\nname: convert\ndate: "2026-11-01"\ninputs:\n'
        "  base16: {source: base16.safetensors}\n  style16: {source: style16.safetensors}\n"
        "targets:\n  baked:\n    kind: checkpoint\n    base: base16\n    loras:\n      - {use: style16, strength: 0.7}\n"
    )
    result = invoke("build", tmp_path / "recipe.yaml", "-q")
    assert result.exit_code == 0, result.output
    ours, theirs = read(built / "dist" / "baked.safetensors"), read(tmp_path / "dist" / "baked.safetensors")
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    base16 = read(built / "dist" / "base16.safetensors")
    assert sum(not torch.equal(ours[key], base16[key]) for key in ours) > 5


def test_float64_is_rounded_once_not_through_float32(tmp_path):
    # 1 + 2^-11 + 2^-40: just above a float16 midpoint. Through float32 it becomes the midpoint itself
    # (2^-40 is below float32's half-ulp), which ties to even: 1.0. Rounded once it is 1 + 2^-10.
    value = 1 + 2.0**-11 + 2.0**-40
    save_file({"w": torch.tensor([value, -value, 3.0], dtype=torch.float64)}, str(tmp_path / "m.safetensors"))
    (tmp_path / "recipe.yaml").write_text(
        "loraforge: 1\nname: f64\ninputs:\n  m: {source: m.safetensors}\n"
        "targets:\n  half:\n    kind: convert\n    source: m\n    dtype: float16\n"
    )
    result = invoke("build", tmp_path / "recipe.yaml", "-q")
    assert result.exit_code == 0, result.output
    out = read(tmp_path / "dist" / "half.safetensors")["w"]
    assert out.tolist() == [1 + 2.0**-10, -(1 + 2.0**-10), 3.0]


def test_a_value_float16_cannot_hold_stops_the_build_and_writes_nothing(tmp_path):
    save_file({"w": torch.tensor([1.0, 70000.0, -1e6, float("inf")], dtype=torch.float32)}, str(tmp_path / "m.safetensors"))
    (tmp_path / "recipe.yaml").write_text(
        "loraforge: 1\nname: big\ninputs:\n  m: {source: m.safetensors}\n"
        "targets:\n  half:\n    kind: convert\n    source: m\n    dtype: float16\n"
    )
    result = invoke("build", tmp_path / "recipe.yaml", "-q")
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert "tensor w" in message and "holds 2 values of 4" in message and "bfloat16 or float32" in message
    assert not (tmp_path / "dist").exists() or not any((tmp_path / "dist").iterdir())


def test_plan_verify_and_a_second_build(built):
    plan = invoke("plan", built / "recipe.yaml", "--json")
    assert plan.exit_code == 0, plan.output
    targets = {t["name"]: t for t in json.loads(plan.output)["targets"]}
    assert targets["style16"]["kind"] == "convert" and targets["style16"]["produces"] == "lora"
    assert targets["base16"]["produces"] == "checkpoint" and targets["base16"]["architecture"] == "sd1"
    assert all(t["status"] == "up to date" for t in targets.values())
    again = invoke("build", built / "recipe.yaml", "-q")
    assert again.exit_code == 0 and "nothing to do" in again.output
    verified = invoke("verify", built / "recipe.yaml")
    assert verified.exit_code == 0, verified.output


def test_bad_recipes_are_one_positioned_paragraph(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "m.safetensors"))
    base = "loraforge: 1\nname: bad\ninputs:\n  m: {source: m.safetensors}\ntargets:\n  half:\n    kind: convert\n    source: m\n"
    for tail, fragment in (
        ("    dtype: fp8\n", "unknown dtype 'fp8'"),
        ("    dtype: half\n", "write float16"),
        ("", "dtype"),
    ):
        (tmp_path / "recipe.yaml").write_text(base + tail)
        result = invoke("plan", tmp_path / "recipe.yaml")
        message = " ".join(result.output.split())
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert "recipe.yaml:" in message and fragment in message, message
