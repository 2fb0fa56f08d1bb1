"""parse_adapter: key claiming, per-kind module facts, errors, load_factors/module_delta."""

from __future__ import annotations

import json

import pytest
import torch

from loraforge.errors import FormatError
from loraforge.formats.adapters import load_factors, module_delta, module_effective_delta, parse_adapter
from loraforge.formats.safetensors_reader import open_safetensors
from loraforge.formats.safetensors_writer import save_tensors

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"


def _parse(tmp_path, tensors, metadata=None, name="adapter.safetensors"):
    path = tmp_path / name
    save_tensors(path, tensors, metadata)
    with open_safetensors(path) as file:
        return parse_adapter(file), path


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _lora(name, out=8, cin=6, rank=2, alpha=1.0, kernel=()):
    up_kernel = (1, 1) if kernel else ()
    tensors = {
        f"{name}.lora_down.weight": _randn(rank, cin, *kernel, seed=1),
        f"{name}.lora_up.weight": _randn(out, rank, *up_kernel, seed=2),
    }
    if alpha is not None:
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    return tensors


# --------------------------------------------------------------------------- per kind


def test_kohya_lora_module_facts(tmp_path):
    adapter, _ = _parse(tmp_path, _lora(Q, alpha=1.0))
    (module,) = adapter.modules
    assert module.name == Q and module.naming == "kohya" and module.kind == "lora"
    assert (module.rank, module.alpha, module.scale) == (2, 1.0, 0.5)
    assert module.delta_shape == (8, 6) and not module.is_conv and not module.tucker and not module.dora
    assert dict(module.keys) == {"alpha": f"{Q}.alpha", "down": f"{Q}.lora_down.weight", "up": f"{Q}.lora_up.weight"}
    assert adapter.kind == "LoRA" and adapter.unclaimed == ()


def test_missing_alpha_means_scale_one(tmp_path):
    adapter, _ = _parse(tmp_path, _lora(Q, alpha=None))
    assert adapter.modules[0].alpha is None and adapter.modules[0].scale == 1.0


def test_locon_and_tucker(tmp_path):
    tensors = {**_lora(Q), **_lora(CONV, cin=4, kernel=(3, 3))}
    name = "lora_unet_down_blocks_0_resnets_0_conv2"
    tensors.update(
        {
            f"{name}.lora_down.weight": _randn(2, 4, 1, 1),
            f"{name}.lora_mid.weight": _randn(2, 2, 3, 3),
            f"{name}.lora_up.weight": _randn(8, 2, 1, 1),
            f"{name}.alpha": torch.tensor(2.0),
        }
    )
    adapter, _ = _parse(tmp_path, tensors)
    conv, tucker, linear = (adapter.module(n) for n in (CONV, name, Q))
    assert conv.is_conv and conv.delta_shape == (8, 4, 3, 3) and not conv.tucker
    assert tucker.tucker and tucker.delta_shape == (8, 4, 3, 3) and tucker.rank == 2
    assert not linear.is_conv
    assert adapter.kind == "LoCon"
    assert [m.name for m in adapter.modules] == sorted([CONV, name, Q])


def test_loha_plain_and_tucker(tmp_path):
    tensors = {
        f"{Q}.hada_w1_a": _randn(8, 2), f"{Q}.hada_w1_b": _randn(2, 6),
        f"{Q}.hada_w2_a": _randn(8, 2), f"{Q}.hada_w2_b": _randn(2, 6),
        f"{Q}.alpha": torch.tensor(1.0),
        f"{CONV}.hada_t1": _randn(3, 3, 3, 3), f"{CONV}.hada_w1_a": _randn(3, 8), f"{CONV}.hada_w1_b": _randn(3, 4),
        f"{CONV}.hada_t2": _randn(3, 3, 3, 3), f"{CONV}.hada_w2_a": _randn(3, 8), f"{CONV}.hada_w2_b": _randn(3, 4),
    }
    adapter, _ = _parse(tmp_path, tensors)
    plain, tucker = adapter.module(Q), adapter.module(CONV)
    assert (plain.kind, plain.rank, plain.scale, plain.delta_shape) == ("loha", 2, 0.5, (8, 6))
    assert (tucker.tucker, tucker.rank, tucker.scale, tucker.delta_shape) == (True, 3, 1.0, (8, 4, 3, 3))
    assert adapter.kind == "LoHa"


def test_lokr_variants_and_scale_rule(tmp_path):
    full = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    tensors = {
        # factorised w2: scale alpha / rank
        f"{Q}.lokr_w1": _randn(2, 2), f"{Q}.lokr_w2_a": _randn(4, 3), f"{Q}.lokr_w2_b": _randn(3, 3),
        f"{Q}.alpha": torch.tensor(1.5),
        # both full: scale 1 whatever alpha says
        f"{full}.lokr_w1": _randn(2, 2), f"{full}.lokr_w2": _randn(4, 4), f"{full}.alpha": torch.tensor(7.0),
        # Tucker w2 on a conv
        f"{CONV}.lokr_w1_a": _randn(2, 3), f"{CONV}.lokr_w1_b": _randn(3, 2),
        f"{CONV}.lokr_t2": _randn(3, 3, 3, 3), f"{CONV}.lokr_w2_a": _randn(3, 4), f"{CONV}.lokr_w2_b": _randn(3, 4),
        f"{CONV}.alpha": torch.tensor(3.0),
    }
    adapter, _ = _parse(tmp_path, tensors)
    factorised, both_full, tucker = adapter.module(Q), adapter.module(full), adapter.module(CONV)
    assert (factorised.rank, factorised.scale, factorised.delta_shape) == (3, 0.5, (8, 6))
    assert (both_full.rank, both_full.scale, both_full.delta_shape) == (None, 1.0, (8, 8))
    assert (tucker.tucker, tucker.rank, tucker.scale, tucker.delta_shape) == (True, 3, 1.0, (8, 8, 3, 3))
    assert adapter.kind == "LoKr"


def test_diff_with_bias(tmp_path):
    adapter, _ = _parse(tmp_path, {f"{Q}.diff": _randn(8, 6), f"{Q}.diff_b": _randn(8)})
    (module,) = adapter.modules
    assert (module.kind, module.rank, module.scale, module.has_bias) == ("diff", None, 1.0, True)
    assert adapter.kind == "diff"


def test_dora_scale_marks_module(tmp_path):
    tensors = {**_lora(Q), f"{Q}.dora_scale": torch.ones(1, 6)}
    adapter, _ = _parse(tmp_path, tensors)
    assert adapter.modules[0].dora and adapter.kind == "DoRA"
    assert adapter.modules[0].keys["dora_scale"] == f"{Q}.dora_scale"


# --------------------------------------------------------------------------- PEFT


PEFT_Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
PEFT_TE = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"


def _peft(name, out=8, cin=6, rank=2, seed=0):
    return {f"{name}.lora_A.weight": _randn(rank, cin, seed=seed), f"{name}.lora_B.weight": _randn(out, rank, seed=seed + 1)}


def test_peft_naming_and_no_alpha(tmp_path):
    adapter, _ = _parse(tmp_path, {**_peft(PEFT_Q), **_peft(PEFT_TE)})
    assert adapter.kind == "PEFT LoRA"
    for module in adapter.modules:
        assert module.naming == "diffusers" and module.kind == "lora" and module.alpha is None and module.scale == 1.0
    assert {m.component for m in adapter.modules} == {"unet", "te"}


def test_peft_alpha_from_diffusers_metadata(tmp_path):
    config = {"unet.r": 2, "unet.lora_alpha": 1, "text_encoder.r": 2, "text_encoder.lora_alpha": 8,
              "text_encoder.alpha_pattern": {"q_proj": 4}}
    adapter, _ = _parse(tmp_path, {**_peft(PEFT_Q), **_peft(PEFT_TE)}, {"lora_adapter_metadata": json.dumps(config)})
    assert adapter.module(PEFT_Q).scale == 0.5
    assert adapter.module(PEFT_TE).alpha == 4.0  # alpha_pattern wins over lora_alpha
    assert adapter.module(PEFT_TE).scale == 2.0


def test_peft_rslora_alpha(tmp_path):
    config = {"lora_alpha": 8, "use_rslora": True}
    adapter, _ = _parse(tmp_path, _peft(PEFT_Q, rank=4), {"lora_adapter_metadata": json.dumps(config)})
    assert adapter.modules[0].scale == pytest.approx(8 / 4**0.5)


def test_peft_bad_metadata_json(tmp_path):
    with pytest.raises(FormatError, match="lora_adapter_metadata' is not valid JSON"):
        _parse(tmp_path, _peft(PEFT_Q), {"lora_adapter_metadata": "{not json"})


def test_old_diffusers_lora_down_up_and_magnitude(tmp_path):
    tensors = {
        f"{PEFT_Q}.lora.down.weight": _randn(2, 6),
        f"{PEFT_Q}.lora.up.weight": _randn(8, 2),
        f"{PEFT_TE}.lora_A.weight": _randn(2, 6),
        f"{PEFT_TE}.lora_B.weight": _randn(8, 2),
        f"{PEFT_TE}.lora_magnitude_vector": torch.ones(8),
    }
    adapter, _ = _parse(tmp_path, tensors)
    assert adapter.module(PEFT_Q).keys["down"] == f"{PEFT_Q}.lora.down.weight"
    assert adapter.module(PEFT_TE).dora
    assert adapter.kind == "mixed (DoRA, PEFT LoRA)"


def test_peft_delta_equals_b_times_a(tmp_path):
    adapter, path = _parse(tmp_path, _peft(PEFT_Q))
    with open_safetensors(path) as file:
        factors = load_factors(file, adapter.modules[0])
        a, b = file.read(f"{PEFT_Q}.lora_A.weight").double(), file.read(f"{PEFT_Q}.lora_B.weight").double()
    expected = torch.einsum("or,rc->oc", b, a)
    torch.testing.assert_close(module_delta(adapter.modules[0], factors, (8, 6)), expected)


# --------------------------------------------------------------------------- claiming


def test_every_key_is_claimed_or_reported(tmp_path):
    tensors = {
        **_lora(Q),
        "lora_unet_orphan.alpha": torch.tensor(1.0),
        "lora_unet_norm.w_norm": torch.ones(4),
        "some.random.weight": torch.ones(2),
    }
    adapter, _ = _parse(tmp_path, tensors)
    claimed = {key for module in adapter.modules for key in module.keys.values()}
    assert adapter.unclaimed == ("lora_unet_norm.w_norm", "lora_unet_orphan.alpha", "some.random.weight")
    assert claimed | set(adapter.unclaimed) == set(tensors)
    assert not claimed & set(adapter.unclaimed)


def test_non_adapter_file_parses_empty(tmp_path):
    adapter, _ = _parse(tmp_path, {"model.diffusion_model.out.2.weight": torch.ones(4, 4)})
    assert adapter.modules == () and adapter.kind == "empty"
    assert adapter.unclaimed == ("model.diffusion_model.out.2.weight",)


def test_mixed_file_kind(tmp_path):
    tensors = {**_lora(Q), f"{CONV}.hada_w1_a": _randn(8, 2), f"{CONV}.hada_w1_b": _randn(2, 36),
               f"{CONV}.hada_w2_a": _randn(8, 2), f"{CONV}.hada_w2_b": _randn(2, 36)}
    adapter, _ = _parse(tmp_path, tensors)
    assert adapter.kind == "mixed (LoHa, LoRA)"


def test_metadata_is_kept(tmp_path):
    adapter, path = _parse(tmp_path, _lora(Q), {"ss_network_dim": "2", "ss_network_module": "networks.lora"})
    assert adapter.metadata == {"ss_network_dim": "2", "ss_network_module": "networks.lora"}
    assert adapter.path == str(path)


# --------------------------------------------------------------------------- errors


def _error(tmp_path, tensors) -> str:
    with pytest.raises(FormatError) as caught:
        _parse(tmp_path, tensors)
    message = str(caught.value)
    assert "adapter.safetensors" in message
    return message


def test_error_rank_mismatch(tmp_path):
    tensors = {f"{Q}.lora_down.weight": _randn(4, 6), f"{Q}.lora_up.weight": _randn(8, 2)}
    message = _error(tmp_path, tensors)
    assert Q in message and f"{Q}.lora_down.weight" in message and f"{Q}.lora_up.weight" in message
    assert "must be equal" in message


def test_error_missing_half(tmp_path):
    message = _error(tmp_path, {f"{Q}.lora_down.weight": _randn(2, 6), f"{Q}.alpha": torch.tensor(1.0)})
    assert "lacks its up" in message and f"{Q}.lora_down.weight" in message


def test_error_alpha_not_scalar(tmp_path):
    tensors = {**_lora(Q, alpha=None), f"{Q}.alpha": torch.tensor([1.0, 2.0])}
    message = _error(tmp_path, tensors)
    assert f"{Q}.alpha" in message and "0-d" in message


def test_error_impossible_rank(tmp_path):
    tensors = {f"{Q}.lora_down.weight": torch.zeros(0, 6), f"{Q}.lora_up.weight": torch.zeros(8, 0)}
    assert "rank 0" in _error(tmp_path, tensors)


def test_error_factor_of_wrong_dimensionality(tmp_path):
    tensors = {f"{Q}.lora_down.weight": _randn(2, 6, 3), f"{Q}.lora_up.weight": _randn(8, 2)}
    assert "should have 2 or 4 dimensions" in _error(tmp_path, tensors)


def test_error_mixed_kinds_in_one_module(tmp_path):
    tensors = {**_lora(Q), f"{Q}.hada_w1_a": _randn(8, 2)}
    assert "mixes keys of several adapter kinds (loha, lora)" in _error(tmp_path, tensors)


def test_error_duplicate_role(tmp_path):
    tensors = {**_peft(PEFT_Q), f"{PEFT_Q}.lora_A.default.weight": _randn(2, 6)}
    assert "two tensors for its down" in _error(tmp_path, tensors)


def test_error_loha_halves_disagree(tmp_path):
    tensors = {f"{Q}.hada_w1_a": _randn(8, 2), f"{Q}.hada_w1_b": _randn(2, 6),
               f"{Q}.hada_w2_a": _randn(8, 2), f"{Q}.hada_w2_b": _randn(2, 5)}
    assert "imply different ΔW shapes" in _error(tmp_path, tensors)


def test_error_lokr_full_and_factorised(tmp_path):
    tensors = {f"{Q}.lokr_w1": _randn(2, 2), f"{Q}.lokr_w2": _randn(4, 3), f"{Q}.lokr_w2_a": _randn(4, 1),
               f"{Q}.lokr_w2_b": _randn(1, 3)}
    assert "both the full factor" in _error(tmp_path, tensors)


def test_error_dora_scale_wrong_shape(tmp_path):
    tensors = {**_lora(Q), f"{Q}.dora_scale": torch.ones(1, 5)}
    assert "neither one magnitude per output row" in _error(tmp_path, tensors)


def test_error_integer_factor(tmp_path):
    tensors = {f"{Q}.lora_down.weight": torch.ones(2, 6, dtype=torch.int32), f"{Q}.lora_up.weight": _randn(8, 2)}
    assert "not a floating-point type" in _error(tmp_path, tensors)


def test_error_bias_length(tmp_path):
    assert "one value per output row" in _error(tmp_path, {f"{Q}.diff": _randn(8, 6), f"{Q}.diff_b": _randn(7)})


# --------------------------------------------------------------------------- tensors


def test_load_factors_and_deltas(tmp_path):
    tensors = {**_lora(CONV, cin=4, kernel=(3, 3), alpha=1.0), f"{CONV}.dora_scale": torch.full((1, 4, 1, 1), 2.0)}
    adapter, path = _parse(tmp_path, tensors)
    module = adapter.modules[0]
    with open_safetensors(path) as file:
        factors = load_factors(file, module, dtype=torch.float32)
    assert set(factors) == {"up", "down", "dora_scale"}  # alpha stays in module.alpha
    assert all(t.dtype == torch.float32 for t in factors.values())
    up, down = tensors[f"{CONV}.lora_up.weight"].double(), tensors[f"{CONV}.lora_down.weight"].double()
    expected = 0.5 * torch.einsum("or,rchw->ochw", up[:, :, 0, 0], down)
    delta = module_delta(module, factors, (8, 4, 3, 3))
    torch.testing.assert_close(delta, expected, rtol=1e-6, atol=1e-7)
    weight = _randn(8, 4, 3, 3, seed=9).double()
    merged = weight + delta
    norms = merged.pow(2).sum(dim=(0, 2, 3), keepdim=True).sqrt()
    effective = module_effective_delta(module, factors, weight)
    torch.testing.assert_close(effective, merged * 2.0 / (norms + torch.finfo(torch.float32).eps) - weight)


def test_module_delta_refuses_unfitting_target(tmp_path):
    adapter, path = _parse(tmp_path, _lora(Q))
    with open_safetensors(path) as file:
        factors = load_factors(file, adapter.modules[0])
    with pytest.raises(ValueError, match="does not fit"):
        module_delta(adapter.modules[0], factors, (6, 8))
