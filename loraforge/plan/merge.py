"""Planning a `kind: lora` target: merge (or resize) LoRA-family adapters into one LoRA.

Every ingredient is matched onto one architecture (plan/ingredients.py, the
same matching and block weights as a bake). The output has one module per
adapted layer, named by the architecture's kohya name, in name order; each
collects the contributions (ingredient, adapter module, coefficient) that land
on it, in recipe order. Plain LoRA/LoCon contributions stay factored; LoHa,
LoKr and full diffs are merged through their dense ΔW. DoRA inputs are refused:
their effect depends on the base weight, which a LoRA-to-LoRA merge does not
have (docs/merging.md).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

from loraforge.formats.adapters import AdapterFile, adapter_kind
from loraforge.formats.adapters.matching import detect_adapter_architecture, match_adapter
from loraforge.formats.arch import loaders
from loraforge.formats.arch.table import Architecture, ModuleSpec
from loraforge.formats.dtypes import precision_code
from loraforge.formats.lora_output import estimated_lora_bytes, is_conv_shape, lora_save_dtype, planned_lora_adapter, written_skips
from loraforge.errors import FormatError
from loraforge.methods.lora import LoraMergeMethod, lora_method
from loraforge.ops.svd import RankPolicy
from loraforge.plan.action_key import action_key
from loraforge.plan.device_class import device_class
from loraforge.plan.context import PlanContext
from loraforge.plan.extract import check_module_set
from loraforge.plan.ingredients import AdapterSource, adapter_source, listing, plan_ingredient
from loraforge.plan.model import LoraIngredient, ModuleApplication
from loraforge.plan.target import PlannedTarget, Produces
from loraforge.recipe.schema import RankSpec

# Bump when the numeric recipe of merging changes in a way that changes bytes.
MERGE_NUMERIC_POLICY = (
    "merge-v2: float64 factors; concat writes RN(coefficient x scale x up) and RN(down), certified exact "
    "rounding (dense inputs: exact SVD at numerical rank); svd: QR of stacked factors + SVD of "
    "the core (dense inputs: float64 dense SVD, randomized seeded per module); numerical-rank cap; symmetric "
    "split, canonical signs, alpha = rank; one correct rounding to the save dtype"
)
REPORT_SUFFIX = ".merge.json"
MERGE_MEMORY_FLOOR = 256 << 20  # torch, thread pools, the output's factors


@dataclass(frozen=True)
class MergeModule:
    """One output module and what lands on it."""

    spec: ModuleSpec
    contributions: tuple[ModuleApplication, ...]  # in recipe order
    policy: RankPolicy | None  # None for concat
    bound: int  # the most ranks the output module can have

    @property
    def name(self) -> str:
        return self.spec.kohya

    @property
    def is_conv(self) -> bool:
        return is_conv_shape(self.spec.shape)

    @property
    def dense(self) -> bool:
        """Whether some contribution needs its dense ΔW (LoHa, LoKr, diff)."""
        return any(not is_factored(c.module) for c in self.contributions)

    @property
    def input_rank(self) -> int | None:
        """Σ rᵢ of the factored contributions; None when a dense one is present."""
        if self.dense:
            return None
        return sum(int(c.module.rank) for c in self.contributions)


@dataclass(frozen=True, kw_only=True)
class MergeTarget(PlannedTarget):
    """A planned `kind: lora` target."""

    kind: ClassVar[str] = "lora"
    produces: ClassVar[Produces] = "lora"

    method: str  # "svd" | "concat"
    ingredients: tuple[LoraIngredient, ...]
    modules: tuple[MergeModule, ...]  # sorted by kohya name
    rank: RankSpec | None
    conv_rank: RankSpec | None
    dense_svd: str  # "exact" | "randomized"
    clamp_quantile: float | None
    seed: int
    save: str  # the output dtype code ("F16", "BF16", "F32")
    module_set: str = "all"  # "all" | "kohya": only the modules every common loader applies
    left_out_for_loaders: tuple[str, ...] = ()  # output modules ``modules: kohya`` left out (kohya names)
    format: str = "kohya"  # "kohya" | "diffusers": the names the output is written by (formats/lora_output.py)

    def loader_skips(self) -> dict[str, list[str]] | None:
        """{loader: output modules it is known to skip}; None where the family's loaders are not known."""
        family = self.architecture.name
        return loaders.loader_skips(family, written_skips(self.architecture, ((m.name, m.spec) for m in self.modules), self.format))

    @property
    def lora_dtype(self) -> str:
        return self.save

    @property
    def merge_method(self) -> LoraMergeMethod:
        return lora_method(self.method)

    @property
    def device_class(self) -> str | None:
        """The device class the output's bytes depend on (SVD methods), None when they depend on none (concat)."""
        return device_class(self.device) if self.merge_method.device_dependent else None

    def lora_adapter(self) -> AdapterFile:
        """The output as parse_adapter will see it, for targets that use this one (ranks at their bounds)."""
        return planned_lora_adapter(
            self.output, [(m.name, m.spec.shape, m.bound) for m in self.modules], format=self.format, arch=self.architecture
        )

    def modules_per_block(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for module in self.modules:
            counts[module.spec.block] = counts.get(module.spec.block, 0) + 1
        return {block: counts[block] for block in self.architecture.full_block_form if block in counts}


def is_factored(module) -> bool:
    """LoRA/LoCon modules (Tucker cores included) merge as factors; other kinds through their dense ΔW."""
    return adapter_kind(module.kind).factored


def report_path_for(output: Path) -> Path:
    """dist/x.safetensors -> dist/x.merge.json."""
    return output.with_name(output.name[: -len(".safetensors")] + REPORT_SUFFIX)


def plan_merge(context: PlanContext, name: str) -> MergeTarget:
    loaded = context.loaded
    recipe = loaded.recipe
    spec = recipe.targets[name]
    sources = [adapter_source(context, ("targets", name, "loras", i), lora.use) for i, lora in enumerate(spec.loras)]
    arch = _common_architecture(loaded, name, sources)
    ingredients, by_module = [], {}
    for index, source in enumerate(sources):
        ingredient, applications = plan_ingredient(
            loaded, name, index, source, arch,
            allow_unmatched=spec.allow_unmatched, base_label="architecture shared by the other LoRAs",
        )
        _refuse_unmergeable(loaded, name, index, applications)
        ingredients.append(ingredient)
        for application in applications:  # a row slice (Flux's split q/k/v) merges into its whole weight's module
            by_module.setdefault(arch.whole_module(application.spec).kohya, []).append(application)
    left_out: tuple[str, ...] = ()
    if (spec.modules or "all") == "kohya":
        check_module_set(loaded, name, arch)
        left_out = tuple(sorted(k for k, apps in by_module.items() if not loaders.kohya_applies(arch.whole_module(apps[0].spec))))
        by_module = {k: apps for k, apps in by_module.items() if k not in left_out}
        if not by_module:
            raise loaded.error(
                ("targets", name, "modules"),
                f"modules: kohya leaves nothing to merge: every module of the LoRAs is one that kohya's merge_lora "
                f"skips ({listing(list(left_out))}).",
                "Remove modules: kohya, or merge LoRAs that adapt attention, resnet or text-encoder layers.",
            )
    modules = tuple(_merge_module(spec, tuple(by_module[key]), arch) for key in sorted(by_module))
    precision = recipe.effective_precision(name)
    save = lora_save_dtype(
        "same" if precision.save == "same" else precision_code(precision.save), _factor_dtypes(sources)
    )
    output = context.output_path(name)
    device = context.device_of(name)
    return MergeTarget(
        name=name,
        method=spec.method,
        architecture=arch,
        output=output,
        report_path=report_path_for(output),
        ingredients=tuple(ingredients),
        modules=modules,
        rank=spec.rank,
        conv_rank=spec.conv_rank,
        dense_svd=spec.dense_svd,
        clamp_quantile=spec.clamp_quantile,
        seed=recipe.seed,
        save=save,
        module_set=spec.modules or "all",
        format=spec.format or "kohya",
        left_out_for_loaders=left_out,
        device=device,
        dependencies=tuple(d for d in spec.dependencies() if d in recipe.targets),
        action_key=merge_action_key(loaded, name, spec.method, context.input_hashes(name), device),
        read_bytes=sum(s.size for s in sources),
        write_bytes=estimated_lora_bytes(
            [(m.name, m.spec.shape, m.bound) for m in modules], save, format=spec.format or "kohya", arch=arch
        ),
        memory_bytes=_memory_bytes(sources, modules),
    )


def merge_action_key(loaded, target: str, method: str, input_hashes, device: str) -> str | None:
    """The bake's key recipe (plan/action_key.py) with the merge's numeric policy.

    An SVD merge's bytes are the same on one device class, not across classes
    (CPU and GPU LAPACKs round differently), so its key names the class and
    `verify` compares across classes within a tolerance. Concat is exact
    arithmetic in float64 with one rounding: no device in its key.
    """
    extra = {"device_class": device_class(device)} if lora_method(method).device_dependent else None  # = MergeTarget.device_class
    return action_key(loaded, target, "merge", input_hashes, MERGE_NUMERIC_POLICY, extra)


def _memory_bytes(sources: list[AdapterSource], modules: tuple[MergeModule, ...]) -> int:
    """The ingredients' factors plus one worker's dense ΔW (float64) per CPU core, and a floor."""
    largest = max((math.prod(m.spec.shape) for m in modules if m.dense), default=0)
    return MERGE_MEMORY_FLOOR + sum(s.size for s in sources) * 2 + 8 * largest * 3 * (os.cpu_count() or 1)


# --- architecture ------------------------------------------------------------------


def _common_architecture(loaded, target: str, sources: list[AdapterSource]) -> Architecture:
    """The first ingredient's architecture on which every ingredient lands with fitting shapes.

    Each ingredient's own guess is tried in recipe order, so an SD2 LoRA that
    touches only self-attention (which reads as SD1 on its own) merges with
    SD2 LoRAs; LoRAs of really different models find no common table.
    """
    guesses: list[tuple[str, Architecture | None]] = []
    for source in sources:
        arch = source.architecture
        if arch is None and source.adapter.modules:
            try:
                arch = detect_adapter_architecture(source.adapter)
            except FormatError:
                arch = None
        guesses.append((source.use, arch))
    for _, candidate in guesses:
        if candidate is not None and all(_fits(s.adapter, candidate) for s in sources):
            return candidate
    described = ", ".join(
        f"'{use}' looks like {arch.title} ({arch.size_text})" if arch else f"'{use}' matches no known architecture"
        for use, arch in guesses
    )
    raise loaded.error(
        ("targets", target, "loras"),
        f"the LoRAs of this merge were made for different models: {described}. "
        "A merged LoRA has one architecture, so every ingredient must fit it.",
        "Merge only LoRAs trained for the same base model family (SD 1.x, SD 2.x or SDXL).",
    )


def _fits(adapter: AdapterFile, arch: Architecture) -> bool:
    match = match_adapter(adapter, arch)
    return bool(match.matched) and not match.shape_mismatches or not adapter.modules


# --- modules ------------------------------------------------------------------------


def _refuse_unmergeable(loaded, target: str, index: int, applications) -> None:
    where = ("targets", target, "loras", index, "use")
    use = loaded.recipe.targets[target].loras[index].use
    dora = sorted({a.module.name for a in applications if a.module.dora})
    if dora:
        raise loaded.error(
            where,
            f"'{use}' is a DoRA adapter ({len(dora)} module(s) carry a magnitude vector, e.g. {dora[0]}); its "
            "effect depends on the base weight, which a LoRA-to-LoRA merge does not have.",
            "Bake it into a checkpoint instead (kind: checkpoint), then extract a LoRA from the result if you "
            "need one (kind: extract).",
        )
    biased = sorted({a.module.name for a in applications if a.part == "bias"})
    if biased:
        raise loaded.error(
            where,
            f"'{use}' changes biases ({len(biased)} module(s) with diff_b: {listing(biased)}), which a kohya "
            "LoRA cannot carry.",
            "Bake the diff into a checkpoint instead (kind: checkpoint).",
        )


def _merge_module(spec, contributions: tuple[ModuleApplication, ...], arch: Architecture) -> MergeModule:
    module_spec = arch.whole_module(contributions[0].spec)
    out, flat_in = module_spec.shape[0], math.prod(module_spec.shape[1:])
    dense = any(not is_factored(c.module) for c in contributions)
    factored_rank = sum(int(c.module.rank) for c in contributions if is_factored(c.module))
    method = lora_method(spec.method)
    policy = method.rank_policy(spec, is_conv_shape(module_spec.shape))
    return MergeModule(module_spec, contributions, policy, method.module_bound(policy, factored_rank, dense, min(out, flat_in)))


def _factor_dtypes(sources: list[AdapterSource]) -> list[str]:
    """The dtypes of every ingredient's factor tensors (for save: same)."""
    return sorted({code for source in sources for code in source.factor_dtypes})
