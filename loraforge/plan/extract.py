"""Planning a `kind: extract` target: which modules of which two checkpoints.

Both checkpoints' headers are read and their architectures detected; they
must be the same architecture at the same size, and every tensor they share
must have the same shape. All of that is checked here, before a single
tensor is read, so a mismatch is one clear error and never a half-done build.
The candidate modules come from the architecture table (3x3 convs only with a
conv rank, text-encoder modules unless ``text_encoder: false``); which of
them actually differ is known only when the weights are read, at build time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar
from pathlib import Path

from loraforge.errors import FormatError
from loraforge.formats.arch import Detection, detect_architecture
from loraforge.formats.arch import loaders
from loraforge.formats.arch.table import ModuleSpec
from loraforge.formats.dtypes import itemsize, precision_code
from loraforge.formats.adapters import AdapterFile
from loraforge.formats.lora_output import estimated_lora_bytes, lora_save_dtype, planned_lora_adapter, written_skips
from loraforge.formats.safetensors_reader import open_safetensors
from loraforge.plan.action_key import action_key
from loraforge.plan.device_class import device_class
from loraforge.plan.context import PlanContext
from loraforge.plan.target import PRODUCT_WORDS, PlannedTarget, Produces
from loraforge.recipe.schema import RankSpec

MAX_LISTED = 8  # mismatching tensors named in an error before "and N more"
# Bump when the numeric recipe of extraction changes in a way that changes bytes.
EXTRACT_NUMERIC_POLICY = (
    "extract-v1: dW = tuned - base in the compute dtype; float64 SVD (randomized: Halko 4.4, "
    "seeded per module); symmetric split, canonical signs, alpha = rank; one rounding to the save dtype"
)
REPORT_SUFFIX = ".extract.json"
EXTRACT_MEMORY_FLOOR = 256 << 20  # torch, the reader, the output's factors


@dataclass(frozen=True)
class CheckpointSource:
    """One of the two checkpoints: where it will be read from and what it is."""

    name: str  # input or target name
    path: Path  # the file read at build time (a target's output for chains)
    structure_path: Path  # a file with the same names and shapes, readable now
    detection: Detection
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]  # the dtype each tensor will have in ``path``
    size: int  # bytes of ``path`` (estimated for a target that is not built yet)


@dataclass(frozen=True, kw_only=True)
class ExtractionTarget(PlannedTarget):
    """A planned `kind: extract` target (its ``report_path`` is the per-module JSON report)."""

    kind: ClassVar[str] = "extract"
    produces: ClassVar[Produces] = "lora"

    tuned: CheckpointSource
    base: CheckpointSource
    modules: tuple[ModuleSpec, ...]  # candidates, in base file order (then row order)
    missing_text_encoder: tuple[str, ...]  # TE modules left out because a checkpoint lacks them
    rank: RankSpec
    conv_rank: RankSpec | None
    text_encoder: bool | str  # True | False | "auto"
    svd: str  # "randomized" | "exact"
    clamp_quantile: float | None
    min_diff: float
    compute: str  # "float32" | "float64"
    save: str  # "same" or a dtype code ("F16", "BF16", "F32")
    seed: int
    module_set: str = "all"  # "all" | "kohya": only the modules every common loader applies
    left_out_for_loaders: tuple[str, ...] = ()  # candidates ``modules: kohya`` left out (kohya names)
    format: str = "kohya"  # "kohya" | "diffusers": the names the output is written by (formats/lora_output.py)

    def loader_skips(self) -> dict[str, list[str]] | None:
        """{loader: candidate modules it is known to skip}; None where the family's loaders are not known."""
        family = self.architecture.name
        return loaders.loader_skips(family, written_skips(self.architecture, ((m.kohya, m) for m in self.modules), self.format))

    def module_rank(self, module: ModuleSpec) -> RankSpec:
        return self.conv_rank if is_conv3x3(module) else self.rank

    @property
    def lora_dtype(self) -> str:
        """The output's dtype: the recipe's save dtype; for ``same``, the base weights' (F32 if they are mixed)."""
        return lora_save_dtype(self.save, sorted({self.base.dtypes[m.key] for m in self.modules}))

    @property
    def device_class(self) -> str:
        """The device class the output's bytes depend on (an SVD's rounding)."""
        return device_class(self.device)

    def lora_adapter(self) -> AdapterFile:
        """The output as a bake that uses it will see it, before it is built: every candidate module at its
        rank bound. The modules that really differ are known after the build, which plans its users again."""
        return planned_lora_adapter(
            self.output, [(m.kohya, m.shape, self.module_bound(m)) for m in self.modules], format=self.format, arch=self.architecture
        )

    def module_bound(self, module: ModuleSpec) -> int:
        """The most ranks the module's factors can have."""
        spec = self.module_rank(module)
        out, flat_in = module.shape[0], math.prod(module.shape[1:])
        bounds = [b for b in (spec.rank, spec.max) if b is not None]
        return min([out, flat_in, *bounds])

    def module_bytes(self, module: ModuleSpec) -> int:
        """Upper bound of the module's output bytes (up, down and alpha)."""
        out, flat_in = module.shape[0], math.prod(module.shape[1:])
        if self.format != "kohya":  # the diffusers parts: each its rows of up and the whole down, no alpha
            return estimated_lora_bytes([(module.kohya, module.shape, self.module_bound(module))], self.lora_dtype,
                                        format=self.format, arch=self.architecture)
        return (self.module_bound(module) * (out + flat_in) + 1) * itemsize(self.lora_dtype)

    def modules_per_block(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for module in self.modules:
            counts[module.block] = counts.get(module.block, 0) + 1
        return {block: counts[block] for block in self.architecture.full_block_form if block in counts}


def is_conv3x3(module: ModuleSpec) -> bool:
    """A conv with a spatial kernel (LoCon's conv_dim); 1x1 convs count as linear, as in kohya."""
    return module.is_conv and tuple(module.shape[2:]) != (1, 1)


def report_path_for(output: Path) -> Path:
    """dist/x.safetensors -> dist/x.extract.json."""
    return output.with_name(output.name[: -len(".safetensors")] + REPORT_SUFFIX)


def plan_extract(context: PlanContext, name: str) -> ExtractionTarget:
    loaded = context.loaded
    recipe = loaded.recipe
    spec = recipe.targets[name]
    tuned = _checkpoint_source(context, name, "tuned")
    base = _checkpoint_source(context, name, "base")
    _check_same_model(loaded, name, tuned, base)
    modules, missing_te = _candidate_modules(loaded, name, tuned, base)
    modules, left_out = _loader_modules(loaded, name, base.detection.architecture, modules)
    precision = recipe.effective_precision(name)
    output = context.output_path(name)
    device = context.device_of(name)
    target = ExtractionTarget(
        name=name,
        tuned=tuned,
        base=base,
        architecture=base.detection.architecture,
        output=output,
        report_path=report_path_for(output),
        modules=modules,
        missing_text_encoder=missing_te,
        rank=spec.rank,
        conv_rank=spec.conv_rank,
        text_encoder=spec.text_encoder,
        svd=spec.svd,
        clamp_quantile=spec.clamp_quantile,
        min_diff=spec.min_diff,
        compute=precision.compute,
        save="same" if precision.save == "same" else precision_code(precision.save),
        seed=recipe.seed,
        module_set=spec.modules or "all",
        format=spec.format or "kohya",
        left_out_for_loaders=left_out,
        device=device,
        dependencies=tuple(d for d in spec.dependencies() if d in recipe.targets),
        action_key=action_key(
            loaded, name, "extract", context.input_hashes(name), EXTRACT_NUMERIC_POLICY,
            {"device_class": device_class(device)},  # SVD bytes differ across device classes
        ),
        read_bytes=tuned.size + base.size,
        write_bytes=0,
        memory_bytes=0,
    )
    # The byte bound needs the target's own helpers, so it is filled in second.
    return _with_write_bytes(target)


def _with_write_bytes(target: ExtractionTarget) -> ExtractionTarget:
    largest = max((math.prod(m.shape) for m in target.modules), default=0)
    # both weights, ΔW and the SVD's work arrays in float64, plus a floor for torch and the writer
    memory = EXTRACT_MEMORY_FLOOR + 8 * largest * 6
    return replace(target, write_bytes=sum(target.module_bytes(m) for m in target.modules), memory_bytes=memory)


# --- the two checkpoints ---------------------------------------------------------


def _checkpoint_source(context: PlanContext, target: str, field: str) -> CheckpointSource:
    loaded = context.loaded
    ref = getattr(loaded.recipe.targets[target], field)
    if ref in context.built:
        path = context.built[ref].path
    elif ref in context.planned:
        return _target_source(loaded, target, field, ref, context.planned[ref])
    else:
        path = context.inputs[ref].path
    shapes, dtypes, detection = _read_structure(loaded, target, field, ref, path)
    return CheckpointSource(ref, path, path, detection, shapes, dtypes, path.stat().st_size)


def _target_source(loaded, target, field, ref, producer) -> CheckpointSource:
    """A checkpoint that another target of the recipe builds (a bake's output)."""
    if producer.produces != "checkpoint":
        raise loaded.error(
            ("targets", target, field),
            f"target '{ref}' produces a {PRODUCT_WORDS[producer.produces]}, not a checkpoint, so it cannot be the {field} model of an extraction.",
            "Name a checkpoint input, or a target that produces a checkpoint.",
        )
    structure, _, save = producer.checkpoint_structure()
    shapes, dtypes, detection = _read_structure(loaded, target, field, ref, structure)
    if save != "same":  # the producer writes its float tensors in its save dtype
        dtypes = {key: save if code in ("F16", "BF16", "F32", "F64") else code for key, code in dtypes.items()}
    return CheckpointSource(ref, producer.output, structure, detection, shapes, dtypes, producer.write_bytes)


def _read_structure(loaded, target, field, ref, path):
    try:
        with open_safetensors(path) as handle:
            infos = {n: handle.info(n) for n in handle.names()}
        shapes = {n: tuple(i.shape) for n, i in infos.items()}
        detection = detect_architecture(shapes)
    except FormatError as error:
        raise loaded.error(
            ("targets", target, field), f"{field} model '{ref}' is not a usable checkpoint: {error}"
        ) from None
    return shapes, {n: i.dtype for n, i in infos.items()}, detection


def _check_same_model(loaded, target: str, tuned: CheckpointSource, base: CheckpointSource) -> None:
    a, b = tuned.detection.architecture, base.detection.architecture
    if (a.name, a.dimensions) != (b.name, b.dimensions):
        raise loaded.error(
            ("targets", target, "tuned"),
            f"the tuned model '{tuned.name}' is {a.title} ({a.size_text}) but the base model '{base.name}' is "
            f"{b.title} ({b.size_text}); a LoRA can only be extracted from two checkpoints of the same architecture.",
            "Use the base checkpoint the tuned model was fine-tuned from.",
        )
    mismatched = [
        f"{key} is {list(tuned.shapes[key])} in '{tuned.name}' but {list(shape)} in '{base.name}'"
        for key, shape in base.shapes.items()
        if key in tuned.shapes and tuple(tuned.shapes[key]) != tuple(shape)
    ]
    if mismatched:
        shown = "; ".join(mismatched[:MAX_LISTED])
        more = f" and {len(mismatched) - MAX_LISTED} more" if len(mismatched) > MAX_LISTED else ""
        raise loaded.error(
            ("targets", target, "tuned"),
            f"the tuned and base checkpoints are both {a.title} but {len(mismatched)} tensor(s) differ in shape: "
            f"{shown}{more} (an inpainting model against a plain base, say).",
            "Extract against the base of the same variant (inpainting with inpainting).",
        )


def _loader_modules(loaded, target: str, arch, modules: tuple[ModuleSpec, ...]):
    """``modules: kohya``: the candidates every common loader applies, and the kohya names of the others."""
    if (loaded.recipe.targets[target].modules or "all") == "all":
        return modules, ()
    check_module_set(loaded, target, arch)
    kept = tuple(m for m in modules if loaders.kohya_applies(m))
    return kept, tuple(m.kohya for m in modules if not loaders.kohya_applies(m))


def check_module_set(loaded, target: str, arch) -> None:
    """``modules: kohya`` needs a family whose loaders' module lists are known (formats/arch/loaders.py)."""
    if not loaders.known(arch.name):
        raise loaded.error(
            ("targets", target, "modules"),
            f"modules: kohya keeps the layers every common loader applies, but which layers the loaders apply "
            f"is not known for {arch.title}.",
            "Remove modules: (or write modules: all) for this model family.",
        )


def _candidate_modules(loaded, target, tuned: CheckpointSource, base: CheckpointSource):
    spec = loaded.recipe.targets[target]
    arch = base.detection.architecture
    order = {key: index for index, key in enumerate(base.shapes)}
    wanted, missing_te = [], []
    for module in arch.modules:
        if is_conv3x3(module) and spec.conv_rank is None:
            continue
        if module.is_text_encoder and spec.text_encoder is False:
            continue
        if module.key in tuned.shapes and module.key in base.shapes:
            wanted.append(module)
        elif module.is_text_encoder:
            missing_te.append(module.kohya)
        else:  # detection guarantees every UNet key; anything else is a bug
            raise AssertionError(f"UNet module {module.key} missing after detection")
    if missing_te and spec.text_encoder is True:
        raise loaded.error(
            ("targets", target, "text_encoder"),
            f"text_encoder: true, but {len(missing_te)} text-encoder weight(s) are missing from the tuned or base "
            f"checkpoint (first: {missing_te[0]}).",
            "Use checkpoints that both include the text encoder(s), or set text_encoder: auto or false.",
        )
    wanted.sort(key=lambda m: (order[m.key], m.rows or (0, 0)))
    return tuple(wanted), tuple(missing_te)
