"""Modules that common loaders skip (issue 14, item 7): `plan`/`inspect` list them, `modules: kohya` leaves them out.

The expected module sets are not read from loraforge's rule: they come from a
diffusers UNet of the same structure, walked the way kohya's merge_lora builds
its name map (Linear/Conv2d children of Transformer2DModel, ResnetBlock2D,
Downsample2D, Upsample2D; docs/adapters.md, "What loaders skip").
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from loraforge.build import plan_build
from loraforge.cli import app
from loraforge.errors import RecipeError
from loraforge.execute.build import run_build
from loraforge.formats.arch import loaders
from loraforge.recipe.loader import load_recipe
from loraforge.testing.adapters import write_synthetic_adapter
from loraforge.testing.arch import tiny_architecture
from loraforge.testing.checkpoints import write_synthetic_checkpoint
from loraforge.testing.tuned import planted_delta, write_tuned_checkpoint

KOHYA_UNET_CLASSES = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")
FAMILIES = ("sd1", "sdxl")


def diffusers_unet(family: str):
    """A diffusers UNet with the block structure of loraforge's tiny table (sizes are irrelevant to names)."""
    diffusers = pytest.importorskip("diffusers")
    common = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=8, attention_head_dim=4)
    if family == "sd1":
        return diffusers.UNet2DConditionModel(
            block_out_channels=(16, 32, 64, 64), cross_attention_dim=24,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, **common,
        )
    return diffusers.UNet2DConditionModel(
        block_out_channels=(16, 32, 64), cross_attention_dim=48, transformer_layers_per_block=(1, 2, 10),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
        **common,
    )


def kohya_walk(unet) -> tuple[set[str], set[str]]:
    """(every Linear/Conv2d layer, those kohya's merge_lora maps), as diffusers paths with the "unet." prefix."""
    layers = {f"unet.{name}" for name, module in unet.named_modules() if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))}
    kohya = set()
    for name, module in unet.named_modules():
        if type(module).__name__ in KOHYA_UNET_CLASSES:
            for child, sub in module.named_modules():
                if isinstance(sub, (torch.nn.Linear, torch.nn.Conv2d)):
                    kohya.add(f"unet.{name}.{child}")
    return layers, kohya


@pytest.mark.parametrize("family", FAMILIES)
def test_kohya_rule_matches_kohyas_module_classes(family):
    arch = tiny_architecture(family)
    unet_modules = {m.diffusers: m for m in arch.modules if m.component == "unet"}
    layers, kohya = kohya_walk(diffusers_unet(family))
    assert set(unet_modules) == layers  # the same network, layer for layer
    assert {name for name, m in unet_modules.items() if loaders.kohya_applies(m)} == kohya
    skipped = layers - kohya
    expected = {"unet.conv_in", "unet.conv_out", "unet.time_embedding.linear_1", "unet.time_embedding.linear_2"}
    if family == "sdxl":
        expected |= {"unet.add_embedding.linear_1", "unet.add_embedding.linear_2"}
    assert skipped == expected
    # text encoders: only CLIPAttention / CLIPMLP layers are in the tables, and kohya maps them all
    assert all(loaders.kohya_applies(m) for m in arch.modules if m.is_text_encoder)
    assert not loaders.known("flux") and loaders.skipped_by("flux", arch.modules[0]) == ()


def expected_skips(family: str, *, conv: bool) -> list[str]:
    """kohya names of the layers outside kohya's classes that an extraction can contain."""
    arch = tiny_architecture(family)
    _, kohya = kohya_walk(diffusers_unet(family))
    names = []
    for m in arch.modules:
        if m.component == "unet" and m.diffusers not in kohya and (conv or not (m.is_conv and m.shape[2:] != (1, 1))):
            names.append(m.kohya)
    return sorted(names)


def recipe_text(extra: str = "", merge: str = "") -> str:
    return (
        "loraforge: 1\nname: lc\ndate: \"2026-11-01\"\nseed: 3\n"
        "precision: {compute: float32, save: float32}\n"
        "inputs:\n  base: {source: base.safetensors}\n  tuned: {source: tuned.safetensors}\n"
        "targets:\n  ex:\n    kind: extract\n    tuned: tuned\n    base: base\n    rank: 4\n    conv_rank: 4\n"
        f"{extra}{merge}"
    )


@pytest.fixture(scope="module", params=FAMILIES)
def planted(request, tmp_path_factory):
    """A tiny model and a tuned copy that differs by a rank-2 change in every module."""
    family = request.param
    folder = tmp_path_factory.mktemp(f"planted-{family}")
    arch = tiny_architecture(family)
    write_synthetic_checkpoint(folder / "base.safetensors", arch, seed=1, dtype="F32")
    keys = {m.key for m in arch.modules}
    write_tuned_checkpoint(
        folder / "tuned.safetensors", folder / "base.safetensors",
        lambda key, weight: planted_delta(weight.shape, rank=2, seed=5, key=key, scale=0.1) if key in keys else None,
    )
    return family, folder, arch


def build_in(folder: Path, sub: str, text: str):
    work = folder / sub
    work.mkdir(exist_ok=True)
    for name in ("base.safetensors", "tuned.safetensors"):
        if not (work / name).exists():
            (work / name).symlink_to(folder / name)
    (work / "recipe.yaml").write_text(text)
    plan = plan_build(load_recipe(work / "recipe.yaml"))
    return plan, run_build(plan, device="cpu")


def read_all(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def module_names(tensors) -> set[str]:
    return {key.rsplit(".", 2)[0] for key in tensors if key.endswith(".lora_down.weight")}


def test_extract_with_and_without_modules_kohya(planted):
    family, folder, arch = planted
    plan_all, _ = build_in(folder, "all", recipe_text())
    plan_explicit, _ = build_in(folder, "explicit", recipe_text("    modules: all\n"))
    plan_kohya, _ = build_in(folder, "kohya", recipe_text("    modules: kohya\n"))
    default = read_all(folder / "all" / "dist" / "ex.safetensors")
    explicit = read_all(folder / "explicit" / "dist" / "ex.safetensors")
    kohya = read_all(folder / "kohya" / "dist" / "ex.safetensors")
    # modules: all is the default: the same action key and the same bytes as a recipe without the field
    assert plan_explicit.targets[0].action_key == plan_all.targets[0].action_key
    assert (folder / "explicit" / "dist" / "ex.safetensors").read_bytes() == (folder / "all" / "dist" / "ex.safetensors").read_bytes()
    assert plan_kohya.targets[0].action_key != plan_all.targets[0].action_key
    skipped = expected_skips(family, conv=True)
    assert module_names(default) == {m.kohya for m in arch.modules}
    assert module_names(kohya) == {m.kohya for m in arch.modules} - set(skipped)
    assert not any("conv_in" in n or "conv_out" in n or "time_emb" in n.replace("time_emb_proj", "") or "label_emb" in n
                   or "input_blocks_0_0" in n or n.endswith("out_2") for n in module_names(kohya))
    # the modules both keep are the same tensors, bit for bit (per-module seeds)
    for key, tensor in kohya.items():
        assert torch.equal(tensor, default[key]), key
    assert plan_kohya.targets[0].left_out_for_loaders == tuple(m.kohya for m in plan_all.targets[0].modules if m.kohya in skipped)


def test_plan_and_inspect_json_list_the_skipped_modules(planted):
    family, folder, arch = planted
    build_in(folder, "all", recipe_text())
    work = folder / "cli"
    work.mkdir(exist_ok=True)
    for name in ("base.safetensors", "tuned.safetensors"):
        if not (work / name).exists():
            (work / name).symlink_to(folder / name)
    merge = "  merged:\n    kind: lora\n    method: concat\n    loras: [{use: ex}]\n"
    (work / "recipe.yaml").write_text(recipe_text(merge=merge))
    runner = CliRunner()
    planned = runner.invoke(app, ["plan", "--json", str(work / "recipe.yaml")])
    assert planned.exit_code == 0, planned.output
    targets = {t["name"]: t for t in json.loads(planned.output)["targets"]}
    skipped = expected_skips(family, conv=True)
    for name in ("ex", "merged"):
        assert targets[name]["loader_skips"] == {"kohya": skipped, "a1111": [], "comfyui": [], "diffusers": []}, name
        assert targets[name]["modules_kept"] == "all" and targets[name]["left_out_for_loaders"] == []
    text = runner.invoke(app, ["plan", str(work / "recipe.yaml")])
    assert text.exit_code == 0 and f"kohya merge_lora skips {len(skipped)}" in text.output, text.output

    (work / "recipe.yaml").write_text(recipe_text(merge=merge + "    modules: kohya\n"))
    planned = runner.invoke(app, ["plan", "--json", str(work / "recipe.yaml")])
    assert planned.exit_code == 0, planned.output
    merged = {t["name"]: t for t in json.loads(planned.output)["targets"]}["merged"]
    assert merged["modules_kept"] == "kohya" and merged["left_out_for_loaders"] == skipped
    assert merged["loader_skips"] == {"kohya": [], "a1111": [], "comfyui": [], "diffusers": []}
    assert merged["modules"] == len(arch.modules) - len(skipped)

    inspected = runner.invoke(app, ["inspect", "--json", str(folder / "all" / "dist" / "ex.safetensors")])
    assert inspected.exit_code == 0, inspected.output
    assert json.loads(inspected.output)["loader_skips"] == {"kohya": skipped, "a1111": [], "comfyui": [], "diffusers": []}
    shown = runner.invoke(app, ["inspect", str(folder / "all" / "dist" / "ex.safetensors")])
    assert shown.exit_code == 0 and "kohya merge_lora skips" in shown.output


@pytest.mark.parametrize("family", FAMILIES)
def test_inspect_lists_what_comfyui_and_kohya_skip_in_a_peft_file(tmp_path, family):
    arch = tiny_architecture(family)
    path = tmp_path / "peft.safetensors"
    write_synthetic_adapter(path, arch, "peft", targets="attn", rank=2, alpha=1)
    result = CliRunner().invoke(app, ["inspect", "--json", str(path)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    written = sorted(
        key[: -len(".lora_A.weight")] for key in read_all(path) if key.endswith(".lora_A.weight")
    )
    # kohya's merge_lora reads lora_down/lora_up under lora_unet_/lora_te names only: a PEFT file is skipped whole
    assert report["loader_skips"]["kohya"] == written
    # ComfyUI maps diffusers UNet attention projections only as ".processor.to_*" (comfy/lora.py model_lora_keys_unet)
    projections = (".to_q", ".to_k", ".to_v", ".to_out.0")
    assert report["loader_skips"]["comfyui"] == [n for n in written if n.startswith("unet.") and n.endswith(projections)]
    assert report["loader_skips"]["comfyui"] and report["loader_skips"]["a1111"] == report["loader_skips"]["diffusers"] == []
    # alpha 1 at rank 2 lives only in lora_adapter_metadata, which ComfyUI's load_lora does not read
    assert report["alpha_ignored_by_comfyui"] == written
    plain = tmp_path / "peft-no-alpha.safetensors"
    write_synthetic_adapter(plain, arch, "peft", targets="attn", rank=2)
    assert json.loads(CliRunner().invoke(app, ["inspect", "--json", str(plain)]).output)["alpha_ignored_by_comfyui"] == []
    shown = CliRunner().invoke(app, ["inspect", str(path)])
    assert shown.exit_code == 0 and "ComfyUI does not read" in shown.output, shown.output


def test_a_bad_module_set_is_a_positioned_error(tmp_path):
    (tmp_path / "recipe.yaml").write_text(recipe_text("    modules: everything\n"))
    with pytest.raises(RecipeError) as raised:
        load_recipe(tmp_path / "recipe.yaml")
    text = str(raised.value)
    assert "recipe.yaml:16:" in text and "unknown module set 'everything'" in text and "all, kohya" in text, text


def test_modules_kohya_is_refused_where_the_loaders_are_not_known(tmp_path):
    pytest.importorskip("loraforge.testing.flux")
    arch = tiny_architecture("flux")
    write_synthetic_checkpoint(tmp_path / "base.safetensors", arch, seed=1, dtype="F32")
    shutil.copy(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors")
    (tmp_path / "recipe.yaml").write_text(recipe_text("    modules: kohya\n"))
    with pytest.raises(RecipeError) as raised:
        plan_build(load_recipe(tmp_path / "recipe.yaml"))
    text = str(raised.value)
    assert "recipe.yaml:16:" in text and "not known for" in text, text


def test_transformers_5_text_encoder_spellings_are_skipped_by_comfyui_and_kohya():
    arch = tiny_architecture("sd1")
    spec = next(m for m in arch.modules if m.is_text_encoder)
    assert loaders.skipped_by("sd1", spec) == ()
    kohya_v5 = spec.kohya.replace("lora_te_text_model_", "lora_te_")
    peft_v5 = spec.diffusers.replace("text_encoder.text_model.", "text_encoder.")
    assert loaders.skipped_by("sd1", spec, kohya_v5, naming="kohya") == ("kohya", "comfyui")
    assert loaders.skipped_by("sd1", spec, peft_v5, naming="diffusers", kohya_factors=False) == ("kohya", "comfyui")
    assert loaders.skipped_by("sd1", spec, spec.diffusers, naming="diffusers", kohya_factors=False) == ("kohya",)


def test_diffusers_converts_every_module_of_an_extraction_onto_its_unet(planted):
    """diffusers' own kohya converter maps conv_in, conv_out and the embeddings too (no known diffusers skip)."""
    loaders_module = pytest.importorskip("diffusers.loaders")
    from diffusers.utils import convert_unet_state_dict_to_peft

    family, folder, arch = planted
    build_in(folder, "all", recipe_text())
    tensors = read_all(folder / "all" / "dist" / "ex.safetensors")
    unet = diffusers_unet(family)
    # what load_lora_weights does with a kohya file: lora_state_dict (SGM block names mapped with the UNet's
    # config, kohya names converted, alphas folded in), then PEFT names for injection
    converted, _ = loaders_module.StableDiffusionLoraLoaderMixin.lora_state_dict(dict(tensors), unet_config=unet.config)
    assert len(converted) == 2 * len(module_names(tensors))  # up and down of every module
    peft = convert_unet_state_dict_to_peft({k[len("unet."):]: v for k, v in converted.items() if k.startswith("unet.")})
    landed = {"unet." + k.rsplit(".lora_", 1)[0] for k in peft}
    unet_layers, _ = kohya_walk(unet)
    assert landed == {m.diffusers for m in arch.modules if m.component == "unet"} <= unet_layers
    assert {"unet.conv_in", "unet.conv_out", "unet.time_embedding.linear_1"} <= landed
