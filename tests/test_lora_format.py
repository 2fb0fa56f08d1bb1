"""`format: diffusers` on kind lora / extract outputs (issue 15, item 5).

For SD 1.5 and Flux at small dimensions, an extraction and a merge written in
diffusers/PEFT names load into diffusers models (``lora_state_dict`` +
``load_lora_into_unet`` / ``load_lora_into_text_encoder`` /
``load_lora_into_transformer``, what ``load_lora_weights`` calls) with every
module of the file injected and none missing; each PEFT layer's fused weight
(W + scaling·B@A) equals the bake of the kohya-format output at that layer's
rows within float32 rounding; a bake of the diffusers-format output has the
same tensors as the bake of the kohya one; and the default output (no field)
has the bytes ``format: kohya`` gives.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from loraforge.build import plan_build
from loraforge.execute.build import run_build
from loraforge.formats.lora_output import diffusers_parts
from loraforge.recipe.loader import load_recipe
from loraforge.testing.arch import tiny_architecture
from loraforge.testing.checkpoints import write_synthetic_checkpoint
from loraforge.testing.tuned import planted_delta, write_tuned_checkpoint

pytest.importorskip("diffusers")
pytest.importorskip("peft")


def recipe_text(text_encoder: str) -> str:
    extract = f"    kind: extract\n    tuned: tuned\n    base: base\n    rank: 4\n    conv_rank: 4\n    text_encoder: {text_encoder}\n"
    merge = "    kind: lora\n    method: svd\n    rank: 3\n    loras:\n      - {use: ex, strength: 0.7}\n"
    return (
        'loraforge: 1\nname: lf\ndate: "2026-11-01"\nseed: 3\n'
        "precision: {compute: float32, save: float32}\n"
        "inputs:\n  base: {source: base.safetensors}\n  tuned: {source: tuned.safetensors}\n"
        "targets:\n"
        f"  ex:\n{extract}"
        f"  ex-kohya:\n{extract}    format: kohya\n"
        f"  ex-d:\n{extract}    format: diffusers\n"
        f"  m:\n{merge}"
        f"  m-d:\n{merge}    format: diffusers\n"
        "  bake-ex:\n    kind: checkpoint\n    base: base\n    loras: [{use: ex}]\n"
        "  bake-ex-d:\n    kind: checkpoint\n    base: base\n    loras: [{use: ex-d}]\n"
        "  bake-m:\n    kind: checkpoint\n    base: base\n    loras: [{use: m}]\n"
        "  bake-m-d:\n    kind: checkpoint\n    base: base\n    loras: [{use: m-d}]\n"
    )


def read_all(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module", params=("sd1", "flux"))
def built(request, tmp_path_factory):
    family = request.param
    if family == "flux":
        pytest.importorskip("loraforge.testing.flux")
    folder = tmp_path_factory.mktemp(f"format-{family}")
    arch = tiny_architecture(family)
    write_synthetic_checkpoint(folder / "base.safetensors", arch, seed=1, dtype="F32")
    keys = {m.key for m in arch.modules}
    write_tuned_checkpoint(
        folder / "tuned.safetensors", folder / "base.safetensors",
        lambda key, weight: planted_delta(weight.shape, rank=2, seed=5, key=key, scale=0.1) if key in keys else None,
    )
    # diffusers' Flux pipeline loads no T5 LoRA: the Flux outputs keep to the transformer
    (folder / "recipe.yaml").write_text(recipe_text("true" if family == "sd1" else "false"))
    plan = plan_build(load_recipe(folder / "recipe.yaml"))
    run_build(plan, device="cpu")
    return family, folder / "dist", arch, plan


def test_default_output_bytes_are_kohya_and_the_field_leaves_the_canonical_form(built):
    family, dist, arch, plan = built
    # same tensors (the files' metadata names their targets); `format: kohya` is the default, left out of the
    # canonical form (so existing recipes keep their action keys); recipes/*.lock verify in test_reproducible_bytes
    kohya, default = read_all(dist / "ex-kohya.safetensors"), read_all(dist / "ex.safetensors")
    assert kohya.keys() == default.keys() and all(torch.equal(kohya[k], default[k]) for k in kohya)
    specs = plan.loaded.recipe.targets
    assert specs["ex"].model_dump() == specs["ex-kohya"].model_dump() and "format" not in specs["ex"].model_dump()
    assert specs["ex-d"].model_dump()["format"] == "diffusers" and "format" not in specs["m"].model_dump()
    targets = {t.name: t for t in plan.targets}
    assert targets["ex"].format == "kohya" and targets["ex-d"].format == "diffusers"
    assert all(k.endswith((".lora_up.weight", ".lora_down.weight", ".alpha")) for k in read_all(dist / "ex.safetensors"))
    written = sorted({k.rsplit(".lora_", 1)[0] for k in read_all(dist / "ex-d.safetensors")})
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in read_all(dist / "ex-d.safetensors"))
    skips = targets["ex-d"].loader_skips()
    if family == "sd1":  # the plan names what each loader skips, by the names the file has
        # kohya's merge_lora reads lora_down/lora_up only; ComfyUI maps SD attention projections as .processor.to_*
        projections = (".to_q", ".to_k", ".to_v", ".to_out.0")
        assert skips["kohya"] == sorted(n for n in written if n in {m.diffusers for m in targets["ex-d"].modules})
        assert skips["comfyui"] == [n for n in written if n.startswith("unet.") and n.endswith(projections)] != []
        assert targets["ex"].loader_skips()["comfyui"] == []
    else:
        assert skips is None  # loader coverage is not known for Flux


@pytest.mark.parametrize("pair", [("ex", "ex-d"), ("m", "m-d")])
def test_a_bake_of_the_diffusers_output_equals_the_bake_of_the_kohya_one(built, pair):
    family, dist, arch, plan = built
    kohya, diffusers = (read_all(dist / f"bake-{name}.safetensors") for name in pair)
    assert kohya.keys() == diffusers.keys()
    for key in kohya:
        assert kohya[key].dtype == diffusers[key].dtype and torch.equal(kohya[key], diffusers[key]), key
    # the planned adapter (what a bake in the same recipe saw) is what the file holds
    targets = {t.name: t for t in plan.targets}
    from loraforge.formats.adapters import parse_adapter
    from loraforge.formats.safetensors_reader import open_safetensors

    with open_safetensors(dist / f"{pair[1]}.safetensors") as f:
        parsed = parse_adapter(f)
    planned = {m.name: m for m in targets[pair[1]].lora_adapter().modules}
    assert parsed.unclaimed == ()
    for module in parsed.modules:
        want = planned[module.name]
        assert (module.naming, module.kind, dict(module.keys), module.alpha, module.scale, module.delta_shape) == (
            want.naming, want.kind, dict(want.keys), want.alpha, want.scale, want.delta_shape), module.name
        assert module.rank <= want.rank


def _flux_transformer(arch, base: dict[str, torch.Tensor]):
    """A small FluxTransformer2DModel holding the synthetic BFL checkpoint's weights at the diffusers rows."""
    from diffusers import FluxTransformer2DModel

    from loraforge.formats.adapters.flux_names import diffusers_layers, lookup

    dims = dict(arch.dimensions)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=dims["in_channels"], out_channels=dims["out_channels"], num_layers=dims["depth"],
        num_single_layers=dims["depth_single"], attention_head_dim=dims["head_dim"],
        num_attention_heads=dims["hidden"] // dims["head_dim"], joint_attention_dim=dims["context_in"],
        pooled_projection_dim=dims["vec_in"], guidance_embeds=True, axes_dims_rope=(2, 2, 4),
    ).eval().requires_grad_(False)
    with torch.no_grad():
        for path, _, _ in diffusers_layers(arch):
            spec = lookup("transformer." + path, arch)
            model.get_submodule(path).weight.copy_(_rows(base[spec.key], spec))
    return {"transformer": model}


def _rows(tensor: torch.Tensor, spec) -> torch.Tensor:
    if spec.swap_halves:
        half = tensor.shape[0] // 2
        return torch.cat((tensor[half:], tensor[:half]))
    return tensor if spec.rows is None else tensor[spec.rows[0]:spec.rows[1]]


def _models(family, arch, base_path: Path):
    if family == "flux":
        return _flux_transformer(arch, read_all(base_path))
    from interop.interop_models import build_models, load_targets

    models = build_models(arch)
    load_targets(models, arch, base_path)
    return models


def _load(family, models, path: Path) -> None:
    """What load_lora_weights does, component by component (no pipeline needed)."""
    from diffusers import FluxPipeline, StableDiffusionPipeline

    if family == "flux":
        state_dict, alphas = FluxPipeline.lora_state_dict(str(path), return_alphas=True)
        FluxPipeline.load_lora_into_transformer(state_dict, alphas, models["transformer"], adapter_name="x")
        return
    state_dict, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, models["unet"], adapter_name="x")
    StableDiffusionPipeline.load_lora_into_text_encoder(state_dict, alphas, models["text_encoder"],
                                                        prefix="text_encoder", adapter_name="x")


def _lookup(family, arch):
    if family == "flux":
        from loraforge.formats.adapters.flux_names import lookup

        return lambda name: lookup(name, arch)
    by_name = {m.diffusers: m for m in arch.modules}
    return by_name.get


@pytest.mark.parametrize("kohya_name, name", [("ex", "ex-d"), ("m", "m-d")])
def test_diffusers_loads_every_module_and_fuses_to_the_kohya_bake(built, kohya_name, name):
    family, dist, arch, _ = built
    folder = dist.parent
    models = _models(family, arch, folder / "base.safetensors")
    tensors = read_all(dist / f"{name}.safetensors")
    _load(family, models, dist / f"{name}.safetensors")

    injected = {}
    for component, model in models.items():
        for path, layer in model.named_modules():
            if hasattr(layer, "lora_A") and "x" in layer.lora_A:
                injected[f"{component}.{path}"] = layer
    written = {k.rsplit(".lora_", 1)[0] for k in tensors}
    # transformers 5's CLIPTextModel has no text_model level; diffusers strips it from the names (lora_base.py)
    landed = {n if n in injected else n.replace("text_encoder.text_model.", "text_encoder.") for n in written}
    assert landed == set(injected), (sorted(landed ^ set(injected))[:5])
    assert len(written) > 20 and (family != "sd1" or any(n.startswith("text_encoder.") for n in written))

    baked = read_all(dist / f"bake-{kohya_name}.safetensors")
    spec_of = _lookup(family, arch)
    for module in sorted(written):
        layer = injected[module if module in injected else module.replace("text_encoder.text_model.", "text_encoder.")]
        a, b = tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"]
        assert torch.equal(layer.lora_A["x"].weight, a.reshape(layer.lora_A["x"].weight.shape)), module
        assert torch.equal(layer.lora_B["x"].weight, b.reshape(layer.lora_B["x"].weight.shape)), module
        assert layer.scaling["x"] == 1.0, module  # alpha = rank: no alpha is written
        fused = (layer.base_layer.weight.double() + layer.get_delta_weight("x").double()).float()
        spec = spec_of(module)
        want = _rows(baked[spec.key], spec).reshape(fused.shape)
        tolerance = 4 * torch.finfo(torch.float32).eps * (want.abs().max() + 1)
        assert (fused - want).abs().max() <= tolerance, module


def test_every_kohya_module_has_diffusers_parts_that_cover_its_rows():
    pytest.importorskip("loraforge.testing.flux")
    for family in ("sd1", "sdxl", "flux"):
        arch = tiny_architecture(family)
        for spec in arch.modules:
            parts = diffusers_parts(arch, spec.kohya)
            rows = sorted(p.rows for p in parts if p.rows is not None)
            if rows:
                assert rows[0][0] == 0 and rows[-1][1] == spec.shape[0]
                assert all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
            else:
                assert len(parts) == 1


def test_an_unknown_format_is_a_positioned_recipe_error(tmp_path):
    from loraforge.errors import RecipeError

    text = recipe_text("false").replace("    format: diffusers\n", "    format: peft\n", 1)
    (tmp_path / "recipe.yaml").write_text(text)
    with pytest.raises(RecipeError) as raised:
        load_recipe(tmp_path / "recipe.yaml")
    message = str(raised.value)
    line = text.splitlines().index("    format: peft") + 1
    assert f"recipe.yaml:{line}:" in message and "unknown LoRA format 'peft'" in message, message
    assert "kohya" in message and "diffusers" in message, message
