"""Streaming extraction executor: dW = tuned - base, module by module, into a LoRA/LoCon.

Both checkpoints are read one weight at a time (a background thread reads
the next weights of both files while the current one is factorised), so
memory stays at a few weights plus the small rank-k factors, whatever the
checkpoint's size. A module whose difference is zero or below ``min_diff`` is
skipped and listed; the factors of the others are written with the shared
LoRA writer (formats/lora_output.py), and a per-module JSON report goes next
to the output. See docs/extraction.md.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from loraforge.atomic import atomic_text
from loraforge.canonical import canonical_json
from loraforge.errors import BuildError
from loraforge.execute.device import one_thread_per_module
from loraforge.execute.resources import Resources
from loraforge.execute.prefetch import prefetched
from loraforge.formats.arch.table import TEXT_ENCODERS, ModuleSpec
from loraforge.formats.lora_output import LoraModuleFactors, lora_metadata, write_lora
from loraforge.formats.metadata import release_date
from loraforge.formats.safetensors_reader import SafetensorsFile, open_safetensors
from loraforge.formats.safetensors_writer import WriteResult
from loraforge.ops.extract import DeltaStats, delta_stats, extract_low_rank, is_changed, module_matrix, policy_for, weight_delta
from loraforge.ops.svd import LowRankResult
from loraforge.plan.provenance import output_title, provenance_fields
from loraforge.plan.extract import ExtractionTarget, is_conv3x3
from loraforge.plan.model import BuildPlan

PREFETCH_DEPTH = 2  # weights (of each checkpoint) read ahead of the one being factorised

ProgressCallback = Callable[[int], None]


@dataclass(frozen=True)
class ModuleOutcome:
    """What happened to one candidate module."""

    module: ModuleSpec
    stats: DeltaStats
    result: LowRankResult | None  # None when skipped
    skipped_because: str | None = None


@dataclass(frozen=True)
class ExtractResult:
    target: str
    written: WriteResult
    report_path: Path
    extracted: tuple[ModuleOutcome, ...]
    skipped: tuple[ModuleOutcome, ...]
    text_encoders: dict[str, str]  # component -> "included" | "unchanged" | "excluded" | "missing"

    def summary_lines(self) -> list[str]:
        """A few lines for the build output (the full table is in the JSON report)."""
        ranks = [o.result.rank for o in self.extracted]
        errors = [o.result.relative_error for o in self.extracted]
        energies = [o.result.energy_retained for o in self.extracted]
        worst = max(self.extracted, key=lambda o: o.result.relative_error)
        lines = [
            f"{len(self.extracted)} modules extracted (ranks {min(ranks)}-{max(ranks)}), "
            f"{len(self.skipped)} skipped as unchanged",
            f"energy retained: mean {sum(energies) / len(energies):.4f}, min {min(energies):.4f}; "
            f"relative error: max {max(errors):.4f} ({worst.module.kohya})",
            "text encoders: " + ", ".join(f"{c} {state}" for c, state in self.text_encoders.items()),
            f"report: {self.report_path}",
        ]
        return lines


def run_extract(
    plan: BuildPlan,
    target: ExtractionTarget,
    device: torch.device,
    on_progress: ProgressCallback = lambda nbytes: None,
    resources: Resources | None = None,
) -> ExtractResult:
    """Extract one target into its output path and report (both written atomically)."""
    with ExitStack() as stack:
        tuned = stack.enter_context(open_safetensors(target.tuned.path))
        base = stack.enter_context(open_safetensors(target.base.path))
        _check_files_match_plan(target, tuned, base)
        threads = (resources or Resources.local(device)).cpu_threads  # what the executor lets this run use
        outcomes = list(_extract_all(target, tuned, base, device, on_progress, threads))
    extracted, skipped, text_encoders = _select(target, outcomes)
    if not extracted:
        raise BuildError(
            f"target '{target.name}': no module of '{target.tuned.name}' differs from '{target.base.name}' by more "
            f"than min_diff = {target.min_diff:g} ({len(outcomes)} modules compared), so there is nothing to extract "
            "and no LoRA was written. Check that `tuned:` names the fine-tuned model, or lower `min_diff`."
        )
    report = _report(plan, target, extracted, skipped, text_encoders)
    target.output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_text(target.report_path) as report_file:
        report_file.write(canonical_json(report, indent=1, allow_nan=False) + "\n")
        written = _write_lora(plan, target, extracted)
    return ExtractResult(target.name, written, target.report_path, tuple(extracted), tuple(skipped), text_encoders)


# --- computing -------------------------------------------------------------------


def _extract_all(target, tuned, base, device, on_progress, threads: int) -> Iterator[ModuleOutcome]:
    """Every candidate module's outcome, in the plan's order.

    On the CPU each weight's difference and SVDs run on one torch thread,
    several weights side by side (:func:`one_thread_per_module`), so the
    bytes do not depend on the thread count; at most ``workers + 1`` weights
    are in flight besides the ones being read ahead.
    """
    by_key: dict[str, list[ModuleSpec]] = {}
    for module in target.modules:
        by_key.setdefault(module.key, []).append(module)

    def one_weight(key, tuned_weight, base_weight) -> list[ModuleOutcome]:
        base_weight = base_weight.to(device)
        delta = weight_delta(tuned_weight.to(device), base_weight, target.compute)
        return [_extract_module(target, module, delta, base_weight) for module in by_key[key]]

    with ExitStack() as stack:
        workers = min(stack.enter_context(one_thread_per_module(device)), threads)
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="loraforge-extract"))
        stack.callback(pool.shutdown, wait=True, cancel_futures=True)  # an error or interrupt: start nothing more
        pending: deque = deque()
        for key, tuned_weight, base_weight in _prefetched_pairs(tuned, base, list(by_key)):
            pending.append(pool.submit(one_weight, key, tuned_weight, base_weight))
            del tuned_weight, base_weight
            while len(pending) > workers:
                yield from _finished(pending.popleft(), target, on_progress)
        while pending:
            yield from _finished(pending.popleft(), target, on_progress)


def _finished(future, target: ExtractionTarget, on_progress) -> Iterator[ModuleOutcome]:
    for outcome in future.result():
        yield outcome
        on_progress(target.module_bytes(outcome.module))


def _extract_module(target: ExtractionTarget, module: ModuleSpec, delta, base_weight) -> ModuleOutcome:
    matrix = module_matrix(delta, module.rows)
    stats = delta_stats(matrix, module_matrix(base_weight, module.rows))
    threshold = 0.0 if (module.is_text_encoder and target.text_encoder is True) else target.min_diff
    if not is_changed(stats, threshold):
        reason = "unchanged (dW = 0)" if stats.max_abs == 0 else f"max |dW| {stats.max_abs:.3g} <= min_diff"
        return ModuleOutcome(module, stats, None, reason)
    spec = target.module_rank(module)
    result = extract_low_rank(
        matrix,
        policy_for(spec.rank, spec.energy, spec.ratio, spec.max),
        method=target.svd,
        recipe_seed=target.seed,
        module_name=module.kohya,
        clamp_quantile=target.clamp_quantile,
    )
    cpu = LowRankResult(
        result.up.cpu(), result.down.cpu(), result.singular_values, result.rank,
        result.energy_retained, result.relative_error,
    )
    return ModuleOutcome(module, stats, cpu)


def _select(target: ExtractionTarget, outcomes: Sequence[ModuleOutcome]):
    """Split into extracted and skipped; say per text encoder whether it was included and why."""
    extracted = [o for o in outcomes if o.result is not None]
    skipped = [o for o in outcomes if o.result is None]
    components = [c for c in TEXT_ENCODERS if any(m.component == c for m in target.architecture.modules)]
    states = {}
    for component in components:
        if target.text_encoder is False:
            states[component] = "excluded (text_encoder: false)"
        elif not any(o.module.component == component for o in outcomes):
            states[component] = "missing from a checkpoint"
        elif any(o.module.component == component for o in extracted):
            states[component] = "included"
        else:
            states[component] = "unchanged, not extracted"
    return extracted, skipped, states


def _prefetched_pairs(tuned: SafetensorsFile, base: SafetensorsFile, keys: Sequence[str]):
    """(key, tuned tensor, base tensor) in order, both read PREFETCH_DEPTH weights ahead on a thread."""

    def load(key: str):
        return tuned.read(key), base.read(key)

    for key, (tuned_weight, base_weight) in prefetched(keys, load, PREFETCH_DEPTH):
        yield key, tuned_weight, base_weight


def _check_files_match_plan(target: ExtractionTarget, tuned: SafetensorsFile, base: SafetensorsFile) -> None:
    """The files may have changed (or a producing target written something else) since planning."""
    for source, handle in ((target.tuned, tuned), (target.base, base)):
        for module in target.modules:
            if module.key not in handle or tuple(handle.info(module.key).shape) != tuple(source.shapes[module.key]):
                raise BuildError(
                    f"{handle.path}: the {source.name} checkpoint changed since planning (tensor {module.key} is "
                    "missing or has another shape). Re-run the build."
                )


# --- the output ------------------------------------------------------------------


def _write_lora(plan: BuildPlan, target: ExtractionTarget, extracted: Sequence[ModuleOutcome]) -> WriteResult:
    modules = [
        LoraModuleFactors(o.module.kohya, o.result.up, o.result.down, tuple(o.module.shape)) for o in extracted
    ]
    ranks = {o.module.kohya: (o.result.rank, is_conv3x3(o.module)) for o in extracted}
    from loraforge.execute.overflow import refuse_overflowing_factors

    refuse_overflowing_factors(target.name, target.output, modules, target.lora_dtype,
                               "The two checkpoints differ by more than the save dtype holds; check that they are of one family.")
    return write_lora(target.output, modules, _metadata(plan, target, ranks), target.lora_dtype,
                      format=target.format, arch=target.architecture)


def _metadata(plan: BuildPlan, target: ExtractionTarget, ranks) -> dict[str, str]:
    return lora_metadata(
        target.architecture,
        ranks,
        title=output_title(plan.loaded, target.name),
        date=release_date(plan.loaded.recipe.date),
        merged_from=[target.tuned.name, target.base.name],
        provenance=provenance_fields(plan, target),
    )


# --- the report --------------------------------------------------------------------


def _report(plan, target, extracted, skipped, text_encoders) -> dict:
    return {
        "target": target.name,
        "tuned": target.tuned.name,
        "base": target.base.name,
        "architecture": target.architecture.name,
        "settings": {
            "rank": target.rank.model_dump(exclude_none=True),
            "conv_rank": None if target.conv_rank is None else target.conv_rank.model_dump(exclude_none=True),
            "svd": target.svd,
            "text_encoder": target.text_encoder,
            "clamp_quantile": target.clamp_quantile,
            "min_diff": target.min_diff,
            "compute": target.compute,
            "seed": target.seed,
        },
        "text_encoders": text_encoders,
        "summary": _summary(extracted, skipped),
        "modules": [_module_entry(o) for o in extracted],
        "skipped": [
            {"module": o.module.kohya, "reason": o.skipped_because, "max_abs_delta": _round(o.stats.max_abs)}
            for o in skipped
        ],
    }


def _summary(extracted, skipped) -> dict:
    errors = [o.result.relative_error for o in extracted]
    energies = [o.result.energy_retained for o in extracted]
    return {
        "extracted": len(extracted),
        "skipped": len(skipped),
        "mean_energy_retained": _round(sum(energies) / len(energies)),
        "min_energy_retained": _round(min(energies)),
        "max_relative_error": _round(max(errors)),
        "total_rank": sum(o.result.rank for o in extracted),
    }


def _module_entry(outcome: ModuleOutcome) -> dict:
    module, result = outcome.module, outcome.result
    return {
        "module": module.kohya,
        "key": module.key,
        "rows": list(module.rows) if module.rows else None,
        "shape": list(module.shape),
        "block": module.block,
        "rank": result.rank,
        "energy_retained": _round(result.energy_retained),
        "relative_error": _round(result.relative_error),
        "relative_change": _round(outcome.stats.relative_change),
        "max_abs_delta": _round(outcome.stats.max_abs),
    }


def _round(value: float) -> float:
    """Reported figures to 9 significant digits: plenty to read, and stable in the last digits shown."""
    return float(f"{value:.9g}")
