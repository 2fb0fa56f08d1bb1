"""A BuildPlan as plain JSON-ready data (for `plan --json` and the rich view).

The fields every target has come from here; each kind adds its own
(``TargetKind.report``, loraforge/targets/).
"""

from __future__ import annotations

from loraforge.plan.model import BuildPlan
from loraforge.plan.status import target_state
from loraforge.plan.target import PlannedTarget


def plan_report(plan: BuildPlan) -> dict:
    return {
        "recipe": str(plan.loaded.path),
        "inputs": {
            name: {
                "source": resolved.source,
                "path": str(resolved.path),
                "size": resolved.size,
                "sha256": plan.input_sha256[name],
            }
            for name, resolved in sorted(plan.inputs.items())
        },
        "targets": [_target_report(plan, target) for target in plan.targets],
        "not_selected": list(plan.skipped),
        "matrices": _matrices_report(plan),
    }


def _matrices_report(plan: BuildPlan) -> list[dict]:
    """Each ``matrix:`` target's grid (recipe/matrix.py): its axes and its planned variants."""
    planned = {target.name for target in plan.targets}
    return [
        {
            "target": matrix.target,
            "axes": [{"path": axis.key, "label": axis.label, "values": list(axis.values)} for axis in matrix.axes],
            "variants": [name for name in matrix.variants if name in planned],
        }
        for matrix in plan.loaded.matrices.values()
        if any(name in planned for name in matrix.variants)
    ]


def _target_report(plan: BuildPlan, target: PlannedTarget) -> dict:
    report = plan.kinds.of(target).report(target)
    report["status"] = plan.state.get(target.name) or target_state(target, None)
    return report


def common_fields(target: PlannedTarget, **middle) -> dict:
    """The fields every target kind reports, in their usual order; ``middle`` (a model's architecture
    and save dtype, a bundle's manifest) goes between the output and the device."""
    fields = {"name": target.name, "kind": target.kind, "status": None}  # status: filled in by plan_report
    if "architecture" in middle:
        fields["architecture"] = middle.pop("architecture")
    return {
        **fields,
        "output": str(target.output),
        **middle,
        "device": target.device,
        "depends_on": list(target.dependencies),
        "action_key": target.action_key,
        "read_bytes": target.read_bytes,
        "write_bytes": target.write_bytes,
    }


def model_fields(target) -> dict:
    """common_fields of a target that writes a model file (checkpoint or LoRA)."""
    return common_fields(target, architecture=target.architecture.name, save_dtype=target.save)


def ingredient_report(ingredient) -> dict:
    """One `loras:` entry of a bake or merge."""
    return {
        "use": ingredient.use,
        "path": str(ingredient.path),
        "adapter_kind": ingredient.adapter.kind,
        "strength": ingredient.strength,
        "te": ingredient.te,
        "block_weights": dict(ingredient.blocks.weights),
        "modules": len(ingredient.adapter.modules),
        "matched": ingredient.matched,
        "applied": ingredient.applied,
        "modules_per_block": dict(ingredient.blocks_used),
        "unmatched": list(ingredient.unmatched),
        "not_in_base": list(ingredient.not_in_base),
    }
