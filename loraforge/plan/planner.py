"""Recipe -> BuildPlan: resolve names, order targets, then plan each target by its kind.

Planning reads only safetensors headers and the (small) adapter files' alpha
values; it computes nothing. Every problem a user can fix is reported here,
with the recipe line, before a single output byte is written. What a target
kind plans lives in its TargetKind (plan/kinds.py contract; the kinds are in
loraforge/targets/), handed in as ``kinds``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from loraforge.errors import PlanError
from loraforge.plan.context import BuiltOutput, PlanContext
from loraforge.plan.kinds import TargetKinds
from loraforge.plan.model import BuildPlan
from loraforge.plan.outputs import checked_output_path
from loraforge.plan.status import UP_TO_DATE, target_state
from loraforge.plan.target import PlannedTarget
from loraforge.recipe.loader import LoadedRecipe
from loraforge.resolve.local import ResolvedInput
from loraforge.resolve.lockfile import lock_path, read_lock
from loraforge.resolve.resolver import ResolveOptions, resolve_inputs


def plan_build(
    loaded: LoadedRecipe,
    selected: Sequence[str] = (),
    resolve: ResolveOptions | None = None,
    *,
    kinds: TargetKinds,
    device: str | None = None,
    output_dir: Path | None = None,
) -> BuildPlan:
    """Plan the selected targets (all when none are named) and what they depend on.

    ``resolve`` says how inputs may be fetched (--offline, --locked, progress);
    ``kinds`` is the target-kind registry (loraforge/targets/registry.py);
    ``device`` is the command line's --device (it decides the device class of
    SVD steps); ``output_dir`` sends every output there instead (verify).
    """
    recipe = loaded.recipe
    order = _dependency_order(loaded)
    wanted = _with_dependencies(loaded, selected or order)
    order = [name for name in order if name in wanted]
    resolve = replace(resolve or ResolveOptions(), numeric_policies=kinds.numeric_policies())
    inputs = _locate_inputs(loaded, order, resolve)
    input_sha256 = {name: inputs[name].sha256 for name in sorted(inputs)}
    _check_outputs(loaded, inputs, order)
    lock = read_lock(lock_path(loaded.path))
    context = PlanContext(
        loaded, inputs, input_sha256, planned={}, kinds=kinds, output_dir=output_dir, device=device,
        lock_targets=dict(lock.targets) if lock else {},
    )
    state = {}
    for name in order:
        target, state[name] = plan_target(context, name)
        context.planned[name] = target
        if state[name] == UP_TO_DATE:  # an up-to-date output counts as built: its readers plan from the file
            context.built[name] = BuiltOutput(target.output, context.lock_targets[name]["sha256"])
    skipped = tuple(name for name in recipe.targets if name not in wanted)
    planned = tuple(context.planned[n] for n in order)
    return BuildPlan(loaded, inputs, input_sha256, planned, kinds, skipped, state, context, lock)


def plan_target(context: PlanContext, name: str) -> tuple[PlannedTarget, str]:
    """Plan one target with its kind, and its state (plan/status.py); changes nothing.

    The sha256 of everything it reads is recorded on the target here, for
    every kind, so a runner's provenance never asks the plan.
    """
    kind = context.kinds.get(context.loaded.recipe.targets[name].kind)
    target = replace(kind.plan(context, name), read_hashes=context.input_hashes(name))
    return target, target_state(target, context.lock_targets.get(name))


def replan_target(
    plan: BuildPlan, name: str, planned: Mapping[str, PlannedTarget], built: Mapping[str, BuiltOutput]
) -> tuple[PlannedTarget, str]:
    """Target ``name`` planned again once the targets it reads are built (``built``: their real outputs).

    A pure function of the plan and its arguments: the build (execute/state.py)
    keeps what was built and calls this when a producer's output changed.
    """
    context = replace(plan.context, planned=dict(planned), built=dict(built))
    return plan_target(context, name)


# --- target graph ------------------------------------------------------------


def _dependency_order(loaded: LoadedRecipe) -> list[str]:
    """Targets in an order where each comes after the targets it reads.

    Ties keep recipe order, so the order (and so every log) is reproducible.
    """
    recipe = loaded.recipe
    for name in recipe.targets:
        for dep in recipe.dependencies(name):
            if dep in loaded.matrices:
                raise loaded.error(
                    _reference_path(loaded, name, dep),
                    f"'{dep}' is a matrix of {len(loaded.matrices[dep].variants)} variants, not one target.",
                    f"name the variant to read, e.g. {loaded.matrices[dep].variants[0]}",
                )
            if dep not in recipe.inputs and dep not in recipe.targets:
                raise loaded.error(
                    _reference_path(loaded, name, dep),
                    f"'{dep}' is neither an input nor a target of this recipe.",
                    f"Define it under `inputs:` or `targets:`, or fix the name "
                    f"(inputs: {_names(recipe.inputs)}; targets: {_names(recipe.targets)}).",
                )
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, chain: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = chain[chain.index(name):] + [name]
            raise loaded.error(
                ("targets", name),
                f"targets form a cycle: {' -> '.join(cycle)}.",
                "A target cannot (directly or indirectly) read its own output; break the cycle.",
            )
        state[name] = "visiting"
        for dep in recipe.dependencies(name):
            if dep in recipe.targets:
                visit(dep, chain + [name])
        state[name] = "done"
        order.append(name)

    for name in recipe.targets:
        visit(name, [])
    return order


def _with_dependencies(loaded: LoadedRecipe, names: Iterable[str]) -> set[str]:
    recipe = loaded.recipe
    wanted: set[str] = set()
    # A matrix target's name selects all its variants (recipe/matrix.py).
    stack = [variant for name in names for variant in (loaded.matrices[name].variants if name in loaded.matrices else (name,))]
    while stack:
        name = stack.pop()
        if name not in recipe.targets:
            raise PlanError(
                f"{loaded.path}: there is no target named '{name}'. "
                f"Targets in this recipe: {_names(recipe.targets)}."
            )
        if name not in wanted:
            wanted.add(name)
            stack.extend(d for d in recipe.dependencies(name) if d in recipe.targets)
    return wanted


def _reference_path(loaded: LoadedRecipe, target: str, ref: str) -> tuple:
    """The recipe field that names `ref` inside `target` (for error positions)."""
    spec = loaded.recipe.targets[target]
    return ("targets", target, *spec.reference_path(ref))


def _names(mapping) -> str:
    return ", ".join(sorted(mapping)) or "(none)"


# --- inputs and outputs ------------------------------------------------------


def _locate_inputs(loaded: LoadedRecipe, order: Sequence[str], resolve: ResolveOptions | None) -> dict[str, ResolvedInput]:
    """Local path + verified sha256 of every input the selected targets read (loraforge.resolve)."""
    recipe = loaded.recipe
    used = sorted({d for name in order for d in recipe.dependencies(name) if d in recipe.inputs})
    return resolve_inputs(loaded, used, resolve)


def _check_outputs(loaded: LoadedRecipe, inputs: dict[str, ResolvedInput], order: Sequence[str]) -> None:
    """Refuse outputs that would overwrite an input or another target's output."""
    recipe = loaded.recipe
    input_paths = {resolved.path: name for name, resolved in inputs.items()}
    seen: dict[Path, str] = {}
    for name in recipe.targets:
        output = recipe.output_path(name, loaded.root).resolve()
        if output in input_paths:
            raise loaded.error(
                ("targets", name, "output"),
                f"the output {output} is the file of input '{input_paths[output]}'; "
                "building would overwrite an input.",
                "Choose another `output:` path (the default is dist/<target>.safetensors).",
            )
        if output in seen:
            raise loaded.error(
                ("targets", name, "output"),
                f"targets '{seen[output]}' and '{name}' both write {output}.",
                "Give each target its own `output:` path.",
            )
        seen[output] = name
        checked_output_path(loaded, name)  # inside the recipe's folder (plan/outputs.py)
