"""Running a `kind: lora` target: merge each module, write the LoRA and its JSON report.

Modules are merged one at a time in name order on the target's device, in
float64; each result is rounded to the save dtype at once and kept (a merged
LoRA is small: its size is what gets written). The LoRA goes through
formats/lora_output.py (atomic, deterministic bytes), the report next to it
(``<output stem>.merge.json``, also atomic) lists per module the rank kept,
the energy retained and the relative Frobenius error, both of the float64
truncation and of the factors as saved.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from loraforge.errors import BuildError
from loraforge.execute.device import one_thread_per_module
from loraforge.execute.resources import Resources
from loraforge.execute.bake import ProgressCallback
from loraforge.atomic import write_text_atomic
from loraforge.execute.overflow import refuse_overflowing_factors
from loraforge.canonical import canonical_json
from loraforge.plan.provenance import output_title, provenance_fields
from loraforge.formats import dtypes
from loraforge.formats.adapters import load_factors, module_delta
from loraforge.formats.lora_output import LoraModuleFactors, is_conv_shape, lora_metadata, write_lora
from loraforge.formats.metadata import release_date
from loraforge.formats.safetensors_reader import SafetensorsFile, open_safetensors
from loraforge.formats.safetensors_writer import WriteResult
from loraforge.ops.merge import FactorSource, ModuleTerms, relative_error, tucker_down
from loraforge.plan.merge import MergeModule, MergeTarget, is_factored
from loraforge.plan.model import BuildPlan

SHOWN_WORST = 5  # modules named in the report's summary


@dataclass(frozen=True)
class ModuleOutcome:
    module: MergeModule
    rank: int
    energy_retained: float
    relative_error: float  # of the float64 result (truncation, clamping)
    saved_relative_error: float  # of the factors as written (after rounding to the save dtype)
    singular_values: tuple[float, ...]  # leading ones, for the report


@dataclass(frozen=True)
class MergeResult:
    target: str
    written: WriteResult
    report_path: Path
    outcomes: tuple[ModuleOutcome, ...]

    def summary_lines(self) -> list[str]:
        """A few lines for the build output (the full table is in the JSON report)."""
        if not self.outcomes:
            return [f"no modules (every coefficient is 0); report: {self.report_path}"]
        ranks = [o.rank for o in self.outcomes]
        worst = max(self.outcomes, key=lambda o: o.saved_relative_error)
        energies = [o.energy_retained for o in self.outcomes]
        return [
            f"{len(self.outcomes)} modules merged, ranks {min(ranks)}-{max(ranks)}",
            f"energy retained: mean {sum(energies) / len(energies):.4f}, min {min(energies):.4f}; "
            f"relative error as saved: max {worst.saved_relative_error:.4g} ({worst.module.name})",
            f"report: {self.report_path}",
        ]


OVERFLOW_HINT = "Check the strengths, `te:` values and block weights of the ingredients, and their alphas and factors (`loraforge inspect`), for extreme values."


def run_merge(
    plan: BuildPlan,
    target: MergeTarget,
    device: torch.device,
    on_progress: ProgressCallback = lambda nbytes: None,
    resources: Resources | None = None,
) -> MergeResult:
    """Build one `kind: lora` target into its output path (atomically), then its report."""
    with ExitStack() as stack:
        files = [stack.enter_context(_open_ingredient(i.path, i.use)) for i in target.ingredients]
        threads = (resources or Resources.local(device)).cpu_threads  # what the executor lets this run use
        workers = min(stack.enter_context(one_thread_per_module(device)), threads)
        merge_one = lambda module: _merge_module(target, module, files, device)  # noqa: E731
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="loraforge-merge"))
        merged = []
        for factors, outcome in pool.map(merge_one, target.modules):  # map keeps module order
            merged.append((factors, outcome))
            on_progress(int((factors.up.numel() + factors.down.numel() + 1) * factors.up.element_size()))
    factors = [f for f, _ in merged]
    outcomes = [o for _, o in merged]
    refuse_overflowing_factors(target.name, target.output, factors, target.save, OVERFLOW_HINT)
    written = write_lora(target.output, factors, _metadata(plan, target, factors), target.save,
                         format=target.format, arch=target.architecture)
    _write_json(target.report_path, _report(plan, target, outcomes, written))
    return MergeResult(target.name, written, target.report_path, tuple(outcomes))


def _merge_module(target: MergeTarget, module: MergeModule, files, device) -> tuple[LoraModuleFactors, ModuleOutcome]:
    method = target.merge_method
    terms = _terms(module, files, device)
    result = method.merge(terms, module.policy, target, module.name)
    up, down = method.saved_factors(terms, result, dtypes.torch_dtype(target.save))
    outcome = ModuleOutcome(
        module=module,
        rank=result.rank,
        energy_retained=result.energy_retained,
        relative_error=result.relative_error,
        saved_relative_error=relative_error(terms, up, down, method.known_norm(terms, result)),
        singular_values=tuple(float(v) for v in result.singular_values[: result.rank + 4]),
    )
    return LoraModuleFactors(module.name, up.cpu(), down.cpu(), module.spec.shape), outcome


def _open_ingredient(path: Path, use: str) -> SafetensorsFile:
    if not path.exists():
        raise BuildError(f"{path}: the LoRA '{use}' is missing (it should have been built or fetched first). Re-run the build.")
    return open_safetensors(path)


def _terms(module: MergeModule, files: Sequence[SafetensorsFile], device: torch.device) -> ModuleTerms:
    """Each contribution as float64 factors (LoRA/LoCon) or added into one dense sum (other kinds)."""
    ups, downs, sources, dense = [], [], [], None
    out = module.spec.shape[0]
    for contribution in module.contributions:
        adapter_module = contribution.module
        try:
            loaded = load_factors(files[contribution.ingredient], adapter_module, device=device)
        except KeyError as error:
            raise BuildError(
                f"{files[contribution.ingredient].path}: tensor {error} of module {adapter_module.name} is missing; "
                "the file changed since planning. Re-run the build."
            ) from None
        if is_factored(adapter_module):
            coefficient = contribution.coefficient * adapter_module.scale
            up = _placed(loaded["up"].reshape(loaded["up"].shape[0], -1), contribution.spec, out)
            down = tucker_down(loaded["mid"], loaded["down"]) if "mid" in loaded else loaded["down"].reshape(loaded["down"].shape[0], -1)
            ups.append(up * coefficient)
            downs.append(down)
            sources.append(FactorSource(up, loaded["down"] if "mid" in loaded else down, loaded.get("mid"), contribution.coefficient, adapter_module.scale))
        else:
            delta = module_delta(adapter_module, loaded, contribution.spec.shape)
            delta = _placed(delta.reshape(delta.shape[0], -1), contribution.spec, out) * contribution.coefficient
            dense = delta if dense is None else dense.add_(delta)
    return ModuleTerms(tuple(ups), tuple(downs), dense, tuple(sources))


def _placed(rows: torch.Tensor, spec, out: int) -> torch.Tensor:
    """A contribution's up factor (or dense ΔW) in the rows of the whole weight the module merges into.

    A row slice (Flux's split q/k/v: spec.rows) gets zero rows around it; a swapped view (Flux's
    norm_out.linear) gets its halves swapped. Both are exact, so concat stays exact.
    """
    if spec.swap_halves:
        half = rows.shape[0] // 2
        return torch.cat([rows[half:], rows[:half]])
    if spec.rows is None or rows.shape[0] == out:
        return rows
    placed = rows.new_zeros((out,) + tuple(rows.shape[1:]))
    placed[spec.rows[0]:spec.rows[1]] = rows
    return placed


def _metadata(plan: BuildPlan, target: MergeTarget, factors: Sequence[LoraModuleFactors]) -> dict[str, str]:
    """ss_* and ModelSpec keys for the LoRA, with the same title and provenance keys as a bake."""
    return lora_metadata(
        target.architecture,
        {f.name: (f.rank, is_conv_shape(f.weight_shape)) for f in factors},
        title=output_title(plan.loaded, target.name),
        date=release_date(plan.loaded.recipe.date),
        merged_from=[i.use for i in target.ingredients],
        provenance=provenance_fields(plan, target),
    )


# --- report --------------------------------------------------------------------------


def _report(plan: BuildPlan, target: MergeTarget, outcomes: Sequence[ModuleOutcome], written: WriteResult) -> dict:
    spec = lambda rank: None if rank is None else rank.model_dump(exclude_none=True)  # noqa: E731
    return {
        "target": target.name,
        "method": target.method,
        "architecture": target.architecture.name,
        "output": target.output.name,
        "sha256": written.sha256,
        "rank": spec(target.rank),
        "conv_rank": spec(target.conv_rank),
        "dense_svd": target.dense_svd,
        "clamp_quantile": target.clamp_quantile,
        "save_dtype": target.save,
        "ingredients": [
            {"use": i.use, "adapter_kind": i.adapter.kind, "strength": i.strength, "te": i.te, "applied_modules": i.applied}
            for i in target.ingredients
        ],
        "summary": _summary(outcomes),
        "modules": [_module_entry(o) for o in outcomes],
    }


def _summary(outcomes: Sequence[ModuleOutcome]) -> dict:
    if not outcomes:
        return {"modules": 0}
    errors = [o.saved_relative_error for o in outcomes]
    worst = sorted(outcomes, key=lambda o: (-o.saved_relative_error, o.module.name))[:SHOWN_WORST]
    return {
        "modules": len(outcomes),
        "conv_modules": sum(1 for o in outcomes if o.module.is_conv),
        "total_rank": sum(o.rank for o in outcomes),
        "energy_retained_min": _round(min(o.energy_retained for o in outcomes)),
        "relative_error_max": _round(max(o.relative_error for o in outcomes)),
        "saved_relative_error_mean": _round(sum(errors) / len(errors)),
        "saved_relative_error_max": _round(max(errors)),
        "worst_modules": [o.module.name for o in worst],
    }


def _module_entry(outcome: ModuleOutcome) -> dict:
    module = outcome.module
    return {
        "name": module.name,
        "block": module.spec.block,
        "shape": list(module.spec.shape),
        "conv": module.is_conv,
        "inputs": [c.ingredient for c in module.contributions],
        "input_rank": module.input_rank,  # None: a dense input (LoHa/LoKr/diff) took part
        "rank": outcome.rank,
        "energy_retained": _round(outcome.energy_retained),
        "relative_error": _round(outcome.relative_error),
        "saved_relative_error": _round(outcome.saved_relative_error),
        "singular_values": [_round(v) for v in outcome.singular_values],
    }


def _round(value: float) -> float:
    """Reported figures to 6 significant digits: enough to read, stable in what is shown."""
    return float(f"{value:.6g}")


def _write_json(path: Path, report: dict) -> None:
    """Write the report atomically (temp file, fsync, rename), keys sorted, so it is reproducible."""
    text = canonical_json(report, indent=2, ascii=False) + "\n"
    try:
        write_text_atomic(path, text)
    except OSError as error:
        raise BuildError(f"writing the merge report {path} failed: {error}. Check free disk space and permissions.") from None
