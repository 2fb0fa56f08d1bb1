"""`kind: checkpoint`: LoRAs baked into a base checkpoint (plan/bake.py, execute/bake.py)."""

from __future__ import annotations

from loraforge.execute.bake import run_bake
from loraforge.plan.action_key import BAKE_NUMERIC_POLICY
from loraforge.plan.bake import ema_tensors_left, plan_bake, scaled_fp8_report
from loraforge.plan.kinds import TargetKind
from loraforge.plan.model import BakeTarget
from loraforge.plan.report import ingredient_report, model_fields
from loraforge.recipe.schema import CheckpointTarget
from loraforge.targets.describe import lora_entry_lines, output_line
from loraforge.targets.merge_describe import merge_lines, merge_report
from loraforge.text import counts, human_bytes


class CheckpointKind(TargetKind):
    name = "checkpoint"
    spec = CheckpointTarget
    summary = "bake LoRA-family adapters into a base checkpoint (correctly rounded)"
    operation = "bake"
    numeric_policy = BAKE_NUMERIC_POLICY

    def plan(self, context, name: str) -> BakeTarget:
        return plan_bake(context, name)

    def run(self, target: BakeTarget, run):
        return run_bake(run.plan, target, run.resources.device, run.progress, run.resources)

    def report(self, target: BakeTarget) -> dict:
        return {
            **model_fields(target),
            "base": target.base,
            "weights_baked": len(target.applications),
            "modules_per_block": target.modules_per_block(),
            "loras": [ingredient_report(ingredient) for ingredient in target.ingredients],
            **({"merge": merge_report(target.merge)} if target.merge is not None else {}),
            **({"ema_tensors_left": ema} if (ema := ema_tensors_left(target)) else {}),
            **({"scaled_fp8": scaled} if (scaled := scaled_fp8_report(target)) else {}),
        }

    def describe(self, report) -> list:
        after = f"  (after {', '.join(report['depends_on'])})" if report["depends_on"] else ""
        return [
            *(merge_lines(report["merge"], after) if "merge" in report else [f"base: {report['base']}{after}"]),
            output_line(report),
            f"reads {human_bytes(report['read_bytes'])}, writes {human_bytes(report['write_bytes'])}; "
            f"{report['weights_baked']} weights change",
            f"modules per block: {counts(report['modules_per_block'])}",
            *lora_entry_lines(report["loras"]),
            *([f"[yellow]warning: {report['ema_tensors_left']} EMA tensors (model_ema.*) left as they are: the LoRA is "
               "baked into model.diffusion_model.* only, so loaders that use the EMA weights (use_ema) see the base[/]"]
              if report.get("ema_tensors_left") else []),
            *(_scaled_lines(report["scaled_fp8"]) if report.get("scaled_fp8") else []),
        ]

    def built_lines(self, result) -> list[str]:
        written = result.written
        return [
            f"{human_bytes(written.size)}; " + (f"{result.merged_tensors} tensors merged, " if result.merged_tensors else "")
            + f"{result.baked_tensors} tensors baked, {result.copied_tensors} copied, {result.converted_tensors} converted",
            f"sha256 {written.sha256}",
            f"data sha256 {written.data_sha256}",
        ]

    def operation_label(self, target) -> str:
        return "bake"


def _scaled_lines(scaled: dict) -> list[str]:
    """plan's lines for a ComfyUI scaled-fp8 base (docs/baking.md, "Scaled fp8 bases")."""
    line = (f"scaled fp8 base: {scaled['scaled_weights']} weights stored as F8_E4M3 x scale_weight; "
            f"{scaled['baked']} baked, saved as {scaled['saved_as']}")
    if scaled["saved_as"].startswith("F8_E4M3") and scaled["baked"]:
        return [line, "[yellow]warning: the baked weights are requantised to F8_E4M3 (3 mantissa bits): a change below "
                "about 1/16 of a weight rounds back to it; `precision: {save: bfloat16}` keeps the whole change[/]"]
    return [line]
