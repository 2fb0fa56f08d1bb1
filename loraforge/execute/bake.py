"""Streaming bake executor: one base tensor in memory at a time.

The base is read tensor by tensor in file order while a background thread
reads ahead, so disk reads overlap with computing the current weight. Only
the weights that adapters touch are computed; every other tensor is copied as
raw bytes (or converted, when the save dtype differs). Adapter factors are
read per module when their weight comes up, so memory stays at about one base
tensor plus its deltas, whatever the checkpoint's size.
"""

from __future__ import annotations

import math
from collections import deque
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from loraforge.errors import BuildError, FormatError
from loraforge.execute.checkpoint_merge import MergedBase
from loraforge.execute.device import single_threaded_torch
from loraforge.execute.resources import Resources
from loraforge.execute.prefetch import prefetched
from loraforge.formats.adapters import (
    load_factors,
    module_bias_delta,
    module_certificate,
    module_dora_increment,
    module_effective_delta,
    module_low_rank,
)
from loraforge.formats.dtypes import torch_dtype
from loraforge.formats.hashing import modelspec_hash
from loraforge.formats.metadata import HASH_KEY, checkpoint_metadata, release_date
from loraforge.formats.safetensors_reader import SafetensorsFile, open_safetensors
from loraforge.formats.safetensors_writer import SafetensorsWriter, TensorPlan, WriteResult
from loraforge.ops.bake import DenseTerm, LowRankTerm, Term, bake_weight, bake_weight_scaled_fp8, swap_halves
from loraforge.ops.fp8 import dequantised, scale_value
from loraforge.ops.rounding import round_float64
from loraforge.ops.finite import all_finite, nonfinite_counts, overflow_count
from loraforge.plan.provenance import output_title, provenance_fields
from loraforge.plan.layout import OutputTensor, output_layout, scaled_weights
from loraforge.plan.model import BakeTarget, BuildPlan, ModuleApplication

PREFETCH_DEPTH = 2  # tensors read ahead of the one being computed
# Threads baking the row blocks of one weight. Their torch ops and numpy casts
# release the GIL, so two keep both cores of a 2-core machine busy next to the
# reader, writer and hashing threads while torch itself stays single-threaded
# (no OpenMP spin-waits); more were slower there.
BAKE_WORKERS = 2
MAX_PENDING_WRITES = 2  # computed tensors waiting for the writer thread
MAX_LISTED_MODULES = 8  # modules named in a NaN/inf error before "and N more"

ProgressCallback = Callable[[int], None]  # called with the bytes just written


@dataclass(frozen=True)
class BakeResult:
    target: str
    written: WriteResult
    baked_tensors: int
    copied_tensors: int
    converted_tensors: int
    merged_tensors: int = 0  # a checkpoint merge's tensors computed from several models (before any bake)


def run_bake(
    plan: BuildPlan,
    target: BakeTarget,
    device: torch.device,
    on_progress: ProgressCallback = lambda nbytes: None,
    resources: Resources | None = None,
) -> BakeResult:
    """Build one checkpoint target into its output path (atomically)."""
    with ExitStack() as stack:
        base = stack.enter_context(open_safetensors(target.base_path) if target.merge is None else MergedBase(target.merge, target.name))
        adapters = [stack.enter_context(open_safetensors(i.path)) for i in target.ingredients]
        scaled = scaled_weights(base) if target.merge is None else {}  # ComfyUI scaled fp8 (plan/layout.py)
        layout = output_layout(base, target.save, baked=target.applications, scaled=scaled)
        _check_base_matches_plan(base, target)
        _make_output_folder(target)
        writer = stack.enter_context(
            SafetensorsWriter(
                target.output,
                [TensorPlan(t.name, t.dtype, t.shape) for t in layout],
                _output_metadata(plan, target),
                deferred_keys=(HASH_KEY,),
            )
        )
        workspace = _workspace(layout, device)
        # One torch thread: the reader, writer, hashing and rounding threads
        # keep the other cores busy, and OpenMP workers spinning for a core
        # those threads hold cost more than a second thread gains (measured:
        # the SD 1.5 bake took about twice as long with torch's default).
        stack.enter_context(single_threaded_torch())
        resources = resources or Resources.local(device)  # what the executor lets this run use
        pool = stack.enter_context(resources.worker_pool(BAKE_WORKERS, "loraforge-block"))
        if isinstance(base, MergedBase):
            base.use_pool(pool)  # a merge's chunks run on the same threads (computed on the read-ahead thread)
        workers = min(BAKE_WORKERS, resources.cpu_threads)
        requantised = _Requantised(base, target, scaled, adapters, device, workspace, pool, workers)
        try:
            with _BackgroundWrites(writer, on_progress) as writes:
                for entry, data in _prefetched(base, layout):
                    if entry.name in scaled and entry.action in ("bake", "dequantise"):
                        source, data = data, requantised.weight(entry, data)
                        _refuse_overflow(target, entry, data, source)
                    elif entry.action == "scale":
                        data = requantised.scale(entry, data)
                    elif entry.action == "bake":
                        applications = target.applications[entry.name]
                        source, data = data, _bake_tensor(data, applications, adapters, device, torch_dtype(entry.dtype), workspace, pool, workers)
                        _refuse_overflow(target, entry, data, source)
                    elif entry.action == "convert":
                        source, data = data, round_float64(data, torch_dtype(entry.dtype), pool)  # one rounding, even from F64
                        _refuse_overflow(target, entry, data, source)
                    writes.submit(entry, data)
        except _NonFiniteFactors as found:
            raise _nonfinite_error(target, adapters, found.ingredient) from None
        written = writer.commit(deferred_metadata={HASH_KEY: modelspec_hash})
    # A merge's tensors computed from several models count as merged (then baked, if a LoRA touches them).
    merged = {t.name for t in layout if target.merge.taken.get(t.name) is None} if target.merge is not None else set()
    counts = {
        action: sum(1 for t in layout if t.action == action and (action == "bake" or t.name not in merged))
        for action in ("bake", "copy", "convert")
    }
    counts["convert"] += sum(1 for t in layout if t.action == "dequantise")  # scaled fp8 weights into the save dtype
    return BakeResult(target.name, written, counts["bake"], counts["copy"], counts["convert"], len(merged))


class _Requantised:
    """The weights of a scaled-fp8 base (ops/fp8.py) as the layout wants them, and their new scales.

    Under a float save dtype a scaled weight is dequantised (exact in float64) and baked or rounded into it. Under
    `save: same` a baked one is requantised to F8_E4M3 with the scale ops/fp8.output_scale picks; its
    ``scale_weight`` may come before or after it in the file, so whichever comes first computes both and keeps the
    other (one weight's float8 bytes or one number) until its turn.
    """

    def __init__(self, base, target: BakeTarget, scaled, adapters, device, workspace, pool, workers):
        self._base, self._target, self._scaled, self._adapters = base, target, scaled, adapters
        self._device, self._workspace, self._pool, self._workers = device, workspace, pool, workers
        self._weight_of = {scale: weight for weight, scale in scaled.items()}
        self._done: dict[str, tuple[torch.Tensor, float]] = {}  # weight key -> (float8 weight, scale)

    def _scale_of(self, weight: str) -> float:
        return scale_value(self._base.read(self._scaled[weight]))

    def weight(self, entry: OutputTensor, stored: torch.Tensor) -> torch.Tensor:
        wide = dequantised(stored, self._scale_of(entry.name))
        if entry.action == "dequantise":
            return round_float64(wide, torch_dtype(entry.dtype), self._pool)  # one rounding of the exact product
        if self._target.save != "same":
            return _bake_tensor(wide, self._target.applications[entry.name], self._adapters, self._device,
                                torch_dtype(entry.dtype), self._workspace, self._pool, self._workers)
        return self._requantise(entry.name, wide)[0]

    def scale(self, entry: OutputTensor, stored: torch.Tensor) -> torch.Tensor:
        _, value = self._requantise(self._weight_of[entry.name])
        return torch.tensor(value, dtype=torch.float32).reshape(stored.shape)

    def _requantise(self, weight: str, wide: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        done = self._done.pop(weight, None)
        if done is not None:
            return done
        if wide is None:  # the scale comes first: read its weight now
            wide = dequantised(self._base.read(weight), self._scale_of(weight))
        terms = _terms(wide, self._target.applications[weight], self._adapters, self._device)
        result = bake_weight_scaled_fp8(wide.to(self._device), terms, self._scale_of(weight), self._workspace)
        result = (result[0].cpu(), result[1])
        self._done[weight] = result  # the partner entry (scale or weight) takes it
        return result


def _workspace(layout: Sequence[OutputTensor], device: torch.device) -> torch.Tensor | None:
    """One float64 buffer for the largest baked weight, reused for every weight."""
    largest = max((math.prod(t.shape) for t in layout if t.action == "bake"), default=0)
    return torch.empty(largest, dtype=torch.float64, device=device) if largest else None


def _bake_tensor(
    weight: torch.Tensor,
    applications: Sequence[ModuleApplication],
    adapters: Sequence[SafetensorsFile],
    device: torch.device,
    out_dtype: torch.dtype,
    workspace: torch.Tensor | None,
    pool: Executor | None,
    workers: int,
) -> torch.Tensor:
    weight = weight.to(device)
    terms = _terms(weight, applications, adapters, device)
    return bake_weight(weight, terms, out_dtype, workspace, pool, workers).cpu()


def _terms(weight, applications, adapters, device) -> Iterator[Term]:
    """Each application's contribution, computed lazily so only one dense delta is alive at a time."""
    for application in applications:
        terms = _application_terms(weight, application, adapters, device)
        if application.spec.swap_halves:  # Flux norm_out.linear: its ΔW [a; b] lands as [b; a] (weight or bias)
            terms = (half for term in terms for half in swap_halves(term, weight.shape[0]))
        yield from terms


def _application_terms(weight, application, adapters, device) -> Iterator[Term]:
    factors = load_factors(adapters[application.ingredient], application.module, device=device)
    if not all_finite(factors.values()):
        raise _NonFiniteFactors(application.ingredient)
    rows = application.spec.rows
    target = weight if rows is None else weight[rows[0]:rows[1]]
    if application.spec.swap_halves:  # the adapter's row order (DoRA's per-row norms need it); swapped back after
        target = torch.cat([weight[weight.shape[0] // 2:], weight[: weight.shape[0] // 2]])
    if application.part == "bias":
        yield DenseTerm(application.coefficient, module_bias_delta(application.module, factors), rows)
        return
    low_rank = module_low_rank(application.module, factors)
    if low_rank is not None:
        up, down = low_rank
        yield LowRankTerm(up, down, rows, application.coefficient, application.module.scale)
    elif application.dora is not None:
        # DoRA: W'(s) - W by the module's convention, its float64 evaluation being the term's value; at s = 1
        # it is the module's effective delta bit for bit (formats/adapters module_dora_increment).
        increment = module_dora_increment(application.module, factors, target, application.coefficient, application.dora)
        yield DenseTerm(1.0, increment, rows)
    else:
        delta = module_effective_delta(application.module, factors, target)
        certificate = module_certificate(application.module, factors, tuple(target.shape))
        if certificate is None:  # no exact form: its float64 evaluation is the term's value
            yield DenseTerm(application.coefficient, delta, rows)
        else:
            yield DenseTerm(application.coefficient, delta, rows, certificate.envelope, certificate.depth, certificate.exact)


class _NonFiniteFactors(Exception):
    """Raised inside the loop; run_bake turns it into a FormatError listing every bad module."""

    def __init__(self, ingredient: int):
        self.ingredient = ingredient


def _nonfinite_error(target: BakeTarget, adapters: Sequence[SafetensorsFile], index: int) -> FormatError:
    """Scan the whole adapter (error path only) so the message names every module with NaN/inf factors."""
    ingredient = target.ingredients[index]
    found = []
    for module in ingredient.adapter.modules:
        factors = load_factors(adapters[index], module, device="cpu")
        counts = {module.keys[role]: nonfinite_counts(tensor) for role, tensor in sorted(factors.items())}
        bad = [f"{key}: {nan} NaN, {inf} inf" for key, (nan, inf) in counts.items() if nan or inf]
        if bad:
            found.append(f"{module.name} ({'; '.join(bad)})")
    shown = "; ".join(found[:MAX_LISTED_MODULES]) + (f"; and {len(found) - MAX_LISTED_MODULES} more" if len(found) > MAX_LISTED_MODULES else "")
    return FormatError(
        f"{ingredient.path}: {len(found)} module(s) of adapter '{ingredient.use}' hold NaN or infinite values, "
        f"which would turn the weights they touch into NaN: {shown}. Nothing was written. The file is damaged or "
        "the training diverged; re-download it, or re-export it from a checkpoint saved before the divergence."
    )


def _refuse_overflow(target: BakeTarget, entry: OutputTensor, output: torch.Tensor, source: torch.Tensor) -> None:
    """Stop the build (nothing written) when the tensor about to be saved holds infinities its base did not."""
    count = overflow_count(output, source)
    if not count:
        return
    dtype = torch_dtype(entry.dtype)
    largest = f"{torch.finfo(dtype).max:.6g}" if dtype.is_floating_point else "?"
    if entry.action == "bake":
        cause = (
            f"the baked values exceed the largest {entry.dtype} number ({largest}). Check the strengths, `te:` values "
            "and block weights of the LoRAs applied to it, and their alphas and factors (`loraforge inspect`), for "
            "extreme values"
        )
    else:
        cause = f"the base's values exceed the largest {entry.dtype} number ({largest}) when converted"
    raise BuildError(
        f"target '{target.name}': tensor {entry.name} would hold {count:,} infinite or NaN values of "
        f"{math.prod(entry.shape):,} (none in the base): {cause}. Nothing was written{_kept(target)}. "
        "Fix the recipe or the input, or save in a wider dtype (precision: {save: float32})."
    )


def _kept(target: BakeTarget) -> str:
    return "; the previous output is unchanged" if target.output.exists() else ""


def _make_output_folder(target: BakeTarget) -> None:
    folder = target.output.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BuildError(
            f"cannot create the output folder {folder} for target '{target.name}': {error.strerror or error}. "
            "Check that the path is a writable folder (not a file) or change the target's `output:`."
        ) from None


class _BackgroundWrites:
    """Writes tensors in order on one background thread, so disk writes overlap compute.

    At most MAX_PENDING_WRITES tensors wait, which bounds the memory they hold.
    """

    def __init__(self, writer: SafetensorsWriter, on_progress: ProgressCallback):
        self._writer = writer
        self._on_progress = on_progress
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraforge-write")
        self._pending: deque = deque()

    def submit(self, entry: OutputTensor, data) -> None:
        self._pending.append((entry, self._pool.submit(self._writer.write, entry.name, data)))
        while len(self._pending) > MAX_PENDING_WRITES:
            self._finish_oldest()

    def _finish_oldest(self) -> None:
        entry, future = self._pending.popleft()
        future.result()  # re-raises a write error in the building thread
        self._on_progress(entry.nbytes)

    def __enter__(self) -> "_BackgroundWrites":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        try:
            if exc_type is None:
                while self._pending:
                    self._finish_oldest()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _prefetched(base: SafetensorsFile, layout: Sequence[OutputTensor]) -> Iterator[tuple[OutputTensor, object]]:
    """(entry, data) in layout order, reading up to PREFETCH_DEPTH tensors ahead.

    Raw bytes for plain copies (no decode, no copy), tensors otherwise.
    """

    def load(entry: OutputTensor):
        return base.read_bytes(entry.name) if entry.action == "copy" else base.read(entry.name)

    return prefetched(layout, load, PREFETCH_DEPTH)


def _check_base_matches_plan(base: SafetensorsFile, target: BakeTarget) -> None:
    for key, applications in target.applications.items():
        if key not in base:
            raise BuildError(
                f"{base.path}: the base changed since planning: tensor {key} (targeted by "
                f"{applications[0].module.name}) is missing. Re-run the build."
            )


def _output_metadata(plan: BuildPlan, target: BakeTarget) -> dict[str, str]:
    return checkpoint_metadata(
        target.architecture,
        title=output_title(plan.loaded, target.name),
        date=release_date(plan.loaded.recipe.date),
        merged_from=[*_started_from(target), *(i.use for i in target.ingredients)],
        provenance={**provenance_fields(plan, target), **({"merge": target.merge.provenance_json()} if target.merge else {})},
    )


def _started_from(target: BakeTarget) -> list[str]:
    return [m.name for m in target.merge.models] if target.merge is not None else [target.base]
