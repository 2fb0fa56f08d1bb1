"""Acceptance: a 4-adapter bake matches an independent float64 reference.

The reference here shares no code with loraforge's reader, adapter parsers or
delta math: it reads files with the `safetensors` package, groups keys by
suffix, and writes each adapter formula out again with einsum. Only the
architecture table (tested on its own) is used, to map module names to
checkpoint keys and block ids.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from loraforge.execute.build import run_build
from loraforge.testing.arch import tiny_architecture
from loraforge.build import plan_build
from loraforge.recipe.loader import load_recipe
from loraforge.testing.adapters import write_synthetic_adapter
from loraforge.testing.checkpoints import write_synthetic_checkpoint

# (input name, synthetic kind, options, strength, te)
INGREDIENTS = (
    ("style", "lora", {"rank": 8, "alpha": 4, "text_encoder": True}, 0.8, 0.3),
    ("convs", "lora", {"rank": 4, "targets": "all", "text_encoder": False}, -0.5, None),
    ("hada", "loha", {"rank": 4, "text_encoder": False}, 0.6, None),
    ("kron", "lokr", {"rank": 4, "text_encoder": True}, 1.2, None),
)
MAPPING_SPEC = {"default": 1, "IN04": 0.5, "OUT03-OUT05": 0}


def mapping_weight(block: str) -> float:
    """MAPPING_SPEC evaluated by hand."""
    if block == "IN04":
        return 0.5
    if block.startswith("OUT") and 3 <= int(block[3:]) <= 5:
        return 0.0
    return 1.0


def vector_weight(block: str) -> float:
    return 0.25 if block.startswith("OUT") else 1.0


def write_recipe(folder: Path, arch, save: str) -> Path:
    vector = ",".join(f"{vector_weight(b):g}" for b in arch.full_block_form)
    lines = [
        "loraforge: 1",
        "name: reference",
        'date: "2026-11-01"',
        f"precision: {{save: {save}}}",
        "inputs:",
        "  base: {source: base.safetensors}",
        *(f"  {name}: {{source: {name}.safetensors}}" for name, *_ in INGREDIENTS),
        "targets:",
        "  baked:",
        "    kind: checkpoint",
        "    base: base",
        "    loras:",
        "      - {use: style, strength: 0.8, te: 0.3}",
        "      - use: convs",
        "        strength: -0.5",
        "        blocks: {default: 1, IN04: 0.5, OUT03-OUT05: 0}",
        "      - use: hada",
        "        strength: 0.6",
        f'        blocks: "{vector}"',
        "      - {use: kron, strength: 1.2}",
        "    output: out/baked.safetensors",
    ]
    path = folder / "recipe.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def read_all(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def group_modules(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in tensors.items():
        for suffix in (".lora_down.weight", ".lora_up.weight", ".lora_mid.weight", ".alpha"):
            if key.endswith(suffix):
                modules[key[: -len(suffix)]][suffix.strip(".").split(".")[0]] = value.double()
                break
        else:
            name, role = key.rsplit(".", 1)
            modules[name][role] = value.double()
    return modules


def reference_delta(factors: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """ΔW of one module, each formula written out independently of loraforge.ops."""
    alpha = factors.get("alpha")
    if "lora_down" in factors:
        down, up = factors["lora_down"], factors["lora_up"]
        rank = down.shape[0]
        product = torch.einsum("or,ri->oi", up.reshape(up.shape[0], rank), down.reshape(rank, -1))
        return product.reshape(shape) * (float(alpha) / rank)
    if "hada_w1_a" in factors:
        rank = factors["hada_w1_b"].shape[0]
        first = torch.einsum("or,ri->oi", factors["hada_w1_a"], factors["hada_w1_b"])
        second = torch.einsum("or,ri->oi", factors["hada_w2_a"], factors["hada_w2_b"])
        return (first * second).reshape(shape) * (float(alpha) / rank)
    w1, rank1 = lokr_factor(factors, "1")
    w2, rank2 = lokr_factor(factors, "2")
    rank = rank1 or rank2
    scale = float(alpha) / rank if rank else 1.0
    o1, i1 = w1.shape
    o2 = shape[0] // o1
    i2 = shape[1] // i1
    kernel = shape[2:]
    w2 = w2.reshape(o2, i2, *kernel) if kernel else w2.reshape(o2, i2)
    if kernel:
        full = torch.einsum("ac,bdkl->abcdkl", w1, w2).reshape(shape)
    else:
        full = torch.einsum("ac,bd->abcd", w1, w2).reshape(o1 * o2, i1 * i2)
    return full.reshape(shape) * scale


def lokr_factor(factors, which: str):
    if f"lokr_w{which}" in factors:
        return factors[f"lokr_w{which}"], None
    a, b = factors[f"lokr_w{which}_a"], factors[f"lokr_w{which}_b"]
    return a @ b, b.shape[0]


def reference_bake(folder: Path, arch) -> dict[str, torch.Tensor]:
    """Every baked weight in float64: W + Σ strength · block weight · ΔW."""
    base = read_all(folder / "base.safetensors")
    result = {k: v.double() for k, v in base.items() if v.is_floating_point()}
    touched: set[str] = set()
    for name, _kind, _options, strength, te in INGREDIENTS:
        for module, factors in group_modules(read_all(folder / f"{name}.safetensors")).items():
            spec = arch.module_by_kohya[module]
            weight = {"convs": mapping_weight, "hada": vector_weight}.get(name, lambda b: 1.0)(spec.block)
            coefficient = (te if te is not None and spec.is_text_encoder else strength) * weight
            if coefficient == 0:
                continue
            target = result[spec.key] if spec.rows is None else result[spec.key][spec.rows[0]:spec.rows[1]]
            target += coefficient * reference_delta(factors, tuple(target.shape))
            touched.add(spec.key)
    return {k: result[k] for k in touched}


def assert_within_one_ulp(actual: torch.Tensor, expected64: torch.Tensor, key: str) -> None:
    rounded = expected64.to(actual.dtype)
    spacing = (torch.nextafter(rounded.float(), torch.tensor(math.inf)) - rounded.float()).double()
    if actual.dtype == torch.float16:
        spacing = (rounded.double().abs() * 2.0**-10).clamp_min(2.0**-24)
    error = (actual.double() - expected64).abs()
    assert bool((error <= spacing * 1.0000001).all()), f"{key}: max error {error.max():.3g} over 1 ulp"


@pytest.mark.parametrize(
    "arch_name,base_dtype,save",
    [("sd1", "F32", "same"), ("sd2", "F32", "float32"), ("sdxl", "F16", "same"), ("sd1", "F32", "float16")],
)
def test_bake_matches_independent_reference(tmp_path, arch_name, base_dtype, save):
    arch = tiny_architecture(arch_name)
    write_synthetic_checkpoint(tmp_path / "base.safetensors", arch, seed=5, dtype=base_dtype, markers=("v_pred",))
    for seed, (name, kind, options, *_strengths) in enumerate(INGREDIENTS, start=10):
        write_synthetic_adapter(tmp_path / f"{name}.safetensors", arch, kind, seed=seed, dtype="F32", **options)
    plan = plan_build(load_recipe(write_recipe(tmp_path, arch, save)))
    run_build(plan, device="cpu")

    output = read_all(tmp_path / "out/baked.safetensors")
    base = read_all(tmp_path / "base.safetensors")
    expected = reference_bake(tmp_path, arch)
    assert list(output) == list(base)  # same names (safe_open lists them sorted)
    assert expected, "the adapters should touch some weights"
    for key, value in output.items():
        if key in expected:
            assert_within_one_ulp(value, expected[key], key)
        elif save in ("same", "float32") or not base[key].is_floating_point():
            assert value.dtype == base[key].dtype
            assert torch.equal(value.view(torch.uint8) if value.dim() else value, base[key].view(torch.uint8) if value.dim() else base[key]), key
        else:
            assert torch.equal(value, base[key].to(torch.float16)), key


def test_untouched_tensors_are_byte_identical(tmp_path):
    """Raw data bytes of every untouched tensor equal the base's, marker tensors included."""
    arch = tiny_architecture("sd1")
    write_synthetic_checkpoint(tmp_path / "base.safetensors", arch, seed=5, dtype="F16", markers=("v_pred", "ztsnr"))
    for seed, (name, kind, options, *_strengths) in enumerate(INGREDIENTS, start=10):
        write_synthetic_adapter(tmp_path / f"{name}.safetensors", arch, kind, seed=seed, **options)
    plan = plan_build(load_recipe(write_recipe(tmp_path, arch, "same")))
    run_build(plan, device="cpu")
    from loraforge.formats.safetensors_reader import open_safetensors

    touched = set(plan.targets[0].applications)
    with open_safetensors(tmp_path / "base.safetensors") as base, open_safetensors(tmp_path / "out/baked.safetensors") as out:
        assert out.names() == base.names()
        assert {"v_pred", "ztsnr"} <= set(out.names())
        for name in base.names():
            if name not in touched:
                assert out.read_bytes(name) == base.read_bytes(name), name
        assert touched and all(out.read_bytes(n) != base.read_bytes(n) for n in touched)


def test_dora_diff_and_peft_bake_match_reference(tmp_path):
    """DoRA (strength interpolates W..W_dora), full diffs with bias, and PEFT-named LoRAs."""
    arch = tiny_architecture("sd1")
    write_synthetic_checkpoint(tmp_path / "base.safetensors", arch, seed=7, dtype="F32")
    write_synthetic_adapter(tmp_path / "dora.safetensors", arch, "lora", rank=4, seed=1, dora="in", dtype="F32")
    write_synthetic_adapter(tmp_path / "diff.safetensors", arch, "diff", seed=2, dtype="F32", text_encoder=False,
                            targets=[s.kohya for s in arch.modules if s.bias_key and "ff_net_2" in s.kohya])
    write_synthetic_adapter(tmp_path / "peft.safetensors", arch, "peft", rank=2, seed=3, dtype="F32")
    (tmp_path / "recipe.yaml").write_text(
        "loraforge: 1\nname: mixed\ninputs:\n"
        "  base: {source: base.safetensors}\n  dora: {source: dora.safetensors}\n"
        "  diff: {source: diff.safetensors}\n  peft: {source: peft.safetensors}\n"
        "targets:\n  out:\n    kind: checkpoint\n    base: base\n    loras:\n"
        "      - {use: dora, strength: 0.6}\n      - {use: diff, strength: -1.5}\n      - {use: peft, strength: 0.9}\n"
    )
    run_build(plan_build(load_recipe(tmp_path / "recipe.yaml")), device="cpu")
    base = {k: v.double() for k, v in read_all(tmp_path / "base.safetensors").items() if v.is_floating_point()}
    expected = {k: v.clone() for k, v in base.items()}

    dora = group_modules(read_all(tmp_path / "dora.safetensors"))
    for module, factors in dora.items():
        spec = arch.module_by_kohya[module]
        w = base[spec.key]
        directed = w + reference_delta(factors, tuple(w.shape))
        # dora_scale [1, in, ...]: one magnitude per input channel, norm over everything else.
        norm = directed.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)
        shape = (1, w.shape[1]) + (1,) * (w.dim() - 2)
        ratio = factors["dora_scale"].reshape(shape) / (norm.reshape(shape) + torch.finfo(torch.float32).eps)
        # At strength 0.6, LyCORIS's multiplier (a dora_scale file's own convention): (W + ΔW)·(s·(ratio − 1) + 1).
        expected[spec.key] += directed * (0.6 * (ratio - 1) + 1) - w
    for module, factors in group_modules(read_all(tmp_path / "diff.safetensors")).items():
        spec = arch.module_by_kohya[module]
        expected[spec.key] += -1.5 * factors["diff"]
        expected[spec.bias_key] += -1.5 * factors["diff_b"]
    peft = read_all(tmp_path / "peft.safetensors")
    for key, value in peft.items():
        if key.endswith(".lora_A.weight"):
            name = key[: -len(".lora_A.weight")]
            up = peft[name + ".lora_B.weight"].double()
            spec = arch.module_by_diffusers[name]
            target = expected[spec.key] if spec.rows is None else expected[spec.key][spec.rows[0]:spec.rows[1]]
            target += 0.9 * (up.reshape(up.shape[0], -1) @ value.double().reshape(value.shape[0], -1)).reshape(target.shape)

    output = read_all(tmp_path / "dist/out.safetensors")
    changed = [k for k in expected if not torch.equal(expected[k], base[k])]
    assert any(k.endswith("ff.net.2.bias") for k in changed)  # diff_b reached the biases
    for key in changed:
        assert_within_one_ulp(output[key], expected[key], key)
