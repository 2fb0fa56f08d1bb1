"""`kind: lora`: LoRA-family adapters merged (or resized) into one LoRA by a registered method
(loraforge/methods/; plan/merge.py, execute/merge.py)."""

from __future__ import annotations

from loraforge.execute.merge import run_merge
from loraforge.methods import lora_method
from loraforge.plan.kinds import TargetKind
from loraforge.plan.merge import MERGE_NUMERIC_POLICY, MergeTarget, plan_merge
from loraforge.plan.report import ingredient_report, model_fields
from loraforge.recipe.schema import LoraTarget
from loraforge.targets.describe import loader_lines, lora_entry_lines, output_line, summarised_result_lines
from loraforge.text import counts, human_bytes, rank_text


class LoraKind(TargetKind):
    name = "lora"
    spec = LoraTarget
    summary = "merge or resize LoRA-family adapters into one LoRA (methods: svd, concat)"
    operation = "merge"
    numeric_policy = MERGE_NUMERIC_POLICY

    def plan(self, context, name: str) -> MergeTarget:
        return plan_merge(context, name)

    def run(self, target: MergeTarget, run):
        return run_merge(run.plan, target, run.resources.device, run.progress, run.resources)

    def report(self, target: MergeTarget) -> dict:
        spec = lambda rank: None if rank is None else rank.model_dump(exclude_none=True)  # noqa: E731
        return {
            **model_fields(target),
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
            "loras": [ingredient_report(ingredient) for ingredient in target.ingredients],
            "modules_kept": target.module_set,  # "all" | "kohya"
            "format": target.format,  # "kohya" | "diffusers": the names the output is written by
            "left_out_for_loaders": list(target.left_out_for_loaders),
            "loader_skips": target.loader_skips(),  # {loader: [modules]}; null where not known
        }

    def heading(self, report) -> str:
        return f"lora {report['method']}, {report['architecture']}"

    def describe(self, report) -> list:
        lines = [f"after {', '.join(report['depends_on'])}"] if report["depends_on"] else []
        lines.append(output_line(report))
        if lora_method(report["method"]).parameters:  # a method that chooses ranks
            conv = rank_text(report["conv_rank"]) if report["conv_rank"] else "as rank"
            clamp = f"; clamp quantile {report['clamp_quantile']:g}" if report["clamp_quantile"] else ""
            lines.append(f"rank: {rank_text(report['rank'])}; conv rank: {conv}; dense svd: {report['dense_svd']}{clamp}")
        return [
            *lines,
            f"reads {human_bytes(report['read_bytes'])}, writes at most {human_bytes(report['write_bytes'])}; "
            f"{report['modules']} modules ({report['conv_modules']} conv, {report['dense_modules']} via dense ΔW)",
            f"modules per block: {counts(report['modules_per_block'])}",
            *loader_lines(report),
            *lora_entry_lines(report["loras"]),
        ]

    def built_lines(self, result) -> list[str]:
        return summarised_result_lines(result)

    def operation_label(self, target: MergeTarget) -> str:
        return f"merge ({target.method})"

