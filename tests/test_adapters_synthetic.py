"""Synthetic adapters: reproducible bytes, real names, the flags and magnitudes each kind promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from loraforge.formats.adapters import load_factors, module_delta, parse_adapter
from loraforge.formats.adapters.matching import match_adapter
from loraforge.testing.arch import tiny_architecture
from loraforge.formats.safetensors_reader import open_safetensors
from loraforge.testing.adapters import DELTA_STD, factorize, select_targets, write_synthetic_adapter

SD1 = tiny_architecture("sd1")


def _parse(path):
    with open_safetensors(path) as file:
        return parse_adapter(file), dict(file.metadata)


def test_same_arguments_same_bytes_other_seed_other_bytes(tmp_path):
    first = write_synthetic_adapter(tmp_path / "a.safetensors", SD1, "loha", targets="all", seed=3)
    second = write_synthetic_adapter(tmp_path / "b.safetensors", SD1, "loha", targets="all", seed=3)
    other = write_synthetic_adapter(tmp_path / "c.safetensors", SD1, "loha", targets="all", seed=4)
    assert first.sha256 == second.sha256
    assert first.sha256 != other.sha256


def test_bytes_independent_of_hash_seed_and_threads(tmp_path):
    threads_before = torch.get_num_threads()
    script = (
        "import sys, torch; from loraforge.testing.arch import tiny_architecture;"
        "from loraforge.testing.adapters import write_synthetic_adapter;"
        "torch.set_num_threads(int(sys.argv[2]));"
        "print(write_synthetic_adapter(sys.argv[1], tiny_architecture('sd1'), 'lora', targets='all',"
        " tucker=True, dora=True).sha256)"
    )
    # One other process, with another hash seed and thread count than this one.
    env = {**os.environ, "PYTHONHASHSEED": "999"}
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "other.safetensors"), "2"],
        env=env, capture_output=True, text=True, check=True,
    )
    torch.set_num_threads(1)
    try:
        local = write_synthetic_adapter(
            tmp_path / "local.safetensors", SD1, "lora", targets="all", tucker=True, dora=True
        )
    finally:
        torch.set_num_threads(threads_before)
    assert out.stdout.strip() == local.sha256


def test_attn_targets_are_a_standard_kohya_lora():
    names = [spec.kohya for spec in select_targets(SD1, "attn", text_encoder=True)]
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in names
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj" in names
    assert "lora_te_text_model_encoder_layers_11_mlp_fc2" in names
    assert not any("resnets" in n or "conv" in n for n in names)
    without_te = select_targets(SD1, "attn", text_encoder=False)
    assert without_te and not any(spec.is_text_encoder for spec in without_te)
    assert len(select_targets(SD1, "all", text_encoder=True)) == len(SD1.modules)


def test_lora_and_locon_files(tmp_path):
    write_synthetic_adapter(tmp_path / "lora.safetensors", SD1, "lora", rank=8, alpha=4)
    adapter, metadata = _parse(tmp_path / "lora.safetensors")
    assert adapter.kind == "LoRA"
    assert {(m.rank, m.alpha, m.scale) for m in adapter.modules} == {(8, 4.0, 0.5)}
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_network_dim"] == "8" and metadata["ss_network_alpha"] == "4"
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_v2"] == "False"
    assert json.loads(metadata["ss_network_args"]) == {}

    write_synthetic_adapter(tmp_path / "locon.safetensors", SD1, "lora", targets="all", metadata={"ss_tag": "x"})
    adapter, metadata = _parse(tmp_path / "locon.safetensors")
    assert adapter.kind == "LoCon" and any(m.is_conv for m in adapter.modules)
    assert json.loads(metadata["ss_network_args"]) == {"conv_alpha": "4", "conv_dim": "4"}
    assert metadata["ss_tag"] == "x"


def test_file_dtype_and_alpha_default(tmp_path):
    write_synthetic_adapter(tmp_path / "a.safetensors", SD1, "lora", dtype="BF16", rank=2)
    with open_safetensors(tmp_path / "a.safetensors") as file:
        assert {file.info(n).dtype for n in file.names()} == {"BF16"}
        adapter = parse_adapter(file)
    assert {m.alpha for m in adapter.modules} == {2.0}  # alpha None writes alpha = rank


@pytest.mark.parametrize(
    ("kind", "options", "label", "check"),
    [
        ("loha", {"targets": "all", "tucker": True}, "LoHa", lambda m: m.tucker == m.is_conv),
        ("lokr", {}, "LoKr", lambda m: "lokr_w1" in m.keys and "lokr_w2_a" in m.keys),
        ("lokr-full", {}, "LoKr", lambda m: m.rank is None and m.scale == 1.0),
        ("lokr-both", {}, "LoKr", lambda m: "lokr_w1_a" in m.keys and "lokr_w2_a" in m.keys),
        ("diff", {"targets": "all"}, "diff", lambda m: m.rank is None),
        ("lora", {"dora": "out"}, "DoRA", lambda m: m.dora and m.shapes["dora_scale"][1:] == (1,) * (len(m.delta_shape) - 1)),
        ("lora", {"dora": True}, "DoRA", lambda m: m.dora and m.shapes["dora_scale"][0] == 1),
        ("peft", {"alpha": 2, "rank": 4}, "PEFT LoRA", lambda m: m.naming == "diffusers" and m.scale == 0.5),
    ],
)
def test_kinds(tmp_path, kind, options, label, check):
    path = tmp_path / "adapter.safetensors"
    write_synthetic_adapter(path, SD1, kind, **options)
    adapter, _ = _parse(path)
    assert adapter.kind == label
    assert all(check(m) for m in adapter.modules)


def test_diff_carries_bias_where_the_layer_has_one(tmp_path):
    write_synthetic_adapter(tmp_path / "d.safetensors", SD1, "diff", targets="all")
    adapter, _ = _parse(tmp_path / "d.safetensors")
    for module, spec in match_adapter(adapter, SD1).matched:
        assert module.has_bias == (spec.bias_key is not None)


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr", "lokr-full", "lokr-both", "diff", "peft"])
def test_delta_magnitudes_are_sensible(tmp_path, kind):
    path = tmp_path / "adapter.safetensors"
    write_synthetic_adapter(path, SD1, kind, targets="all", tucker=True, alpha=1)
    adapter, _ = _parse(path)
    stds = []
    with open_safetensors(path) as file:
        for module, spec in match_adapter(adapter, SD1).matched:
            stds.append(float(module_delta(module, load_factors(file, module), spec.shape).std()))
    median = sorted(stds)[len(stds) // 2]
    assert DELTA_STD / 3 < median < DELTA_STD * 3
    assert max(stds) < DELTA_STD * 20


def test_factorize_matches_lycoris_examples():
    # LyCORIS ``factorization(dim, -1)``: 128 -> (8, 16), 250 -> (10, 25), 360 -> (18, 20), 1024 -> (32, 32).
    assert factorize(128) == (8, 16)
    assert factorize(250) == (10, 25)
    assert factorize(1024) == (32, 32)
    assert factorize(127) == (1, 127)
    assert factorize(24) == (4, 6)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown synthetic adapter kind"):
        write_synthetic_adapter(tmp_path / "x.safetensors", SD1, "oft")
    with pytest.raises(ValueError, match="not kohya module names"):
        write_synthetic_adapter(tmp_path / "x.safetensors", SD1, "lora", targets=["lora_unet_nope"])


def test_values_reach_module_delta_exactly(tmp_path):
    # The file's up/down, multiplied here with an explicit sum, equal module_delta's ΔW.
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    path = tmp_path / "one.safetensors"
    write_synthetic_adapter(path, SD1, "lora", targets=[name], rank=3, alpha=1.5, dtype="F32")
    adapter, _ = _parse(path)
    (module,) = adapter.modules
    with open_safetensors(path) as file:
        up = file.read(f"{name}.lora_up.weight").double()
        down = file.read(f"{name}.lora_down.weight").double()
        delta = module_delta(module, load_factors(file, module), SD1.module_by_kohya[name].shape)
    expected = sum(torch.outer(up[:, r], down[r]) for r in range(3)) * 0.5
    torch.testing.assert_close(delta, expected, rtol=1e-12, atol=1e-15)
