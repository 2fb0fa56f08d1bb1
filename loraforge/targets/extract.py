"""`kind: extract`: a LoRA/LoCon extracted from the difference of two checkpoints
(plan/extract.py, execute/extract.py)."""

from __future__ import annotations

from loraforge.execute.extract import run_extract
from loraforge.plan.extract import EXTRACT_NUMERIC_POLICY, ExtractionTarget, plan_extract
from loraforge.plan.kinds import TargetKind
from loraforge.plan.report import model_fields
from loraforge.recipe.schema import ExtractTarget
from loraforge.targets.describe import loader_lines, output_line, summarised_result_lines
from loraforge.text import counts, human_bytes, listing


class ExtractKind(TargetKind):
    name = "extract"
    spec = ExtractTarget
    summary = "extract a LoRA/LoCon from tuned - base by truncated SVD"
    operation = "extract"
    numeric_policy = EXTRACT_NUMERIC_POLICY

    def plan(self, context, name: str) -> ExtractionTarget:
        return plan_extract(context, name)

    def run(self, target: ExtractionTarget, run):
        return run_extract(run.plan, target, run.resources.device, run.progress, run.resources)

    def report(self, target: ExtractionTarget) -> dict:
        spec = lambda rank: None if rank is None else rank.model_dump(exclude_none=True)  # noqa: E731
        return {
            **model_fields(target),
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
            "modules_kept": target.module_set,  # "all" | "kohya"
            "format": target.format,  # "kohya" | "diffusers": the names the output is written by
            "left_out_for_loaders": list(target.left_out_for_loaders),
            "loader_skips": target.loader_skips(),  # {loader: [modules]}; null where not known
        }

    def describe(self, report) -> list:
        after = f"  (after {', '.join(report['depends_on'])})" if report["depends_on"] else ""
        conv = counts(report["conv_rank"]) if report["conv_rank"] else "skip 3x3 convs"
        lines = [
            f"tuned: {report['tuned']} - base: {report['base']}{after}",
            output_line(report),
            f"rank: {counts(report['rank'])}; conv rank: {conv}; svd: {report['svd']}; "
            f"text encoder: {report['text_encoder']}; min_diff: {report['min_diff']:g}",
            f"reads {human_bytes(report['read_bytes'])}, writes at most {human_bytes(report['write_bytes'])}; "
            f"{report['candidate_modules']} candidate modules (unchanged ones are skipped at build time)",
            f"modules per block: {counts(report['modules_per_block'])}",
            *loader_lines(report),
        ]
        if report["text_encoder_modules_missing"]:
            lines.append(f"[yellow]text-encoder modules missing from a checkpoint: {listing(report['text_encoder_modules_missing'])}[/]")
        return lines

    def built_lines(self, result) -> list[str]:
        return summarised_result_lines(result)

