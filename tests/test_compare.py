"""ops/compare.py, plan/tolerance.py and verify/files.py: golden values computed densely here."""

from __future__ import annotations

import math

import pytest
import torch

from loraforge.testing.arch import tiny_architecture
from loraforge.formats.safetensors_writer import save_tensors
from loraforge.ops.compare import dense_relative_error, factored_relative_error, product_norm
from loraforge.verify.files import compare_files, lora_module_name
from loraforge.plan.tolerance import ULPS, file_tolerance, relative_error_tolerance


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _dense_error(u, d, s, ru, rd, rs) -> float:
    a = s * (u.reshape(u.shape[0], -1).double() @ d.reshape(d.shape[0], -1).double())
    b = rs * (ru.reshape(ru.shape[0], -1).double() @ rd.reshape(rd.shape[0], -1).double())
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.mark.parametrize(
    "out, cin, rank, ref_rank",
    [(64, 48, 4, 4), (64, 48, 8, 3), (3, 5, 4, 6), (200, 150, 16, 16)],  # QR path, mixed ranks, dense path
)
def test_factored_error_equals_the_dense_computation(out, cin, rank, ref_rank):
    g = _gen(out * 1000 + rank)
    u, d = torch.randn(out, rank, generator=g), torch.randn(rank, cin, generator=g)
    ru, rd = torch.randn(out, ref_rank, generator=g), torch.randn(ref_rank, cin, generator=g)
    got = factored_relative_error(u, d, 0.7, ru, rd, 1.3)
    assert got == pytest.approx(_dense_error(u, d, 0.7, ru, rd, 1.3), rel=1e-12)


def test_conv_factors_are_flattened_like_a_locon():
    g = _gen(5)
    u, d = torch.randn(16, 4, 1, 1, generator=g), torch.randn(4, 8, 3, 3, generator=g)
    ru, rd = u + 0.01 * torch.randn(u.shape, generator=g), d.clone()
    assert factored_relative_error(u, d, 0.25, ru, rd, 0.25) == pytest.approx(_dense_error(u, d, 0.25, ru, rd, 0.25), rel=1e-12)


def test_scale_alone_gives_its_exact_ratio_and_equal_modules_give_zero():
    g = _gen(1)
    u, d = torch.randn(300, 8, generator=g, dtype=torch.float64), torch.randn(8, 200, generator=g, dtype=torch.float64)
    assert factored_relative_error(u, d, 0.5, u, d, 1.0) == pytest.approx(0.5, rel=1e-14)
    assert factored_relative_error(u, d, 1.0, u, d, 1.0) < 1e-14


def test_tiny_differences_keep_their_digits():
    """The QR route does not square the norms: a 1e-10 perturbation is measured to ~1e-6 relative."""
    g = _gen(2)
    u, d = torch.randn(400, 8, generator=g, dtype=torch.float64), torch.randn(8, 300, generator=g, dtype=torch.float64)
    e = 1e-10 * torch.randn(8, 300, generator=g, dtype=torch.float64)
    golden = float(torch.linalg.norm(u @ e) / torch.linalg.norm(u @ d))  # the difference formed without cancellation
    assert factored_relative_error(u, d + e, 1.0, u, d, 1.0) == pytest.approx(golden, rel=1e-6)


def test_degenerate_cases():
    zeros_up, zeros_down = torch.zeros(6, 0), torch.zeros(0, 5)
    u, d = torch.ones(6, 1), torch.ones(1, 5)
    assert factored_relative_error(zeros_up, zeros_down, 1.0, zeros_up, zeros_down, 1.0) == 0.0
    assert factored_relative_error(u, d, 1.0, zeros_up, zeros_down, 1.0) == math.inf
    assert factored_relative_error(zeros_up, zeros_down, 1.0, u, d, 1.0) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        factored_relative_error(torch.ones(7, 1), d, 1.0, u, d, 1.0)
    assert product_norm(torch.zeros(4, 0), torch.zeros(0, 3)) == 0.0


def test_dense_relative_error_golden():
    a = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    b = torch.tensor([[3.0, 0.0], [0.0, 0.0]])
    assert dense_relative_error(a, b) == pytest.approx(4.0 / 3.0)
    assert dense_relative_error(b, b) == 0.0
    assert dense_relative_error(a, torch.zeros(2, 2)) == math.inf
    with pytest.raises(ValueError):
        dense_relative_error(a, torch.zeros(3))


# --- tolerance ------------------------------------------------------------------


def test_tolerance_table_is_four_unit_roundoffs_of_the_coarsest_dtype():
    assert relative_error_tolerance(["F16"]) == ULPS * 2.0**-11 == 0.001953125
    assert relative_error_tolerance(["BF16"]) == ULPS * 2.0**-8
    assert relative_error_tolerance(["F32"]) == ULPS * 2.0**-24
    assert relative_error_tolerance(["F32", "F16", "I64"]) == ULPS * 2.0**-11
    assert relative_error_tolerance(["I64"]) == 0.0


@pytest.mark.parametrize("code, dtype", [("F16", torch.float16), ("BF16", torch.bfloat16), ("F32", torch.float32)])
def test_tolerance_admits_re_rounding_and_refuses_a_lost_rank(code, dtype):
    """What the numbers are for: float64 factors that differ in their last bits (another device's
    SVD) round to factors within the tolerance, while dropping the smallest of 8 ranks does not."""
    g = _gen(3)
    q_u, _ = torch.linalg.qr(torch.randn(320, 8, generator=g, dtype=torch.float64))
    q_v, _ = torch.linalg.qr(torch.randn(160, 8, generator=g, dtype=torch.float64))
    sigma = torch.linspace(1.0, 0.1, 8, dtype=torch.float64).sqrt()
    up, down = q_u * sigma, (q_v * sigma).T
    wiggle = lambda t: t * (1 + 4e-15 * torch.randn(t.shape, generator=g, dtype=torch.float64))  # noqa: E731
    tolerance = relative_error_tolerance([code])
    a = factored_relative_error(wiggle(up).to(dtype), wiggle(down).to(dtype), 1.0, up.to(dtype), down.to(dtype), 1.0)
    assert a <= tolerance / 4
    lost = factored_relative_error(up[:, :7].to(dtype), down[:7].to(dtype), 1.0, up.to(dtype), down.to(dtype), 1.0)
    assert lost > 3 * tolerance


# --- files ----------------------------------------------------------------------


def _lora_file(path, modules: dict, metadata=None, dtype=torch.float16):
    tensors = {}
    for name, (up, down) in modules.items():
        tensors[f"{name}.lora_up.weight"] = up.to(dtype)
        tensors[f"{name}.lora_down.weight"] = down.to(dtype)
        tensors[f"{name}.alpha"] = torch.tensor(float(down.shape[0]), dtype=dtype)
    save_tensors(path, tensors, metadata or {"ss_network_module": "networks.lora"})


def test_lora_files_name_the_modules_that_differ(tmp_path):
    g = _gen(4)
    modules = {f"lora_unet_m{i}": (torch.randn(12, 2, generator=g), torch.randn(2, 10, generator=g)) for i in range(3)}
    _lora_file(tmp_path / "a.safetensors", modules)
    changed = dict(modules)
    up, down = modules["lora_unet_m1"]
    changed["lora_unet_m1"] = (up * 1.01, down)  # one module 1 % larger
    del changed["lora_unet_m2"]
    _lora_file(tmp_path / "b.safetensors", changed, metadata={"ss_network_module": "networks.lora", "x": "1"})
    diff = compare_files(tmp_path / "b.safetensors", tmp_path / "a.safetensors", lora=True)
    assert diff.metadata == ("x",)
    assert diff.missing == tuple(f"lora_unet_m2.{s}" for s in ("alpha", "lora_down.weight", "lora_up.weight"))
    assert diff.data == ("lora_unet_m1.lora_up.weight",)
    assert [m.module for m in diff.modules] == ["lora_unet_m1", "lora_unet_m2"]
    f16 = lambda t: t.to(torch.float16)  # noqa: E731
    golden = _dense_error(f16(up * 1.01), f16(down), 1.0, f16(up), f16(down), 1.0)
    assert diff.modules[0].relative_error == pytest.approx(golden, rel=1e-9)
    assert diff.modules[1].relative_error == 1.0  # a lost module loses all of its delta
    assert [m.module for m in diff.out_of_tolerance(0.05)] == ["lora_unet_m2"]
    assert lora_module_name("lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha") == "lora_te1_text_model_encoder_layers_0_mlp_fc1"


def test_checkpoint_rows_are_named_by_module(tmp_path):
    """A fused qkv weight (SDXL te2 in_proj) differing in its v rows names only the v module."""
    arch = tiny_architecture("sdxl")
    fused = next(m for m in arch.modules if m.rows and m.kohya.endswith("_v_proj"))
    shape = arch.tensor_by_key[fused.key].shape
    g = _gen(6)
    weight = torch.randn(shape, generator=g).to(torch.float16)
    other = torch.randn(4, generator=g).to(torch.float16)
    save_tensors(tmp_path / "a.safetensors", {fused.key: weight, "lone.bias": other})
    edited = weight.clone()
    edited[fused.rows[0]] += 1
    save_tensors(tmp_path / "b.safetensors", {fused.key: edited, "lone.bias": -other})
    diff = compare_files(tmp_path / "b.safetensors", tmp_path / "a.safetensors", lora=False, architecture=arch)
    assert diff.data == tuple(sorted([fused.key, "lone.bias"]))
    assert [m.module for m in diff.modules] == sorted([fused.kohya, "lone.bias"])
    by_name = {m.module: m for m in diff.modules}
    rows = slice(*fused.rows)
    assert by_name[fused.kohya].relative_error == pytest.approx(dense_relative_error(edited[rows], weight[rows]))
    assert by_name["lone.bias"].relative_error == pytest.approx(2.0)
    assert file_tolerance(tmp_path / "a.safetensors") == relative_error_tolerance(["F16"])
