"""`kind: lora` end to end on tiny models: concat exactness, SVD vs a dense reference, resize, errors, chains.

References are computed here from the raw tensors (safetensors' own reader and
torch.linalg.svd), not with loraforge's merge code.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from loraforge.errors import LoraforgeError
from loraforge.execute.build import run_build
from loraforge.testing.arch import tiny_architecture
from loraforge.formats.hashing import file_hashes
from loraforge.build import plan_build
from loraforge.recipe.loader import load_recipe
from loraforge.testing.adapters import write_synthetic_adapter
from loraforge.testing.checkpoints import write_synthetic_checkpoint

SD1 = tiny_architecture("sd1")
# (name, synthetic kind, options); LoRA ranks 2-8 with alphas ≠ rank, a LoCon with 3x3 convs and Tucker cores.
ADAPTERS = (
    ("style", "lora", {"rank": 8, "alpha": 4, "text_encoder": True}),
    ("convs", "lora", {"rank": 4, "alpha": 1, "targets": "all", "text_encoder": False}),
    ("tucker", "lora", {"rank": 2, "targets": "all", "tucker": True, "text_encoder": False}),
    ("hada", "loha", {"rank": 2, "text_encoder": False}),
)
# The entries every merge below uses: negative strengths, a te strength and block weights.
ENTRIES = (
    "      - {use: style, strength: 0.8, te: 0.3, blocks: OUTD}",
    "      - {use: convs, strength: -0.5, blocks: {default: 1, IN04: 0.5, OUT03-OUT05: 0}}",
    "      - {use: tucker, strength: 1.5}",
)
COEFFICIENTS = {  # (name, text encoder?, block) -> coefficient, evaluated by hand
    "style": lambda te, block: 0.3 if te else (1.0 if block in ("OUT03", "OUT04", "OUT05", "OUT06") else 0.0) * 0.8,
    "convs": lambda te, block: -0.5 * (0.5 if block == "IN04" else 0.0 if block in ("OUT03", "OUT04", "OUT05") else 1.0),
    "tucker": lambda te, block: 1.5,
    "hada": lambda te, block: 0.7,
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The references multiply tiny matrices, where torch's thread pool only adds waiting on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("merge-models")
    write_synthetic_checkpoint(folder / "base.safetensors", SD1, seed=1, dtype="F32")
    for seed, (name, kind, options) in enumerate(ADAPTERS):
        write_synthetic_adapter(folder / f"{name}.safetensors", SD1, kind, seed=seed, dtype="F32", **options)
    write_synthetic_adapter(folder / "xl.safetensors", tiny_architecture("sdxl"), "lora", rank=4)
    write_synthetic_adapter(folder / "dora.safetensors", SD1, "lora", rank=4, dora=True)
    return folder


def write_recipe(models: Path, folder: Path, targets: list[str], save: str = "float32") -> Path:
    names = [name for name, *_ in ADAPTERS] + ["base", "xl", "dora"]
    lines = [
        "loraforge: 1",
        "name: merge-test",
        'date: "2026-11-01"',
        "seed: 7",
        f"precision: {{save: {save}}}",
        "inputs:",
        *(f"  {name}: {{source: {models / name}.safetensors}}" for name in names),
        "targets:",
        *targets,
    ]
    path = folder / "recipe.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def build(recipe: Path, *targets: str):
    plan = plan_build(load_recipe(recipe), list(targets))
    return plan, run_build(plan, device="cpu").built


def read_modules(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    with safe_open(str(path), "pt") as handle:
        for key in handle.keys():
            name, _, suffix = key.partition(".")
            modules[name][suffix] = handle.get_tensor(key).to(torch.float64)
    return dict(modules)


def reference_delta(factors: dict[str, torch.Tensor], shape) -> torch.Tensor:
    """kohya LoRA/LoCon (incl. Tucker) and LoHa ΔW in float64, as an (out, in·kh·kw) matrix."""
    if "hada_w1_a.weight" in factors or "hada_w1_a" in factors:
        get = lambda k: factors.get(k, factors.get(k + ".weight"))  # noqa: E731
        rank = get("hada_w1_b").shape[0]
        scale = float(factors["alpha"]) / rank
        delta = (get("hada_w1_a") @ get("hada_w1_b").flatten(1)) * (get("hada_w2_a") @ get("hada_w2_b").flatten(1))
        return delta.reshape(shape[0], -1) * scale
    up, down = factors["lora_up.weight"], factors["lora_down.weight"]
    rank = down.shape[0]
    scale = float(factors["alpha"]) / rank if "alpha" in factors else 1.0
    if "lora_mid.weight" in factors:
        delta = torch.einsum("oi,ijhw,jc->ochw", up.flatten(1), factors["lora_mid.weight"], down.flatten(1))
        return delta.reshape(shape[0], -1) * scale
    return (up.flatten(1) @ down.flatten(1)) * scale


def reference_sums(models: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Σ cᵢ·ΔWᵢ per kohya module, from the raw files and COEFFICIENTS."""
    sums: dict[str, torch.Tensor] = {}
    for name in names:
        for module, factors in read_modules(models / f"{name}.safetensors").items():
            spec = SD1.module_by_kohya[module]
            coefficient = COEFFICIENTS[name](spec.is_text_encoder, spec.block)
            if coefficient == 0.0:
                continue
            delta = reference_delta(factors, spec.shape) * coefficient
            sums[module] = sums[module] + delta if module in sums else delta
    return sums


def output_delta(factors: dict[str, torch.Tensor]) -> torch.Tensor:
    assert float(factors["alpha"]) == factors["lora_down.weight"].shape[0]  # alpha = rank: scale 1
    return factors["lora_up.weight"].flatten(1) @ factors["lora_down.weight"].flatten(1)


def target(name: str, *body: str) -> list[str]:
    return [f"  {name}:", "    kind: lora", *(f"    {line}" for line in body), "    loras:", *ENTRIES]


# --- concat --------------------------------------------------------------------------


def test_concat_reproduces_the_weighted_sum_exactly(models, tmp_path):
    recipe = write_recipe(models, tmp_path, target("cat", "method: concat"), save="float32")
    _, (result,) = build(recipe)
    merged = read_modules(result.written.path)
    expected = reference_sums(models, ["style", "convs", "tucker"])
    assert sorted(merged) == sorted(expected)
    for module, total in expected.items():
        factors = merged[module]
        spec = SD1.module_by_kohya[module]
        # Rank Σrᵢ over the contributions that are not zeroed by their coefficient.
        ranks = {"style": 8, "convs": 4, "tucker": 2}
        contributing = [n for n in ranks if module in read_modules_cached(models, n) and COEFFICIENTS[n](spec.is_text_encoder, spec.block) != 0]
        assert factors["lora_down.weight"].shape[0] == sum(ranks[n] for n in contributing)
        if spec.is_conv:
            assert factors["lora_up.weight"].shape[2:] == (1, 1) and factors["lora_down.weight"].shape[2:] == spec.shape[2:]
        # float32 factors: each entry rounded once, so the product agrees to float32 rounding.
        torch.testing.assert_close(output_delta(factors), total, rtol=0, atol=2e-6 * float(total.abs().max()))
    report = json.loads(result.report_path.read_text())
    assert report["summary"]["saved_relative_error_max"] < 1e-6


_CACHE: dict = {}


def read_modules_cached(models: Path, name: str):
    if name not in _CACHE:
        _CACHE[name] = read_modules(models / f"{name}.safetensors")
    return _CACHE[name]


def read_all(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as handle:
        return {key: handle.get_tensor(key).to(torch.float64) for key in handle.keys()}


# --- svd ----------------------------------------------------------------------------


def test_svd_merge_equals_truncated_svd_of_the_dense_sum(models, tmp_path):
    recipe = write_recipe(models, tmp_path, target("svd", "rank: 6", "conv_rank: 3"), save="float32")
    _, (result,) = build(recipe)
    merged = read_modules(result.written.path)
    report = {m["name"]: m for m in json.loads(result.report_path.read_text())["modules"]}
    expected = reference_sums(models, ["style", "convs", "tucker"])
    assert sorted(merged) == sorted(expected)
    for module, total in expected.items():
        spec = SD1.module_by_kohya[module]
        k = 3 if spec.is_conv and spec.shape[2:] != (1, 1) else 6
        u, s, vh = torch.linalg.svd(total, full_matrices=False)
        keep = min(k, int((s > s[0] * max(total.shape) * 2.3e-16).sum()))
        best = u[:, :keep] @ torch.diag(s[:keep]) @ vh[:keep]
        got = output_delta(merged[module])
        assert merged[module]["lora_down.weight"].shape[0] == keep
        torch.testing.assert_close(got, best, rtol=0, atol=1e-5 * float(s[0]))
        optimal = math.sqrt(float((s[keep:] ** 2).sum() / (s**2).sum()))
        assert report[module]["relative_error"] == pytest.approx(optimal, rel=1e-4, abs=1e-9)
        measured = float(torch.linalg.norm(total - got) / torch.linalg.norm(total))
        assert report[module]["saved_relative_error"] == pytest.approx(measured, rel=1e-3, abs=1e-7)
        count = len(report[module]["singular_values"])
        torch.testing.assert_close(torch.tensor(report[module]["singular_values"], dtype=torch.float64), s[:count], rtol=1e-5, atol=0)


def test_baking_merged_loras_equals_baking_the_ingredients(models, tmp_path):
    """Exactly (to float32 rounding) for concat; within the reported error for svd."""
    targets = target("cat", "method: concat") + target("svd", "rank: 4") + [
        "  direct:", "    kind: checkpoint", "    base: base", "    loras:", *ENTRIES,
        "  via-cat:", "    kind: checkpoint", "    base: base", "    loras: [{use: cat}]",
        "  via-svd:", "    kind: checkpoint", "    base: base", "    loras: [{use: svd}]",
    ]
    recipe = write_recipe(models, tmp_path, targets, save="float32")
    plan, results = build(recipe)
    assert [t.name for t in plan.targets] == ["cat", "svd", "direct", "via-cat", "via-svd"]
    base, direct, via_cat, via_svd = (
        read_all(p) for p in (models / "base.safetensors", *(r.written.path for r in results[2:]))
    )
    for key, value in direct.items():
        torch.testing.assert_close(via_cat[key], value, rtol=0, atol=2 * torch.finfo(torch.float32).eps * float(value.abs().max()))
    report = {m["name"]: m for m in json.loads(results[1].report_path.read_text())["modules"]}
    for module, entry in report.items():
        key = SD1.module_by_kohya[module].key
        error = float(torch.linalg.norm(via_svd[key] - direct[key]) / torch.linalg.norm(direct[key] - base[key]))
        assert error == pytest.approx(entry["saved_relative_error"], rel=0.01, abs=1e-5)


def test_resize_to_at_least_the_true_rank_is_exact(models, tmp_path):
    targets = [
        "  resized:", "    kind: lora", "    rank: 16", "    loras: [{use: style}]",
        "  halved:", "    kind: lora", "    rank: {energy: 0.9, max: 5}", "    loras: [{use: style}]",
    ]
    recipe = write_recipe(models, tmp_path, targets, save="float32")
    _, (resized, halved) = build(recipe)
    merged = read_modules(resized.written.path)
    source = read_modules(models / "style.safetensors")
    for module, factors in source.items():
        shape = SD1.module_by_kohya[module].shape
        assert merged[module]["lora_down.weight"].shape[0] == 8  # the true rank, not 16
        expected = reference_delta(factors, shape)
        torch.testing.assert_close(output_delta(merged[module]), expected, rtol=0, atol=1e-6 * float(expected.abs().max()))
    entries = json.loads(halved.report_path.read_text())["modules"]
    for entry in entries:
        squares = [v * v for v in entry["singular_values"]]
        assert entry["rank"] <= 5
        assert entry["energy_retained"] >= 0.9 - 1e-6 or entry["rank"] == 5


def test_dense_inputs_go_through_the_dense_svd(models, tmp_path):
    entries = ["      - {use: convs, strength: -0.5}", "      - {use: hada, strength: 0.7}"]
    targets = [
        "  exact:", "    kind: lora", "    rank: 3", "    loras:", *entries,
        "  fast:", "    kind: lora", "    rank: 3", "    dense_svd: randomized", "    loras:", *entries,
    ]
    recipe = write_recipe(models, tmp_path, targets, save="float32")
    _, (exact, fast) = build(recipe)
    reports = [{m["name"]: m for m in json.loads(r.report_path.read_text())["modules"]} for r in (exact, fast)]
    hada = read_modules(models / "hada.safetensors")
    convs = read_modules(models / "convs.safetensors")
    merged = read_modules(exact.written.path)
    for module in hada:
        shape = SD1.module_by_kohya[module].shape
        total = reference_delta(hada[module], shape) * 0.7 + reference_delta(convs[module], shape) * -0.5
        s = torch.linalg.svd(total).S
        optimal = math.sqrt(float((s[3:] ** 2).sum() / (s**2).sum()))
        assert reports[0][module]["input_rank"] is None
        assert reports[0][module]["relative_error"] == pytest.approx(optimal, rel=1e-5)
        assert optimal * (1 - 1e-5) <= reports[1][module]["relative_error"] <= 1.05 * optimal + 1e-9
        got = output_delta(merged[module])
        assert float(torch.linalg.norm(total - got) / torch.linalg.norm(total)) == pytest.approx(optimal, rel=1e-4)


# --- output file -------------------------------------------------------------------------


def test_output_metadata_and_hashes(models, tmp_path):
    recipe = write_recipe(models, tmp_path, target("svd", "rank: 4", "conv_rank: 2"), save="float16")
    _, (result,) = build(recipe)
    with safe_open(str(result.written.path), "pt") as handle:
        metadata = handle.metadata()
        keys = list(handle.keys())
        dtypes = {handle.get_tensor(k).dtype for k in keys}
    hashes = file_hashes(result.written.path)
    assert dtypes == {torch.float16}
    assert metadata["ss_network_module"] == "networks.lora"
    # Linear ranks are capped by the numerical rank of small modules, so they differ: kohya writes "Dynamic".
    assert metadata["ss_network_dim"] == metadata["ss_network_alpha"] == "Dynamic"
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "2"}
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_v2"] == "False"
    assert metadata["sshs_model_hash"] == hashes.data_sha256
    assert metadata["modelspec.hash_sha256"] == "0x" + hashes.data_sha256
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert metadata["modelspec.merged_from"] == "style, convs, tucker"
    assert metadata["loraforge.target"] == "svd" and metadata["modelspec.date"] == "2026-11-01"
    assert hashes.sha256 == result.written.sha256
    # Tensor data in name order (header key order is JSON; the data offsets tell the layout).
    with open(result.written.path, "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    header.pop("__metadata__")
    by_offset = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    assert by_offset == sorted(header)


def test_rebuild_in_another_process_gives_the_same_bytes(models, tmp_path):
    recipe = write_recipe(models, tmp_path, target("svd", "rank: 4", "conv_rank: {ratio: 4, max: 3}"), save="float16")
    _, (first,) = build(recipe)
    digest = first.written.sha256
    report = first.report_path.read_bytes()
    first.written.path.unlink()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "123"}
    subprocess.run([sys.executable, "-m", "loraforge.cli", "build", "-q", str(recipe)], check=True, env=env, capture_output=True)
    assert file_hashes(first.written.path).sha256 == digest
    assert first.report_path.read_bytes() == report


# --- errors ---------------------------------------------------------------------------------


def _plan_error(models, tmp_path, targets) -> str:
    recipe = write_recipe(models, tmp_path, targets)
    with pytest.raises(LoraforgeError) as caught:
        plan_build(load_recipe(recipe))
    return str(caught.value)


def test_loras_of_different_architectures_are_refused(models, tmp_path):
    message = _plan_error(models, tmp_path, ["  bad:", "    kind: lora", "    rank: 4", "    loras: [{use: style}, {use: xl}]"])
    assert "different models" in message and "'xl' looks like Stable Diffusion XL" in message
    assert "recipe.yaml" in message


def test_dora_inputs_are_refused_with_a_way_out(models, tmp_path):
    message = _plan_error(models, tmp_path, ["  bad:", "    kind: lora", "    rank: 4", "    loras: [{use: dora}]"])
    assert "DoRA" in message and "kind: checkpoint" in message


@pytest.mark.parametrize(
    "body, expected",
    [
        (["    loras: [{use: style}]"], "method svd needs a rank"),
        (["    method: concat", "    rank: 4", "    loras: [{use: style}]"], "method concat keeps every rank"),
        (["    rank: {energy: 1.5}", "    loras: [{use: style}]"], "energy"),
        (["    rank: 4", "    loras: [{use: base}]"], "base"),
    ],
)
def test_recipe_errors(models, tmp_path, body, expected):
    message = _plan_error(models, tmp_path, ["  bad:", "    kind: lora", *body])
    assert expected in message


def test_a_lora_target_cannot_be_a_base(models, tmp_path):
    targets = ["  m:", "    kind: lora", "    rank: 2", "    loras: [{use: style}]",
               "  c:", "    kind: checkpoint", "    base: m", "    loras: [{use: style}]"]
    assert "produces a LoRA, not a checkpoint" in _plan_error(models, tmp_path, targets)


def test_example_recipe_builds_its_merge_to_bake_chain(tmp_path):
    """recipes/merge-chain.yaml, copied with its demo inputs so the repository stays clean."""
    import shutil

    recipes = Path(__file__).resolve().parent.parent / "recipes"
    shutil.copy(recipes / "merge-chain.yaml", tmp_path / "merge-chain.yaml")
    (tmp_path / "models").mkdir()
    for name in ("tiny-sd15-base", "neon-lora", "noir-locon", "grain-loha"):
        shutil.copy(recipes / "models" / f"{name}.safetensors", tmp_path / "models")
    plan, results = build(tmp_path / "merge-chain.yaml")
    merged, bundle, baked = results
    assert plan.target("neon-noir-grain").ingredients[0].path == merged.written.path
    assert max(o.rank for o in merged.outcomes) <= 8
    assert all(o.energy_retained >= 0.95 - 1e-9 or o.rank == (4 if o.module.is_conv else 8) for o in merged.outcomes)
    assert max(o.saved_relative_error for o in bundle.outcomes) < 1e-3  # concat: F16 rounding only
    assert baked.written.path.exists()
