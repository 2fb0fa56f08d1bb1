"""Flux.1 end to end (issue 15): the family as data, detection, every LoRA dialect, block weights, bakes.

References are independent of loraforge's bake: the expected checkpoint is
computed here in float64 from the tensors as written (read back with the
`safetensors` package), with the row layout of the fused BFL weights written
out by hand from diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``
(q | k | v | mlp rows of ``linear1``; scale/shift swap of
``final_layer.adaLN_modulation.1``), then rounded once to bfloat16.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from loraforge.cli import app
from loraforge.errors import LoraforgeError
from loraforge.formats.adapters import parse_adapter
from loraforge.formats.adapters.matching import detect_adapter_architecture, match_adapter
from loraforge.formats.arch import detect_architecture, get_architecture, parse_block_weights
from loraforge.formats.hashing import data_sha256
from loraforge.formats.safetensors_reader import open_safetensors
from loraforge.formats.safetensors_writer import save_tensors
from loraforge.testing.arch import TINY, tiny_architecture
from loraforge.testing.checkpoints import write_synthetic_checkpoint

runner = CliRunner()
TINY_FLUX = dict(TINY["flux"])
H = TINY_FLUX["hidden"]
MLP = 4 * H


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


# --------------------------------------------------------------------------- the family as data


def test_full_size_counts_match_the_released_files():
    """780 transformer tensors (11.90 B parameters), CLIP-L 196, T5-XXL 219, VAE 244 (sd-mecha's flux config)."""
    arch = get_architecture("flux")
    assert (arch.title, arch.variant, arch.size) == ("Flux.1 dev", "dev", "full")
    per = {}
    for t in arch.tensors:
        count, params = per.get(t.component, (0, 0))
        per[t.component] = (count + 1, params + math.prod(t.shape))
    assert per["unet"] == (780, 11_901_408_320)
    assert per["te1"][0] == 196 and per["te2"][0] == 219 and per["vae"][0] == 244
    assert round(per["te2"][1] / 1e9, 2) == 4.76
    shapes = {t.key: t.shape for t in arch.tensors}
    p = "model.diffusion_model."
    assert shapes[p + "double_blocks.0.img_attn.qkv.weight"] == (9216, 3072)
    assert shapes[p + "single_blocks.37.linear1.weight"] == (21504, 3072)
    assert shapes[p + "single_blocks.0.linear2.weight"] == (3072, 15360)
    assert shapes[p + "double_blocks.18.txt_mod.lin.weight"] == (18432, 3072)
    assert shapes[p + "final_layer.adaLN_modulation.1.weight"] == (6144, 3072)
    assert shapes[p + "double_blocks.0.img_attn.norm.query_norm.scale"] == (128,)
    # 304 linears inside the blocks (Forge: "Patching LoRAs for KModel: 304/304") + 10 outside; sum(in+out) per rank
    block_modules = [m for m in arch.modules if m.component == "unet" and m.block[0] in "DS"]
    assert len(block_modules) == 304
    assert sum(m.shape[0] + m.shape[1] for m in block_modules) == 4_786_176
    assert len(arch.full_block_form) == 61
    assert arch.full_block_form[:4] == ("CLIP", "T5", "IN", "D00") and arch.full_block_form[-2:] == ("S37", "OUT")


def test_metadata_strings():
    dev, schnell = get_architecture("flux"), get_architecture("flux", {"guidance": 0})
    assert (dev.modelspec_architecture, schnell.modelspec_architecture) == ("flux-1-dev", "flux-1-schnell")
    assert dev.ss_base_model_version == "flux1"
    assert dev.modelspec_implementation == "https://github.com/black-forest-labs/flux"
    assert schnell.size == "full" and schnell.title == "Flux.1 schnell"


def _shapes(arch, drop=()):
    return {t.key: t.shape for t in arch.tensors if not any(t.key.startswith(d) for d in drop)}


@pytest.mark.parametrize(
    "dims, variant, title",
    [
        ({}, "dev", "Flux.1 dev"),
        ({"guidance": 0}, "schnell", "Flux.1 schnell"),
        ({"in_channels": 384}, "fill", "Flux.1 Fill dev"),
        ({"in_channels": 128}, "control", "Flux.1 Depth/Canny dev"),
    ],
)
@pytest.mark.parametrize("all_in_one", [0, 1])
def test_detection_names_the_variant_in_both_layouts(dims, variant, title, all_in_one):
    arch = get_architecture("flux", {**dims, "all_in_one": all_in_one})
    found = detect_architecture(_shapes(arch))
    assert found.architecture.variant == variant and found.architecture.title == title
    assert found.architecture.size == "full" and found.missing == () and found.extra == ()
    assert dict(found.architecture.dimensions)["all_in_one"] == all_in_one


def test_detection_infers_small_dimensions_and_accepts_missing_components():
    tiny = tiny_architecture("flux")
    found = detect_architecture(_shapes(tiny)).architecture
    assert found.dimensions == tiny.dimensions and found.size == "scaled"
    partial = detect_architecture(_shapes(tiny, drop=("text_encoders.t5xxl.", "vae.")))
    dims = dict(partial.architecture.dimensions)
    assert all(dims[k] == v for k, v in tiny.dimensions if not k.startswith(("t5_", "vae_")))  # absent: unknown
    assert partial.missing and all(k.startswith(("text_encoders.t5xxl.", "vae.")) for k in partial.missing)
    # an inconsistent width is refused
    bad = _shapes(tiny)
    bad["model.diffusion_model.double_blocks.1.img_mlp.0.weight"] = (MLP + 8, H)
    with pytest.raises(LoraforgeError):
        detect_architecture(bad)


# --------------------------------------------------------------------------- dialects


def _lookup(name):
    from loraforge.formats.adapters.flux_names import lookup

    return lookup(name, tiny_architecture("flux"))


@pytest.mark.parametrize(
    "name, key, rows",
    [
        ("lora_unet_double_blocks_0_img_attn_qkv", "double_blocks.0.img_attn.qkv", None),
        ("diffusion_model.double_blocks.1.txt_attn.qkv", "double_blocks.1.txt_attn.qkv", None),
        ("double_blocks.1.img_mod.lin", "double_blocks.1.img_mod.lin", None),
        ("transformer.transformer_blocks.0.attn.to_q", "double_blocks.0.img_attn.qkv", (0, H)),
        ("transformer.transformer_blocks.0.attn.to_k", "double_blocks.0.img_attn.qkv", (H, 2 * H)),
        ("transformer.transformer_blocks.1.attn.add_v_proj", "double_blocks.1.txt_attn.qkv", (2 * H, 3 * H)),
        ("transformer.transformer_blocks.1.attn.to_out.0", "double_blocks.1.img_attn.proj", None),
        ("transformer.transformer_blocks.1.attn.to_add_out", "double_blocks.1.txt_attn.proj", None),
        ("transformer.transformer_blocks.0.ff.net.0.proj", "double_blocks.0.img_mlp.0", None),
        ("transformer.transformer_blocks.0.ff_context.net.2", "double_blocks.0.txt_mlp.2", None),
        ("transformer.transformer_blocks.0.norm1_context.linear", "double_blocks.0.txt_mod.lin", None),
        ("transformer.single_transformer_blocks.2.attn.to_v", "single_blocks.2.linear1", (2 * H, 3 * H)),
        ("transformer.single_transformer_blocks.2.proj_mlp", "single_blocks.2.linear1", (3 * H, 3 * H + MLP)),
        ("transformer.single_transformer_blocks.2.proj_out", "single_blocks.2.linear2", None),
        ("transformer.single_transformer_blocks.0.norm.linear", "single_blocks.0.modulation.lin", None),
        ("single_transformer_blocks.0.attn.to_q", "single_blocks.0.linear1", (0, H)),  # DiffSynth
        ("transformer.base_model.model.single_transformer_blocks.0.attn.to_k", "single_blocks.0.linear1", (H, 2 * H)),
        ("lora_transformer_single_transformer_blocks_0_attn_to_q", "single_blocks.0.linear1", (0, H)),  # OneTrainer
        ("lycoris_transformer_blocks_1_attn_to_k", "double_blocks.1.img_attn.qkv", (H, 2 * H)),
        ("transformer.x_embedder", "img_in", None),
        ("transformer.time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer", None),
        ("transformer.proj_out", "final_layer.linear", None),
        ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", None, None),
        ("lora_te3_encoder_block_1_layer_1_DenseReluDense_wi_0", None, None),
        ("lora_te2_encoder_block_1_layer_0_SelfAttention_o", None, None),
    ],
)
def test_every_dialect_names_its_layer_and_rows(name, key, rows):
    spec = _lookup(name)
    assert spec is not None, name
    if key is not None:
        assert spec.key == f"model.diffusion_model.{key}.weight"
        assert spec.rows == rows
    else:
        assert spec.is_text_encoder


def test_norm_out_is_the_final_modulation_with_halves_swapped():
    spec = _lookup("transformer.norm_out.linear")
    assert spec.key == "model.diffusion_model.final_layer.adaLN_modulation.1.weight"
    assert spec.swap_halves and spec.rows is None
    assert not _lookup("lora_unet_final_layer_adaLN_modulation_1").swap_halves


# --------------------------------------------------------------------------- LoRA files


def _factor(seed, *shape):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * 0.05).to(torch.bfloat16)


def _f64(t):
    return t.to(torch.float64)


class DeltaSet:
    """One set of per-layer ΔW, described as split (diffusers) sub-LoRAs with their own ranks and scales."""

    def __init__(self, rank=4, seed=0):
        self.rank = rank
        self.parts = {}  # diffusers path -> (B, A)
        s = seed
        for d in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_k_proj", "attn.to_out.0", "ff.net.0.proj", "norm1.linear"):
            out = {"ff.net.0.proj": MLP, "norm1.linear": 6 * H}.get(d, H)
            self.parts[f"transformer_blocks.1.{d}"] = (_factor(s, out, rank), _factor(s + 1, rank, H))
            s += 2
        for d, out, inp in (("attn.to_q", H, H), ("attn.to_v", H, H), ("proj_mlp", MLP, H), ("proj_out", H, H + MLP)):
            self.parts[f"single_transformer_blocks.2.{d}"] = (_factor(s, out, rank), _factor(s + 1, rank, inp))
            s += 2
        self.parts["norm_out.linear"] = (_factor(s, 2 * H, rank), _factor(s + 1, rank, H))

    def diffusers_file(self, path):
        tensors = {}
        for name, (b, a) in self.parts.items():
            tensors[f"transformer.{name}.lora_A.weight"] = a
            tensors[f"transformer.{name}.lora_B.weight"] = b
        save_tensors(path, tensors)  # no alpha, no metadata: scale 1 (ai-toolkit)

    def fused(self):
        """The same ΔW as kohya-fused modules: BFL name -> (up, down, alpha) with alpha = rank (scale 1)."""
        out = {}
        r = self.rank

        def stack(bfl, parts, layout):
            ups, downs = [], []
            total = sum(size for _, size in layout)
            col = 0
            present = [(name, size) for name, size in layout if name in parts]
            up = torch.zeros(total, r * len(present), dtype=torch.bfloat16)
            row = 0
            for name, size in layout:
                if name in parts:
                    b, a = parts[name]
                    up[row:row + size, col:col + r] = b
                    downs.append(a)
                    col += r
                row += size
            out[bfl] = (up, torch.cat(downs, 0), float(r * len(present)))

        d = {k.split(".", 2)[2]: v for k, v in self.parts.items() if k.startswith("transformer_blocks.1.")}
        stack("double_blocks_1_img_attn_qkv", d, [("attn.to_q", H), ("attn.to_k", H), ("attn.to_v", H)])
        stack("double_blocks_1_txt_attn_qkv", d, [("attn.add_q_proj", H), ("attn.add_k_proj", H), ("attn.add_v_proj", H)])
        for diff, bfl in (("attn.to_out.0", "img_attn_proj"), ("ff.net.0.proj", "img_mlp_0"), ("norm1.linear", "img_mod_lin")):
            b, a = d[diff]
            out[f"double_blocks_1_{bfl}"] = (b, a, float(r))
        s = {k.split(".", 2)[2]: v for k, v in self.parts.items() if k.startswith("single_transformer_blocks.2.")}
        stack("single_blocks_2_linear1", s, [("attn.to_q", H), ("attn.to_k", H), ("attn.to_v", H), ("proj_mlp", MLP)])
        b, a = s["proj_out"]
        out["single_blocks_2_linear2"] = (b, a, float(r))
        b, a = self.parts["norm_out.linear"]
        out["final_layer_adaLN_modulation_1"] = (torch.cat([b[H:], b[:H]]), a, float(r))  # [shift; scale]
        return out

    def kohya_file(self, path, prefix="lora_unet_", sep="_", suffixes=("lora_up.weight", "lora_down.weight")):
        tensors = {}
        for name, (up, down, alpha) in self.fused().items():
            module = prefix + (name if sep == "_" else _dotted(name))
            tensors[f"{module}.{suffixes[0]}"] = up
            tensors[f"{module}.{suffixes[1]}"] = down
            tensors[f"{module}.alpha"] = torch.tensor(alpha)
        save_tensors(path, tensors)

    def expected_deltas(self):
        """BFL weight key -> float64 ΔW, from the split parts and the row layout written out by hand."""
        p = "model.diffusion_model."
        deltas = {}

        def add(key, rows, value):
            shape = get_shapes()[key]
            current = deltas.setdefault(key, torch.zeros(shape, dtype=torch.float64))
            current[rows[0]:rows[1]] += value

        layout = {
            "attn.to_q": ("double_blocks.1.img_attn.qkv", 0), "attn.to_k": ("double_blocks.1.img_attn.qkv", H),
            "attn.to_v": ("double_blocks.1.img_attn.qkv", 2 * H), "attn.add_k_proj": ("double_blocks.1.txt_attn.qkv", H),
            "attn.to_out.0": ("double_blocks.1.img_attn.proj", 0), "ff.net.0.proj": ("double_blocks.1.img_mlp.0", 0),
            "norm1.linear": ("double_blocks.1.img_mod.lin", 0),
        }
        single = {"attn.to_q": 0, "attn.to_v": 2 * H, "proj_mlp": 3 * H}
        for name, (b, a) in self.parts.items():
            delta = _f64(b) @ _f64(a)
            if name.startswith("transformer_blocks.1."):
                bfl, start = layout[name.split(".", 2)[2]]
                add(f"{p}{bfl}.weight", (start, start + delta.shape[0]), delta)
            elif name.startswith("single_transformer_blocks.2."):
                sub = name.split(".", 2)[2]
                if sub == "proj_out":
                    add(f"{p}single_blocks.2.linear2.weight", (0, H), delta)
                else:
                    add(f"{p}single_blocks.2.linear1.weight", (single[sub], single[sub] + delta.shape[0]), delta)
            else:  # norm_out.linear = [scale; shift]; BFL = [shift; scale]
                add(f"{p}final_layer.adaLN_modulation.1.weight", (0, H), delta[H:])
                add(f"{p}final_layer.adaLN_modulation.1.weight", (H, 2 * H), delta[:H])
        return deltas


def _dotted(name):
    """kohya's underscore BFL name back to the dotted path (only for the names used here)."""
    for word in ("double_blocks_1_", "single_blocks_2_", "final_layer_"):
        if name.startswith(word):
            head = word.rstrip("_").replace("_blocks_", "_blocks.").replace("final_layer", "final_layer")
            rest = name[len(word):]
            rest = {"img_attn_qkv": "img_attn.qkv", "txt_attn_qkv": "txt_attn.qkv", "img_attn_proj": "img_attn.proj",
                    "img_mlp_0": "img_mlp.0", "img_mod_lin": "img_mod.lin", "linear1": "linear1", "linear2": "linear2",
                    "adaLN_modulation_1": "adaLN_modulation.1"}[rest]
            return f"{head}.{rest}"
    raise KeyError(name)


def get_shapes():
    return {t.key: t.shape for t in tiny_architecture("flux").tensors}


def _read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _recipe(folder, lora_file, blocks=None, strength=0.75):
    lines = [
        "loraforge: 1", "name: flux-test", 'date: "2026-11-01"', "precision: {save: same}",
        "inputs:", "  base: {source: base.safetensors}", f"  lora: {{source: {lora_file}}}",
        "targets:", "  baked:", "    kind: checkpoint", "    base: base", "    loras:",
        f"      - use: lora\n        strength: {strength}" + (f"\n        blocks: {blocks}" if blocks else ""),
        "    output: out/baked.safetensors",
    ]
    path = folder / "recipe.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def base_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("flux-base") / "base.safetensors"
    write_synthetic_checkpoint(path, tiny_architecture("flux"), dtype="BF16", seed=3)
    return path


def _bake(tmp_path, base_path, lora_writer, name="lora.safetensors", **recipe):
    folder = tmp_path
    (folder / "base.safetensors").write_bytes(base_path.read_bytes())
    lora_writer(folder / name)
    recipe_path = _recipe(folder, name, **recipe)
    result = invoke("build", recipe_path)
    assert result.exit_code == 0, result.output
    return folder / "out" / "baked.safetensors"


def _expected(base_path, deltas, coefficient):
    base = _read(base_path)
    out = dict(base)
    for key, delta in deltas.items():
        exact = _f64(base[key]) + coefficient * delta
        out[key] = exact.to(torch.bfloat16)  # float64 -> bf16: one rounding of a value exact in float64
    return out


DIALECTS = {
    "diffusers": lambda d, p: d.diffusers_file(p),
    "kohya": lambda d, p: d.kohya_file(p),
    "comfyui": lambda d, p: d.kohya_file(p, prefix="diffusion_model.", sep="."),
    "bfl-peft": lambda d, p: d.kohya_file(p, prefix="", sep=".", suffixes=("lora_B.weight", "lora_A.weight")),
}


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
def test_bake_of_each_dialect_equals_the_float64_reference(tmp_path, base_path, dialect):
    deltas = DeltaSet(rank=4, seed=11)
    out = _bake(tmp_path, base_path, lambda p: DIALECTS[dialect](deltas, p), strength=0.75)
    got, want = _read(out), _expected(base_path, deltas.expected_deltas(), 0.75)
    assert sorted(got) == sorted(want)
    changed = 0
    for key in want:
        assert torch.equal(got[key].view(torch.int16) if got[key].dtype == torch.bfloat16 else got[key],
                           want[key].view(torch.int16) if want[key].dtype == torch.bfloat16 else want[key]), key
        changed += key in deltas.expected_deltas()
    assert changed == 8
    with open_safetensors(out) as f:
        meta = f.metadata
    assert meta["modelspec.architecture"] == "flux-1-dev"


def test_kohya_fused_and_diffusers_split_bake_to_identical_bytes(tmp_path, base_path):
    deltas = DeltaSet(rank=3, seed=5)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    fused = _bake(tmp_path / "a", base_path, lambda p: deltas.kohya_file(p))
    split = _bake(tmp_path / "b", base_path, lambda p: deltas.diffusers_file(p))
    # Every tensor byte is the same; the metadata differs only where it records the LoRA's own sha256.
    assert data_sha256(fused) == data_sha256(split)
    with open_safetensors(fused) as a, open_safetensors(split) as b:
        assert [(n, a.info(n).dtype, a.info(n).shape) for n in a.names()] == [(n, b.info(n).dtype, b.info(n).shape) for n in b.names()]


def test_plan_matches_every_module_and_inspect_names_family_variant_and_dialect(tmp_path, base_path):
    deltas = DeltaSet(rank=2, seed=1)
    deltas.diffusers_file(tmp_path / "d.safetensors")
    with open_safetensors(tmp_path / "d.safetensors") as f:
        adapter = parse_adapter(f)
    arch = detect_adapter_architecture(adapter)
    assert arch.name == "flux"
    match = match_adapter(adapter, tiny_architecture("flux"))
    assert not match.unmatched and not match.shape_mismatches and len(match.matched) == len(deltas.parts)
    report = json.loads(invoke("inspect", "--json", tmp_path / "d.safetensors").output)
    assert report["architecture"] == "flux" and report["dialect"] == "diffusers"
    assert report["adapter_kind"] == "PEFT LoRA"  # lora_A / lora_B halves
    DIALECTS["comfyui"](deltas, tmp_path / "c.safetensors")
    report = json.loads(invoke("inspect", "--json", tmp_path / "c.safetensors").output)
    assert report["dialect"] == "comfyui" and report["adapter_kind"] == "LoRA"  # kohya's halves, dotted names
    report = json.loads(invoke("inspect", "--json", base_path).output)
    assert (report["architecture"], report["variant"]) == ("flux", "dev")
    assert report["architecture_title"] == "Flux.1 dev"


# --------------------------------------------------------------------------- block weights


def test_61_value_vector_mapping_ranges_and_sd_vectors():
    full = get_architecture("flux")
    values = [i / 100 for i in range(61)]
    weights = parse_block_weights(values, full)
    assert weights.weight("CLIP") == 0 and weights.weight("T5") == 0.01 and weights.weight("IN") == 0.02
    assert weights.weight("D00") == 0.03 and weights.weight("D18") == 0.21 and weights.weight("S00") == 0.22
    assert weights.weight("S37") == 0.59 and weights.weight("OUT") == 0.6
    mapped = parse_block_weights({"default": 1, "D00-D06": 0, "S20-S37": 0.5}, full)
    assert [mapped.weight(b) for b in ("D00", "D06", "D07", "S19", "S20", "S37", "OUT", "CLIP")] == [0, 0, 1, 1, 0.5, 0.5, 1, 1]
    with pytest.raises(LoraforgeError, match=r"has 26, which is the length of a Stable Diffusion 1.x.*do not carry over to Flux"):
        parse_block_weights([1.0] * 26, full)
    with pytest.raises(LoraforgeError, match="crosses"):
        parse_block_weights({"D17-S01": 1}, full)
    assert parse_block_weights("ALL0.5", full).weight("S11") == 0.5


def test_block_weights_apply_per_block_in_a_bake(tmp_path, base_path):
    deltas = DeltaSet(rank=2, seed=9)
    out = _bake(tmp_path, base_path, lambda p: deltas.kohya_file(p), blocks="{default: 1, D01: 0, OUT: 0.5}", strength=1.0)
    expected = deltas.expected_deltas()
    got = _read(out)
    base = _read(base_path)
    for key, delta in expected.items():
        w = 0.0 if "double_blocks.1." in key else 0.5 if "final_layer" in key else 1.0
        want = (_f64(base[key]) + w * delta).to(torch.bfloat16)
        assert torch.equal(got[key].view(torch.int16), want.view(torch.int16)), key


# --------------------------------------------------------------------------- merge and extract


def _module_deltas(path):
    """kohya module name -> float64 ΔW (scale alpha/rank) of a LoRA file, read with `safetensors`."""
    tensors = _read(path)
    out = {}
    for key in tensors:
        if key.endswith(".lora_up.weight"):
            name = key[: -len(".lora_up.weight")]
            up, down = _f64(tensors[key]), _f64(tensors[name + ".lora_down.weight"])
            alpha = float(tensors[name + ".alpha"]) if name + ".alpha" in tensors else up.shape[1]
            out[name] = up @ down * (alpha / up.shape[1])
    return out


def test_svd_and_concat_merges_of_fused_and_split_loras_write_fused_modules(tmp_path, base_path):
    (tmp_path / "base.safetensors").write_bytes(base_path.read_bytes())
    kohya, split = DeltaSet(rank=2, seed=21), DeltaSet(rank=3, seed=22)
    kohya.kohya_file(tmp_path / "k.safetensors")
    split.diffusers_file(tmp_path / "d.safetensors")
    (tmp_path / "r.yaml").write_text("\n".join([
        "loraforge: 1", "name: flux-merge", 'date: "2026-11-01"', "seed: 0", "precision: {save: float32}",
        "inputs:", "  k: {source: k.safetensors}", "  d: {source: d.safetensors}", "targets:",
        "  cat: {kind: lora, method: concat, loras: [{use: k, strength: 0.8}, {use: d, strength: -0.5}], output: out/cat.safetensors}",
        "  svd: {kind: lora, method: svd, rank: 16, loras: [{use: k, strength: 0.8}, {use: d, strength: -0.5}], output: out/svd.safetensors}",
    ]) + "\n")
    result = invoke("build", tmp_path / "r.yaml")
    assert result.exit_code == 0, result.output
    want = {}
    for deltas, w in ((kohya, 0.8), (split, -0.5)):
        for key, delta in deltas.expected_deltas().items():
            want[key] = want.get(key, 0) + w * delta
    p = "model.diffusion_model."
    for name in ("cat", "svd"):
        got = _module_deltas(tmp_path / "out" / f"{name}.safetensors")
        assert all(n.startswith("lora_unet_") for n in got)  # fused, kohya names only
        assert len(got) == len(want) == 8
        for module, delta in got.items():
            key = p + module[len("lora_unet_"):].replace("_", ".") + ".weight"
            key = (key.replace("double.blocks", "double_blocks").replace("single.blocks", "single_blocks")
                   .replace("img.attn", "img_attn").replace("txt.attn", "txt_attn").replace("img.mlp", "img_mlp")
                   .replace("img.mod", "img_mod").replace("final.layer", "final_layer").replace("adaLN.modulation", "adaLN_modulation"))
            error = (delta - want[key]).norm() / want[key].norm()
            assert error < 1e-6, (name, key, float(error))  # float32 factors of an exact (rank-sufficient) merge


def test_extraction_on_flux_writes_fused_kohya_modules(tmp_path, base_path):
    (tmp_path / "base.safetensors").write_bytes(base_path.read_bytes())
    write_synthetic_checkpoint(tmp_path / "tuned.safetensors", tiny_architecture("flux"), dtype="BF16", seed=4)
    (tmp_path / "r.yaml").write_text("\n".join([
        "loraforge: 1", "name: flux-extract", 'date: "2026-11-01"', "seed: 0", "precision: {save: float32}",
        "inputs:", "  base: {source: base.safetensors}", "  tuned: {source: tuned.safetensors}", "targets:",
        "  ex: {kind: extract, base: base, tuned: tuned, rank: 32, output: out/ex.safetensors}",
    ]) + "\n")
    result = invoke("build", tmp_path / "r.yaml")
    assert result.exit_code == 0, result.output
    got = _module_deltas(tmp_path / "out" / "ex.safetensors")
    arch = tiny_architecture("flux")
    assert set(got) == {m.kohya for m in arch.modules}  # every layer differs: all 314-size-table rows, fused
    base, tuned = _read(tmp_path / "base.safetensors"), _read(tmp_path / "tuned.safetensors")
    spec = arch.module_by_kohya["lora_unet_single_blocks_2_linear1"]
    want = _f64(tuned[spec.key]) - _f64(base[spec.key])  # rank 32 = full rank of a 32-wide input: exact
    assert float((got[spec.kohya] - want).norm() / want.norm()) < 1e-5
    with open_safetensors(tmp_path / "out" / "ex.safetensors") as f:
        assert f.metadata["modelspec.architecture"] == "flux-1-dev/lora"
        assert f.metadata["ss_base_model_version"] == "flux1"
        assert f.metadata["ss_network_module"] == "networks.lora_flux"


# --------------------------------------------------------------------------- LyCORIS kinds on Flux layers


def test_lokr_and_loha_on_split_flux_layers_bake_exactly(tmp_path, base_path):
    """SimpleTuner LyCORIS naming (lycoris_<diffusers path>): LoKr on to_k, LoHa on proj_mlp."""
    w1, w2 = _factor(1, 4, 4) * 8, _factor(2, H // 4, H // 4) * 8
    a1, b1, a2, b2 = _factor(3, MLP, 2), _factor(4, 2, H), _factor(5, MLP, 2), _factor(6, 2, H)
    tensors = {
        "lycoris_single_transformer_blocks_1_attn_to_k.lokr_w1": w1,
        "lycoris_single_transformer_blocks_1_attn_to_k.lokr_w2": w2,
        "lycoris_single_transformer_blocks_1_attn_to_k.alpha": torch.tensor(4.0),
        "lycoris_single_transformer_blocks_1_proj_mlp.hada_w1_a": a1,
        "lycoris_single_transformer_blocks_1_proj_mlp.hada_w1_b": b1,
        "lycoris_single_transformer_blocks_1_proj_mlp.hada_w2_a": a2,
        "lycoris_single_transformer_blocks_1_proj_mlp.hada_w2_b": b2,
        "lycoris_single_transformer_blocks_1_proj_mlp.alpha": torch.tensor(1.0),
    }
    out = _bake(tmp_path, base_path, lambda p: save_tensors(p, tensors), strength=0.5)
    key = "model.diffusion_model.single_blocks.1.linear1.weight"
    base = _read(base_path)[key]
    delta = torch.zeros(base.shape, dtype=torch.float64)
    delta[H:2 * H] = torch.kron(_f64(w1), _f64(w2))  # both LoKr factors full: scale 1
    delta[3 * H:] = (_f64(a1) @ _f64(b1)) * (_f64(a2) @ _f64(b2)) * (1.0 / 2)  # LoHa: alpha/rank
    want = (_f64(base) + 0.5 * delta).to(torch.bfloat16)
    assert torch.equal(_read(out)[key].view(torch.int16), want.view(torch.int16))


# --------------------------------------------------------------------------- fp8 bases


def _fp8_base(path, scaled=False):
    tensors = _read(path.parent / "bf16.safetensors")
    out = {}
    for key, value in tensors.items():
        if value.dtype == torch.bfloat16 and value.dim() == 2 and key.startswith("model.diffusion_model."):
            out[key] = value.to(torch.float8_e4m3fn)
            if scaled:
                out[key[: -len(".weight")] + ".scale_weight"] = torch.tensor(0.5)
        else:
            out[key] = value
    if scaled:
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_tensors(path, out)


def _fp8_recipe(folder, save):
    lines = ["loraforge: 1", "name: fp8", 'date: "2026-11-01"', f"precision: {{save: {save}}}", "inputs:",
             "  base: {source: base.safetensors}", "  lora: {source: lora.safetensors}", "targets:",
             "  baked: {kind: checkpoint, base: base, loras: [{use: lora}], output: out/baked.safetensors}"]
    (folder / "recipe.yaml").write_text("\n".join(lines) + "\n")
    return folder / "recipe.yaml"


def test_fp8_flux_base_bakes_into_the_dtype_asked_for_and_never_drops_the_delta(tmp_path, base_path):
    (tmp_path / "bf16.safetensors").write_bytes(base_path.read_bytes())
    _fp8_base(tmp_path / "base.safetensors")
    deltas = DeltaSet(rank=2, seed=31)
    deltas.kohya_file(tmp_path / "lora.safetensors")
    refused = invoke("build", _fp8_recipe(tmp_path, "same"))
    assert refused.exit_code != 0 and "float8" in refused.output and "Traceback" not in refused.output
    result = invoke("build", _fp8_recipe(tmp_path, "bfloat16"))
    assert result.exit_code == 0, result.output
    base, got = _read(tmp_path / "base.safetensors"), _read(tmp_path / "out" / "baked.safetensors")
    for key, delta in deltas.expected_deltas().items():
        exact = _f64(base[key]) + delta  # fp8 widens exactly; one rounding to bf16
        exact = torch.where((delta == 0) & (exact == 0), _f64(base[key]), exact)  # a -0 base plus nothing stays -0
        want = exact.to(torch.bfloat16)
        assert torch.equal(got[key].view(torch.int16), want.view(torch.int16)), key


def test_scaled_fp8_flux_base_is_dequantised_into_the_save_dtype(tmp_path, base_path):
    """Golden values, requantisation and rescaling: tests/test_flux_scaled_fp8.py."""
    (tmp_path / "bf16.safetensors").write_bytes(base_path.read_bytes())
    _fp8_base(tmp_path / "base.safetensors", scaled=True)
    deltas = DeltaSet(rank=2, seed=31)
    deltas.kohya_file(tmp_path / "lora.safetensors")
    assert detect_architecture({k: tuple(v.shape) for k, v in _read(tmp_path / "base.safetensors").items()}).architecture.name == "flux"
    result = invoke("build", _fp8_recipe(tmp_path, "bfloat16"))
    assert result.exit_code == 0, result.output
    base, got = _read(tmp_path / "base.safetensors"), _read(tmp_path / "out" / "baked.safetensors")
    assert not any(k.endswith(".scale_weight") or k == "scaled_fp8" for k in got)
    for key, delta in deltas.expected_deltas().items():
        exact = _f64(base[key]) * 0.5 + delta  # the stored value x its scale, plus ΔW
        exact = torch.where((delta == 0) & (exact == 0), _f64(base[key]), exact)  # a -0 base plus nothing stays -0
        want = exact.to(torch.bfloat16)
        assert torch.equal(got[key].view(torch.int16), want.view(torch.int16)), key


# --------------------------------------------------------------------------- XLabs


def xlabs_tensors(rank=3, seed=41, prefix=""):
    """An XLabs LoRA (no alpha: scale 1) on double block 1 (both streams) and single block 0."""
    tensors, s = {}, seed
    for name, out, inp in (("double_blocks.1.processor.qkv_lora1", 3 * H, H), ("double_blocks.1.processor.qkv_lora2", 3 * H, H),
                           ("double_blocks.1.processor.proj_lora1", H, H), ("double_blocks.1.processor.proj_lora2", H, H),
                           ("single_blocks.0.processor.qkv_lora", 3 * H, H), ("single_blocks.0.processor.proj_lora", H, H + MLP)):
        tensors[f"{prefix}{name}.down.weight"] = _factor(s, rank, inp)
        tensors[f"{prefix}{name}.up.weight"] = _factor(s + 1, out, rank)
        s += 2
    return tensors


XLABS_TARGETS = {  # XLabs module -> (BFL weight, first row)
    "double_blocks.1.processor.qkv_lora1": ("double_blocks.1.img_attn.qkv", 0),
    "double_blocks.1.processor.qkv_lora2": ("double_blocks.1.txt_attn.qkv", 0),
    "double_blocks.1.processor.proj_lora1": ("double_blocks.1.img_attn.proj", 0),
    "double_blocks.1.processor.proj_lora2": ("double_blocks.1.txt_attn.proj", 0),
    "single_blocks.0.processor.qkv_lora": ("single_blocks.0.linear1", 0),  # rows 0:3h; the mlp rows untouched
    "single_blocks.0.processor.proj_lora": ("single_blocks.0.linear2", 0),
}


def test_xlabs_lora_bakes_to_the_float64_reference(tmp_path, base_path):
    tensors = xlabs_tensors()
    out = _bake(tmp_path, base_path, lambda p: save_tensors(p, tensors), strength=0.625)  # dyadic: float64 stays exact
    base, got = _read(base_path), _read(out)
    for name, (bfl, first) in XLABS_TARGETS.items():
        key = f"model.diffusion_model.{bfl}.weight"
        delta = torch.zeros(base[key].shape, dtype=torch.float64)
        product = _f64(tensors[name + ".up.weight"]) @ _f64(tensors[name + ".down.weight"])
        delta[first:first + product.shape[0]] = product
        exact = _f64(base[key]) + 0.625 * delta
        exact = torch.where((delta == 0) & (exact == 0), _f64(base[key]), exact)
        assert torch.equal(got[key].view(torch.int16), exact.to(torch.bfloat16).view(torch.int16)), key
    report = json.loads(invoke("inspect", "--json", tmp_path / "lora.safetensors").output)
    assert report["dialect"] == "xlabs" and report["unmatched_modules"] == [] and report["unclaimed_keys"] == []


# --------------------------------------------------------------------------- text encoders


def test_clip_and_t5_modules_bake_with_te_strength_and_their_blocks(tmp_path, base_path):
    """kohya lora_te1_ (CLIP-L), lora_te3_ (T5), OneTrainer lora_te2_ (T5): te x weight(CLIP / T5)."""
    t5 = TINY_FLUX["t5_width"]
    modules = {
        "lora_te1_text_model_encoder_layers_3_self_attn_q_proj": ("text_encoders.clip_l.transformer.text_model.encoder.layers.3.self_attn.q_proj.weight", 16, 16, "CLIP"),
        "lora_te3_encoder_block_1_layer_1_DenseReluDense_wi_0": ("text_encoders.t5xxl.transformer.encoder.block.1.layer.1.DenseReluDense.wi_0.weight", TINY_FLUX["t5_ff"], t5, "T5"),
        "lora_te2_encoder_block_0_layer_0_SelfAttention_o": ("text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.o.weight", t5, TINY_FLUX["t5_inner"], "T5"),
    }
    tensors, s = {}, 61
    for name, (_, out, inp, _) in modules.items():
        tensors[f"{name}.lora_up.weight"] = _factor(s, out, 2)
        tensors[f"{name}.lora_down.weight"] = _factor(s + 1, 2, inp)
        tensors[f"{name}.alpha"] = torch.tensor(1.0)
        s += 2
    folder = tmp_path
    (folder / "base.safetensors").write_bytes(base_path.read_bytes())
    save_tensors(folder / "lora.safetensors", tensors)
    (folder / "r.yaml").write_text("\n".join([
        "loraforge: 1", "name: te", 'date: "2026-11-01"', "precision: {save: same}", "inputs:",
        "  base: {source: base.safetensors}", "  lora: {source: lora.safetensors}", "targets:",
        "  baked: {kind: checkpoint, base: base, loras: [{use: lora, strength: 1, te: 0.5, blocks: {default: 1, T5: 0.5}}], output: out/b.safetensors}",
    ]) + "\n")
    result = invoke("build", folder / "r.yaml")
    assert result.exit_code == 0, result.output
    base, got = _read(base_path), _read(folder / "out" / "b.safetensors")
    for name, (key, _, _, block) in modules.items():
        weight = 0.5 * (0.5 if block == "T5" else 1.0)
        delta = _f64(tensors[f"{name}.lora_up.weight"]) @ _f64(tensors[f"{name}.lora_down.weight"]) * 0.5  # alpha 1 / rank 2
        want = (_f64(base[key]) + weight * delta).to(torch.bfloat16)
        assert torch.equal(got[key].view(torch.int16), want.view(torch.int16)), key


def test_a_file_holding_a_layer_fused_and_split_is_refused(tmp_path, base_path):
    tensors = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": _factor(1, 3 * H, 2),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": _factor(2, 2, H),
        "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": _factor(3, H, 2),
        "transformer.transformer_blocks.0.attn.to_k.lora_A.weight": _factor(4, 2, H),
    }
    (tmp_path / "base.safetensors").write_bytes(base_path.read_bytes())
    save_tensors(tmp_path / "lora.safetensors", tensors)
    result = invoke("build", _recipe(tmp_path, "lora.safetensors"))
    assert result.exit_code != 0 and "apply it twice" in result.output and "Traceback" not in result.output


def test_dora_on_norm_out_linear_uses_the_adapters_row_order(tmp_path, base_path):
    """PEFT DoRA on diffusers' norm_out.linear: W' rows are [scale; shift] in the adapter, [shift; scale] in BFL."""
    b, a = _factor(71, 2 * H, 2), _factor(72, 2, H)
    key = "model.diffusion_model.final_layer.adaLN_modulation.1.weight"
    base = _f64(_read(base_path)[key])
    diffusers_order = torch.cat([base[H:], base[:H]])
    magnitude = (diffusers_order + _f64(b) @ _f64(a)).norm(dim=1) * 1.25
    tensors = {
        "transformer.norm_out.linear.lora_A.weight": a,
        "transformer.norm_out.linear.lora_B.weight": b,
        "transformer.norm_out.linear.lora_magnitude_vector": magnitude.to(torch.bfloat16),
    }
    out = _bake(tmp_path, base_path, lambda p: save_tensors(p, tensors), strength=1.0)
    merged = diffusers_order + _f64(b) @ _f64(a)
    dora = merged * (_f64(magnitude.to(torch.bfloat16)) / merged.norm(dim=1)).unsqueeze(1)  # PEFT: per output row
    want = torch.cat([dora[H:], dora[:H]])
    got = _f64(_read(out)[key])
    assert float((got - want).abs().max()) <= float(want.abs().max()) * 2 ** -7  # bf16 output
    assert float((got - want).norm() / want.norm()) < 5e-3
