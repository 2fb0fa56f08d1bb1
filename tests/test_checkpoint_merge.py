"""Checkpoint merges (`kind: checkpoint` with `merge:`) against independent references.

The references here share no code with loraforge's merge: files are read with
the `safetensors` package, each method is written out again in float64 numpy
from its paper's formula (docs/merging-checkpoints.md), block ids are derived
from the key with the test's own rule, DARE masks from numpy's PCG64 with the
documented seed, and the linear methods' correct rounding is checked against
exact rational arithmetic (Fractions) wherever float64 and the output differ.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from loraforge.cli import app
from loraforge.formats.arch.table import TEXT_ENCODERS
from loraforge.plan.checkpoint_merge import tensor_block
from loraforge.testing.arch import tiny_architecture
from loraforge.testing.checkpoints import write_synthetic_checkpoint

runner = CliRunner()
SEED = 7
MODELS = ("a", "b", "c")
# A block-weighted weight (SuperMerger "MBW" style mapping) and a 26-value vector.
MAPPING = {"default": 0.25, "IN04": 0.5, "OUT03-OUT05": 0.0}
VECTOR = [0.1 * (i % 5) for i in range(26)]


def mapping_value(block: str) -> float:
    if block == "IN04":
        return 0.5
    if block.startswith("OUT") and 3 <= int(block[3:]) <= 5:
        return 0.0
    return 0.25


FULL_SD = ("BASE",) + tuple(f"IN{i:02d}" for i in range(12)) + ("M00",) + tuple(f"OUT{i:02d}" for i in range(12))


def vector_value(block: str) -> float:
    return VECTOR[FULL_SD.index(block)]


def block_of(key: str, last_out: str = "OUT11") -> str:
    """The test's own block rule (docs/merging-checkpoints.md)."""
    if not key.startswith("model.diffusion_model."):
        return "BASE"
    for pattern, prefix in ((r"\.input_blocks\.(\d+)\.", "IN"), (r"\.output_blocks\.(\d+)\.", "OUT")):
        found = re.search(pattern, key)
        if found:
            return f"{prefix}{int(found.group(1)):02d}"
    if ".middle_block." in key:
        return "M00"
    if key.startswith("model.diffusion_model.out."):
        return last_out
    return "IN00"  # time_embed, label_emb: before the first input block


RECIPE = """\
loraforge: 1
name: merges
date: "2026-11-01"
seed: {seed}
inputs:
  a: {{source: models/a.safetensors}}
  b: {{source: models/b.safetensors}}
  c: {{source: models/c.safetensors}}
targets:
{targets}
"""

LINEAR_TARGETS = """\
  ws:
    kind: checkpoint
    merge:
      method: weighted_sum
      models: [a, b, c]
      weights: [0.5, 0.3, {default: 0.25, IN04: 0.5, OUT03-OUT05: 0}]
  ws-norm:
    kind: checkpoint
    merge:
      method: weighted_sum
      models: [a, b]
      weights: [0.7, %s]
      normalize: true
  addd:
    kind: checkpoint
    merge: {method: add_difference, models: [a, b, c], alpha: 0.7}
  ta:
    kind: checkpoint
    merge: {method: task_arithmetic, base: c, models: [a, b], weights: [0.6, -0.45], lambda: 1.3}
""" % str(VECTOR)

NONLINEAR_TARGETS = """\
  ties:
    kind: checkpoint
    merge: {method: ties, base: c, models: [a, b], density: 0.3, weights: [1, 0.5]}
  dare:
    kind: checkpoint
    merge: {method: dare, base: c, models: [a, b], density: {default: 0.5, OUT00-OUT11: 0.8}, weights: [0.7, 0.6]}
  dare-ties:
    kind: checkpoint
    merge: {method: dare_ties, base: c, models: [a, b], density: 0.4, lambda: 0.9}
  della:
    kind: checkpoint
    merge: {method: della, base: c, models: [a, b], density: 0.5, epsilon: 0.2, weights: [1, 0.8]}
  stock:
    kind: checkpoint
    merge: {method: model_stock, base: c, models: [a, b]}
  train-diff:
    kind: checkpoint
    merge: {method: train_difference, models: [a, b, c], alpha: {default: 0.5, BASE: 1}}
  slerp:
    kind: checkpoint
    merge: {method: slerp, models: [a, b], t: 0.3}
  slerp-base:
    kind: checkpoint
    merge: {method: slerp, base: c, models: [a, b], t: {default: 0.6, M00: 0.2}}
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("merge-models")
    sd1 = tiny_architecture("sd1")
    for seed, name in enumerate(MODELS, start=1):
        write_synthetic_checkpoint(folder / f"{name}.safetensors", sd1, seed=seed, dtype="F16")
    write_synthetic_checkpoint(folder / "xl.safetensors", tiny_architecture("sdxl"), seed=9, dtype="F16")
    return folder


def _project(folder: Path, models: Path, targets: str) -> Path:
    (folder / "models").symlink_to(models, target_is_directory=True)
    recipe = folder / "recipe.yaml"
    recipe.write_text(RECIPE.format(seed=SEED, targets=targets))
    return recipe


# Builds every method in a fresh process: with one CPU thread for the run (os.cpu_count() = 1: no worker
# pool) and the default chunks, or with two (a pool of two threads) and chunks of CHUNK elements, so
# large tensors are split over the threads. Both also differ in OMP/MKL threads, PYTHONHASHSEED and --jobs.
CHUNK = 4096
DRIVER = """
import os, sys
cpus, chunk = int(sys.argv[1]), int(sys.argv[2])
os.cpu_count = lambda: cpus  # Resources.local: the run's CPU threads
import loraforge.execute.checkpoint_merge as executor
import loraforge.ops.checkpoint_merge as ops
if chunk:
    ops.LINEAR_CHUNK = executor.MERGE_CHUNK = chunk
from loraforge.cli import app
sys.argv = ["loraforge", *sys.argv[3:]]
app()
"""
RUNS = {"serial": ("1", "1", 0, "1"), "threaded": ("2", "2", CHUNK, "3")}  # OMP threads, CPUs, chunk, --jobs


@pytest.fixture(scope="module")
def every_method(models, tmp_path_factory) -> dict[str, Path]:
    """run name -> its dist/ folder, LINEAR_TARGETS and NONLINEAR_TARGETS built in two processes side by side."""
    started = {}
    for name, (threads, cpus, chunk, jobs) in RUNS.items():
        folder = tmp_path_factory.mktemp(f"every-method-{name}")
        recipe = _project(folder, models, LINEAR_TARGETS + NONLINEAR_TARGETS)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_"))}
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, PYTHONHASHSEED=threads)
        command = [sys.executable, "-c", DRIVER, cpus, str(chunk), "build", "-q", "--jobs", jobs, str(recipe)]
        started[name] = (folder, subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for name, (folder, process) in started.items():
        output, _ = process.communicate()
        assert process.returncode == 0, (name, output)
    return {name: folder / "dist" for name, (folder, _) in started.items()}


def _build(recipe: Path, *extra: str) -> None:
    result = runner.invoke(app, ["build", "-q", str(recipe), *extra])
    assert result.exit_code == 0, result.output


def _read(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    with safe_open(str(path), framework="np") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()


def _inputs(models: Path) -> dict[str, dict[str, np.ndarray]]:
    return {name: _read(models / f"{name}.safetensors")[0] for name in MODELS}


MERGED_PREFIXES = ("model.diffusion_model.", "cond_stage_model.", "conditioner.")


def _merged_keys(tensors: dict[str, np.ndarray]) -> list[str]:
    """Float tensors of the UNet and text encoders (the VAE and the rest come from the primary model)."""
    return [k for k, v in tensors.items() if v.dtype.kind == "f" and k.startswith(MERGED_PREFIXES)]


# --- linear methods: correctly rounded ------------------------------------------------------


def _check_correctly_rounded(out: np.ndarray, approx: np.ndarray, exact) -> int:
    """out == RN(exact) everywhere: equal to the float64 value rounded once, or (where they differ) the
    neighbour nearest the exact rational value, ties to even. Returns how many needed the exact check."""
    bits = np.uint16 if out.dtype == np.float16 else np.uint32
    expected = approx.astype(out.dtype)
    differ = np.flatnonzero(out.reshape(-1).view(bits) != expected.reshape(-1).view(bits))
    for index in differ:
        value = exact(int(index))
        got = out.reshape(-1)[index]
        candidates = [expected.reshape(-1)[index]]
        candidates += [np.nextafter(candidates[0], out.dtype.type(np.inf)), np.nextafter(candidates[0], out.dtype.type(-np.inf))]
        best = min(candidates, key=lambda c: (abs(Fraction(float(c)) - value), int(np.array(c).view(bits)) & 1))
        assert got == best or (value == 0 and got == 0), (index, got, best, value)
    return len(differ)


def test_linear_methods_are_correctly_rounded_exact_references(every_method, models):
    """On the build in chunks on two threads (every_method["threaded"]; the serial build has the same bytes)."""
    inputs = _inputs(models)
    a, b, c = (inputs[n] for n in MODELS)
    outputs = {name: _read(every_method["threaded"] / f"{name}.safetensors")[0] for name in ("ws", "ws-norm", "addd", "ta")}
    checked = 0
    for key in _merged_keys(a):
        block = block_of(key)
        x = {n: inputs[n][key].astype(np.float64) for n in MODELS}
        cases = {
            "ws": ([(0.5, "a"), (0.3, "b"), (mapping_value(block), "c")], None),
            "ws-norm": ([(0.7, "a"), (vector_value(block), "b")], (0.7, vector_value(block))),
            "addd": ([(1.0, "a"), (0.7, "b"), (-0.7, "c")], None),
            "ta": ([(1.0, "c"), (1.3 * 0.6, "a"), (-(1.3 * 0.6), "c"), (1.3 * -0.45, "b"), (-(1.3 * -0.45), "c")], None),
        }
        for name, (terms, divisor) in cases.items():
            approx = sum(w * x[n] for w, n in terms)
            exact_terms = terms
            if name == "ta":  # the exact coefficient is the product lambda x w, not its float64 rounding
                exact_terms = [(Fraction(1), "c"), (Fraction(1.3) * Fraction(0.6), "a"), (-Fraction(1.3) * Fraction(0.6), "c"),
                               (Fraction(1.3) * Fraction(-0.45), "b"), (-Fraction(1.3) * Fraction(-0.45), "c")]
            if divisor is not None:
                approx = approx / sum(divisor)

            def exact(index, exact_terms=exact_terms, divisor=divisor):
                value = sum(Fraction(w) * Fraction(float(x[n].reshape(-1)[index])) for w, n in exact_terms)
                return value / sum(Fraction(d) for d in divisor) if divisor is not None else value

            try:
                checked += _check_correctly_rounded(outputs[name][key], approx, exact)
            except AssertionError as error:
                raise AssertionError((name, key, block)) from error
    # the VAE comes from the first model, byte for byte
    vae = [k for k in a if not k.startswith(MERGED_PREFIXES)]  # VAE, schedule tensors, position ids
    assert vae and all(np.array_equal(outputs["ws"][k], a[k]) for k in vae)
    assert all(np.array_equal(outputs["ta"][k], c[k]) for k in vae)  # task arithmetic: the base is first


# --- non-linear methods: float64 references ----------------------------------------------------


def mask_seed(seed: int, tensor: str, model: int) -> int:
    digest = hashlib.sha256(f"loraforge-merge-mask\x00{seed}\x00{tensor}\x00{model}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def ref_mask(shape, density: float, seed: int) -> np.ndarray:
    return (np.random.Generator(np.random.PCG64(seed)).random(int(np.prod(shape))) < density).reshape(shape)


def ref_trim(delta: np.ndarray, density: float) -> np.ndarray:
    flat = delta.reshape(-1)
    keep = math.floor(Fraction(density) * flat.size)
    order = np.argsort(-np.abs(flat), kind="stable")[:keep]
    out = np.zeros_like(flat)
    out[order] = flat[order]
    return out.reshape(delta.shape)


def ref_ties(base, deltas, weights, scale, normalize):
    weighted = [w * d for d, w in zip(deltas, weights)]
    mass = np.zeros_like(base)
    for term in weighted:
        mass = mass + term
    elected = np.where(mass >= 0, 1.0, -1.0)
    mixed, divisor = np.zeros_like(base), np.zeros_like(base)
    for term, w in zip(weighted, weights):
        agree = np.sign(term) == elected
        mixed = mixed + np.where(agree, term, 0.0)
        divisor = divisor + np.where(agree, w, 0.0)
    if normalize:
        mixed = mixed / np.where(divisor == 0, 1.0, divisor)
    return base + scale * mixed


def ref_slerp(a, b, t):
    na, nb = math.sqrt(np.sum(a * a)), math.sqrt(np.sum(b * b))
    if na == 0 or nb == 0:
        return (1 - t) * a + t * b
    cos = float(np.sum((a / na) * (b / nb)))
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    theta = math.acos(cos)
    return (math.sin((1 - t) * theta) / math.sin(theta)) * a + (math.sin(t * theta) / math.sin(theta)) * b


def ref_magprune(delta: np.ndarray, density: float, epsilon: float, seed: int) -> np.ndarray:
    rows = delta.reshape(delta.shape[0], -1) if delta.ndim > 1 else delta.reshape(1, -1)
    n = rows.shape[1]
    ranks = np.argsort(np.argsort(np.abs(rows), axis=1, kind="stable"), axis=1, kind="stable")
    keep = (density - epsilon) + (2 * epsilon) * (ranks.astype(np.float64) / (n - 1)) if n > 1 else np.full(rows.shape, density)
    uniforms = np.random.Generator(np.random.PCG64(seed)).random(rows.size).reshape(rows.shape)
    return np.where(uniforms < keep, rows / keep, 0.0).reshape(delta.shape)


def ref_model_stock(base, models):
    deltas = [(m - base).reshape(-1) for m in models]
    norms = [math.sqrt(np.sum(d * d)) for d in deltas]
    cosines = [min(1.0, max(-1.0, float(np.sum(deltas[i] * deltas[j])) / max(norms[i] * norms[j], 1e-6)))
               for i in range(len(deltas)) for j in range(i + 1, len(deltas))]
    n = len(models)
    cos = sum(cosines) / len(cosines)
    t = n * cos / (1 + (n - 1) * cos) if 1 + (n - 1) * cos != 0 else 0.0
    mean = np.zeros_like(base)
    for m in models:
        mean = mean + m
    return t * (mean / n) + (1 - t) * base


def ref_train_difference(a, b, c, alpha):
    d_bc, d_ba = np.abs(b - c), np.abs(b - a)
    total = d_bc + d_ba
    scale = np.where(total != 0, d_ba / np.where(total != 0, total, 1.0), 0.0)
    return a + alpha * ((np.sign(b - c) * scale) * d_bc * 1.8)


def test_nonlinear_methods_equal_float64_references_and_masks(every_method, models):
    """On the build in CHUNK-element chunks on two threads: elementwise methods split large tensors (masks from
    generators advanced to each chunk) and must still equal the whole-tensor references."""
    inputs = _inputs(models)
    names = ("ties", "dare", "dare-ties", "della", "stock", "train-diff", "slerp", "slerp-base")
    outputs = {name: _read(every_method["threaded"] / f"{name}.safetensors")[0] for name in names}
    assert max(v.size for v in inputs["a"].values()) > 4 * CHUNK  # some tensors are split
    for key in _merged_keys(inputs["a"]):
        block = block_of(key)
        a, b, c = (inputs[n][key].astype(np.float64) for n in MODELS)
        identical = all(np.array_equal(inputs[n][key], inputs["c"][key]) for n in MODELS)
        masks = [ref_mask(a.shape, d, mask_seed(SEED, key, i)) for i, d in enumerate((0.8 if block.startswith("OUT") else 0.5,) * 2)]
        density = 0.8 if block.startswith("OUT") else 0.5
        dare = c + 1.0 * ((0 + 0.7 * np.where(masks[0], (a - c) / density, 0.0)) + 0.6 * np.where(masks[1], (b - c) / density, 0.0))
        tie_masks = [ref_mask(a.shape, 0.4, mask_seed(SEED, key, i)) for i in range(2)]
        expected = {
            "ties": ref_ties(c, [ref_trim(a - c, 0.3), ref_trim(b - c, 0.3)], [1.0, 0.5], 1.0, True),
            "dare": dare,
            "dare-ties": ref_ties(c, [np.where(m, d / 0.4, 0.0) for m, d in zip(tie_masks, (a - c, b - c))], [1.0, 1.0], 0.9, False),
            "della": ref_ties(c, [ref_magprune(d, 0.5, 0.2, mask_seed(SEED, key, i)) for i, d in enumerate((a - c, b - c))],
                              [1.0, 0.8], 1.0, True),
            "stock": ref_model_stock(c, [a, b]),
            "train-diff": ref_train_difference(a, b, c, 1.0 if block == "BASE" else 0.5),
            "slerp": ref_slerp(a, b, 0.3),
            "slerp-base": c + ref_slerp(a - c, b - c, 0.2 if block == "M00" else 0.6),
        }
        for name, value in expected.items():
            got = outputs[name][key]
            if identical and name not in ("slerp", "train-diff"):
                assert np.array_equal(got, inputs["c"][key]), (name, key)  # equal inputs: copied
                continue
            want = value.astype(np.float16)
            assert np.array_equal(got.view(np.uint16), want.view(np.uint16)), (name, key)


def test_dare_masks_keep_the_density_and_differ_per_model_and_tensor():
    shape = (64, 64)
    first, second = ref_mask(shape, 0.3, mask_seed(0, "x", 0)), ref_mask(shape, 0.3, mask_seed(0, "x", 1))
    assert abs(first.mean() - 0.3) < 0.03 and not np.array_equal(first, second)
    assert not np.array_equal(first, ref_mask(shape, 0.3, mask_seed(0, "y", 0)))
    assert not np.array_equal(first, ref_mask(shape, 0.3, mask_seed(1, "x", 0)))


# --- merge + LoRAs, provenance, plan ---------------------------------------------------------


def test_loras_baked_on_a_merge_equal_the_two_target_chain_and_provenance(tmp_path, models):
    from loraforge.testing.adapters import write_synthetic_adapter

    write_synthetic_adapter(tmp_path / "style.safetensors", tiny_architecture("sd1"), "lora", rank=4, seed=5)
    targets = """\
  direct:
    kind: checkpoint
    merge: {method: ties, base: c, models: [a, b], density: 0.5}
    loras: [{use: style, strength: 0.8}]
  merged:
    kind: checkpoint
    merge: {method: ties, base: c, models: [a, b], density: 0.5}
  chained:
    kind: checkpoint
    base: merged
    loras: [{use: style, strength: 0.8}]
"""
    recipe = _project(tmp_path, models, targets)
    recipe.write_text(recipe.read_text().replace("inputs:\n", "inputs:\n  style: {source: style.safetensors}\n"))
    _build(recipe)
    direct, metadata = _read(tmp_path / "dist/direct.safetensors")
    chained, _ = _read(tmp_path / "dist/chained.safetensors")
    assert direct.keys() == chained.keys()
    assert all(np.array_equal(direct[k], chained[k]) for k in direct)
    assert metadata["modelspec.merged_from"] == "a, b, c, style"
    assert "ties" in metadata["loraforge.merge"] and '"density":0.5' in metadata["loraforge.merge"]
    hashes = metadata["loraforge.inputs"]
    for name in MODELS:
        assert hashlib.sha256((models / f"{name}.safetensors").read_bytes()).hexdigest() in hashes

    result = runner.invoke(app, ["plan", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "merge: ties of a, b against base c" in result.output and "density: 0.5" in result.output


def test_plan_shows_each_parameter_per_block(tmp_path, models):
    recipe = _project(tmp_path, models, LINEAR_TARGETS)
    result = runner.invoke(app, ["plan", "--json", str(recipe)])
    assert result.exit_code == 0, result.output
    import json

    report = next(t for t in json.loads(result.output)["targets"] if t["name"] == "ws")["merge"]
    assert report["method"] == "weighted_sum" and report["models"] == ["a", "b", "c"]
    per_block = report["parameters"]["weights"][2]
    assert per_block["IN04"] == 0.5 and per_block["OUT04"] == 0.0 and per_block["M00"] == 0.25


def test_tensor_blocks_agree_with_the_lora_block_table():
    for family, last_out in (("sd1", "OUT11"), ("sdxl", "OUT08")):
        arch = tiny_architecture(family)
        for module in arch.modules:
            component = arch.tensor_by_key[module.key].component
            assert tensor_block(module.key, component, arch) == module.block, module.key
            if component not in TEXT_ENCODERS:
                assert block_of(module.key, last_out) == module.block, module.key


# --- reproducibility -------------------------------------------------------------------------


def test_same_bytes_for_1_and_2_threads_and_jobs(every_method):
    """Every method: one thread, default chunks, --jobs 1 vs two threads, small chunks, --jobs 3 (and different
    OMP/MKL threads and PYTHONHASHSEED), in separate processes."""
    hashes = [{p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(dist.iterdir())}
              for dist in every_method.values()]
    assert len(hashes[0]) == 12 and hashes[0] == hashes[1]


# --- errors ------------------------------------------------------------------------------------

ERRORS = {
    "unknown method": ("method: ties", "method: tie", ["recipe.yaml:13", "unknown checkpoint merge method 'tie'", "weighted_sum"]),
    "missing parameter": (", density: 0.3", "", ["recipe.yaml:13", "needs 'density'"]),
    "density zero": ("density: 0.3", "density: 0", ["recipe.yaml:13", "density must lie in (0, 1]"]),
    "density above one": ("density: 0.3", "density: 1.5", ["recipe.yaml:13:52", "merge.density", "density must lie in (0, 1]"]),
    "density block out of range": ("density: 0.3", "density: {default: 0.5, IN04: 2}", ["density must lie in (0, 1]", "IN04"]),
    "unknown parameter": ("density: 0.3", "density: 0.3, alpha: 1", ["recipe.yaml:13", "no parameter 'alpha'"]),
    "wrong weight count": ("weights: [1, 0.5]", "weights: [1]", ["recipe.yaml:13", "1 values for 2 models"]),
    "no base": ("base: c, ", "", ["recipe.yaml:13", "needs a base"]),
    "base and merge": ("    merge:", "    base: a\n    merge:", ["both base and merge"]),
    "different families": ("models: [a, b]", "models: [a, xl]", ["recipe.yaml:13", "model 'xl' is Stable Diffusion XL", "Stable Diffusion 1.x"]),
    "short block form": ("density: 0.3", "density: OUTD", ["name no value for block", "IN00"]),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_every_bad_merge_is_one_positioned_error(tmp_path, models, case):
    old, new, expected = ERRORS[case]
    targets = "  ties:\n    kind: checkpoint\n    merge: {method: ties, base: c, models: [a, b], density: 0.3, weights: [1, 0.5]}\n"
    recipe = _project(tmp_path, models, targets)
    text = recipe.read_text().replace("  c: {source: models/c.safetensors}\n", "  c: {source: models/c.safetensors}\n  xl: {source: models/xl.safetensors}\n")
    assert old in text
    recipe.write_text(text.replace(old, new, 1))
    result = runner.invoke(app, ["build", "-q", str(recipe)])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert message.startswith("error:") and "Traceback" not in message
    for fragment in expected:
        assert fragment in message, (fragment, message)
    assert not (tmp_path / "dist").exists()


def test_components_and_the_release_card(tmp_path, models):
    targets = """\
  blend:
    kind: checkpoint
    merge:
      method: weighted_sum
      models: [a, b]
      weights: [0.5, {default: 0.5, OUT00-OUT11: 0.25}]
      components: {te: b, vae: merge}
  bundle:
    kind: release
"""
    recipe = _project(tmp_path, models, targets)
    _build(recipe)
    out, _ = _read(tmp_path / "dist/blend.safetensors")
    a, b = _inputs(models)["a"], _inputs(models)["b"]
    te = [k for k in out if k.startswith("cond_stage_model.") and out[k].dtype.kind == "f"]
    assert te and all(np.array_equal(out[k], b[k]) for k in te)  # text encoder taken from b
    vae = [k for k in out if k.startswith("first_stage_model.") and out[k].ndim > 1]
    assert vae and not np.array_equal(out[vae[0]], a[vae[0]])  # VAE merged (block BASE)
    assert np.array_equal(out[vae[0]], (0.5 * a[vae[0]].astype(np.float64) + 0.5 * b[vae[0]].astype(np.float64)).astype(np.float16))
    card = (tmp_path / "dist/bundle/README.md").read_text()
    assert "Merged with `weighted_sum`" in card and "`a`, `b`" in card
    assert '"OUT00-OUT11": 0.25' in card
    assert "| `blend` | merged | `a` |" in card


def test_lock_records_the_environment_of_non_linear_merges_and_verify_passes(tmp_path, models):
    import json

    from loraforge.plan.action_key import BAKE_NUMERIC_POLICY

    targets = LINEAR_TARGETS.split("  ws-norm:")[0] + NONLINEAR_TARGETS.split("  dare:")[0]
    recipe = _project(tmp_path, models, targets)
    _build(recipe)
    lock = json.loads((tmp_path / "recipe.lock").read_text())
    assert lock["numeric_policy"]["bake"] == BAKE_NUMERIC_POLICY  # the recorded policy is the bake's, unchanged
    assert "numeric_environment" in lock["targets"]["ties"] and lock["targets"]["ties"]["device_class"] == "cpu"
    assert "numeric_environment" not in lock["targets"]["ws"]  # correctly rounded: no environment
    result = runner.invoke(app, ["verify", str(recipe)])
    assert result.exit_code == 0, result.output
    rebuilt = runner.invoke(app, ["build", str(recipe)])
    assert rebuilt.exit_code == 0 and "up to date" in rebuilt.output.lower(), rebuilt.output


def test_sdxl_block_weighted_merges_against_references(tmp_path):
    """SDXL (20-value block vectors, two text encoders, label_emb) in float32: a linear and a seeded method."""
    sdxl = tiny_architecture("sdxl")
    folder = tmp_path / "models"
    folder.mkdir()
    for seed, name in enumerate(MODELS, start=11):
        write_synthetic_checkpoint(folder / f"{name}.safetensors", sdxl, seed=seed, dtype="F32")
    full = sdxl.full_block_form
    vector = [0.05 * i for i in range(len(full))]
    targets = f"""\
  ws:
    kind: checkpoint
    merge: {{method: weighted_sum, models: [a, b, c], weights: [0.4, {vector}, 0.25]}}
  dare:
    kind: checkpoint
    merge: {{method: dare, base: c, models: [a, b], density: {{default: 0.3, IN04-IN08: 0.9}}}}
"""
    project = tmp_path / "project"
    project.mkdir()
    recipe = _project(project, folder, targets)
    _build(recipe)
    inputs = {name: _read(folder / f"{name}.safetensors")[0] for name in MODELS}
    ws, _ = _read(project / "dist/ws.safetensors")
    dare, _ = _read(project / "dist/dare.safetensors")
    keys = _merged_keys(inputs["a"])
    assert any(k.startswith("conditioner.embedders.1.") for k in keys) and any("label_emb" in k for k in keys)
    for key in keys:
        block = block_of(key, "OUT08")
        weight_b = vector[full.index(block)]
        x = {n: inputs[n][key].astype(np.float64) for n in MODELS}
        terms = [(0.4, "a"), (weight_b, "b"), (0.25, "c")]
        approx = sum(w * x[n] for w, n in terms)
        _check_correctly_rounded(ws[key], approx, lambda i: sum(Fraction(w) * Fraction(float(x[n].reshape(-1)[i])) for w, n in terms))
        if all(np.array_equal(inputs[n][key], inputs["c"][key]) for n in MODELS):
            assert np.array_equal(dare[key], inputs["c"][key])
            continue
        density = 0.9 if block in ("IN04", "IN05", "IN06", "IN07", "IN08") else 0.3
        masks = [ref_mask(x["a"].shape, density, mask_seed(SEED, key, i)) for i in range(2)]
        total = 0 + 1.0 * np.where(masks[0], (x["a"] - x["c"]) / density, 0.0)
        total = total + 1.0 * np.where(masks[1], (x["b"] - x["c"]) / density, 0.0)
        want = (x["c"] + 1.0 * total).astype(np.float32)
        assert np.array_equal(dare[key].view(np.uint32), want.view(np.uint32)), key


def _nearest(value: Fraction, dtype) -> np.ndarray:
    """RN(value) in a numpy float dtype, ties to even, by comparing the neighbours of its float64 image."""
    bits = np.uint16 if dtype == np.float16 else np.uint32
    first = np.array(float(value)).astype(dtype)
    candidates = [first, np.nextafter(first, dtype(np.inf)), np.nextafter(first, dtype(-np.inf))]
    return min(candidates, key=lambda c: (abs(Fraction(float(c)) - value), int(np.array(c).view(bits)) & 1))


@pytest.mark.parametrize("out_dtype", [np.float16, np.float32])
@pytest.mark.parametrize("case", ["decimal", "normalize", "task_arithmetic", "float64_inputs", "dyadic", "dyadic_normalize", "cancel"])
def test_linear_combination_is_correctly_rounded_next_to_midpoints(monkeypatch, case, out_dtype):
    """Short (quantized) inputs and decimal weights put many exact values within 1e-17 of a midpoint."""
    import torch

    import loraforge.ops.checkpoint_merge as ops

    monkeypatch.setattr(ops, "LINEAR_CHUNK", 500)  # several chunks
    rng = np.random.default_rng(3)
    source_dtype = torch.float64 if case == "float64_inputs" else torch.float16
    sources = [torch.from_numpy(rng.integers(-64, 64, 1700) * 2.0**-9).to(source_dtype) for _ in range(3)]
    divisor = None
    if case == "cancel":  # equal elements cancel exactly; subnormal halves sit exactly on float16 midpoints
        sources[1][::2] = sources[0][::2]
        sources[2] = (sources[2].double() * 2.0**-12).to(source_dtype)
    if case == "dyadic":  # exact in float64 and often exactly on a midpoint: ties to even
        terms = [((0.5,), 0), ((0.25,), 1), ((0.25,), 2)]
    elif case == "dyadic_normalize":
        terms, divisor = [((0.75,), 0), ((0.5,), 1), ((0.75,), 2)], (0.75, 0.5, 0.75)
    elif case == "cancel":
        terms = [((0.3,), 0), ((-0.3,), 1), ((0.5,), 2)]
    elif case == "normalize":
        terms, divisor = [((0.3,), 0), ((0.7,), 1), ((-0.2,), 2)], (0.3, 0.7, -0.2)
    elif case == "task_arithmetic":
        terms = [((1.0,), 2), ((1.3, 0.3), 0), ((-1.3, 0.3), 2), ((1.3, 0.2), 1), ((-1.3, 0.2), 2)]
    else:
        terms = [((0.5,), 0), ((0.3,), 1), ((0.2,), 2)]
    out = ops.linear_combination(sources, terms, divisor, torch.float16 if out_dtype == np.float16 else torch.float32).numpy()
    values = [s.double().numpy() for s in sources]
    total = sum((Fraction(d) for d in divisor), Fraction(0)) if divisor else Fraction(1)
    for i in range(out.size):
        exact = sum(math.prod((Fraction(f) for f in factors), start=Fraction(1)) * Fraction(float(values[s][i])) for factors, s in terms)
        want = _nearest(exact / total, out_dtype)
        sign = exact < 0 if exact != 0 else False  # an exact zero is +0; a tiny value keeps its sign (IEEE)
        assert out[i] == want and (want != 0 or bool(np.signbit(out[i])) == sign), (i, out[i], want, exact / total)
