"""A BuildPlan as plain JSON-ready data (for `plan --json` and the rich view)."""

from __future__ import annotations

from loraforge.plan.extract import ExtractionTarget
from loraforge.plan.merge import MergeTarget
from loraforge.plan.model import BakeTarget, BuildPlan
from loraforge.plan.release import ReleaseTarget
from loraforge.plan.status import target_state


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
        "targets": [_target_report(target, plan.state.get(target.name)) for target in plan.targets],
        "not_selected": list(plan.skipped),
    }


def _target_report(target, state: str | None) -> dict:
    if isinstance(target, ExtractionTarget):
        report = _extract_report(target)
    elif isinstance(target, MergeTarget):
        report = _merge_report(target)
    elif isinstance(target, ReleaseTarget):
        report = _release_report(target)
    else:
        report = _bake_report(target)
    report["status"] = state or target_state(target, None)
    return report


def _common(target, kind: str) -> dict:
    """The fields every target kind reports."""
    return {
        "name": target.name,
        "kind": kind,
        "status": None,  # filled in by _target_report from the plan's states
        "architecture": target.architecture.name,
        "output": str(target.output),
        "save_dtype": target.save,
        "device": target.device,
        "depends_on": list(target.dependencies),
        "action_key": target.action_key,
        "read_bytes": target.read_bytes,
        "write_bytes": target.write_bytes,
    }


def _merge_report(target: MergeTarget) -> dict:
    spec = lambda rank: None if rank is None else rank.model_dump(exclude_none=True)  # noqa: E731
    return {
        **_common(target, "lora"),
        "method": target.method,
        "report": str(target.report_path),
        "rank": spec(target.rank),
        "conv_rank": spec(target.conv_rank),
        "dense_svd": target.dense_svd,
        "clamp_quantile": target.clamp_quantile,
        "modules": len(target.modules),
        "conv_modules": sum(1 for m in target.modules if m.is_conv),
        "dense_modules": sum(1 for m in target.modules if m.dense),
        "modules_per_block": target.modules_per_block(),
        "loras": [_ingredient_report(ingredient) for ingredient in target.ingredients],
    }


def _extract_report(target: ExtractionTarget) -> dict:
    spec = lambda rank: None if rank is None else rank.model_dump(exclude_none=True)  # noqa: E731
    return {
        **_common(target, "extract"),
        "tuned": target.tuned.name,
        "base": target.base.name,
        "report": str(target.report_path),
        "rank": spec(target.rank),
        "conv_rank": spec(target.conv_rank),
        "svd": target.svd,
        "text_encoder": target.text_encoder,
        "min_diff": target.min_diff,
        "candidate_modules": len(target.modules),
        "modules_per_block": target.modules_per_block(),
        "text_encoder_modules_missing": list(target.missing_text_encoder),
    }


def _release_report(target: ReleaseTarget) -> dict:
    """A release has no architecture or dtype: its folder, the files it bundles and what they were read from."""
    return {
        "name": target.name,
        "kind": "release",
        "status": None,  # filled in by _target_report from the plan's states
        "output": str(target.output),
        "manifest": str(target.identity_path),
        "device": target.device,
        "depends_on": list(target.dependencies),
        "action_key": target.action_key,
        "read_bytes": target.read_bytes,
        "write_bytes": target.write_bytes,
        "includes": [
            {"target": e.target, "kind": e.kind, "file": e.file_name, "report": e.report_path.name if e.report_path else None}
            for e in target.included
        ],
        "inputs": list(target.inputs),
        "readme": target.readme,
    }


def _bake_report(target: BakeTarget) -> dict:
    return {
        **_common(target, "checkpoint"),
        "base": target.base,
        "weights_baked": len(target.applications),
        "modules_per_block": target.modules_per_block(),
        "loras": [_ingredient_report(ingredient) for ingredient in target.ingredients],
    }


def _ingredient_report(ingredient) -> dict:
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
    }
