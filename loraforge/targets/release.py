"""`kind: release`: other targets' outputs bundled with a manifest and a model card
(plan/release.py, execute/release.py). Computes nothing, so it has no numeric policy."""

from __future__ import annotations

from loraforge.execute.release import run_release
from loraforge.plan.kinds import TargetKind
from loraforge.plan.release import ReleaseTarget, plan_release
from loraforge.plan.report import common_fields
from loraforge.recipe.schema import ReleaseSpec
from loraforge.targets.describe import summarised_result_lines
from loraforge.text import human_bytes


class ReleaseKind(TargetKind):
    name = "release"
    spec = ReleaseSpec
    summary = "bundle outputs with manifest.json, the recipe, its lock and a README.md model card"

    def plan(self, context, name: str) -> ReleaseTarget:
        return plan_release(context, name)

    def run(self, target: ReleaseTarget, run):
        return run_release(run.plan, target, None, run.progress, lock=run.lock)

    def report(self, target: ReleaseTarget) -> dict:
        """A release has no architecture or dtype: its folder, the files it bundles and what they were read from."""
        return {
            **common_fields(target, manifest=str(target.identity_path)),
            "includes": [
                {"target": e.target, "kind": e.kind, "file": e.file_name, "report": e.report_path.name if e.report_path else None}
                for e in target.included
            ],
            "inputs": list(target.inputs),
            "readme": target.readme,
        }

    def describe(self, report) -> list:
        return [
            f"folder: {report['output']}  (manifest.json{', README.md' if report['readme'] else ''}, recipe, lock)",
            *(
                f"[bold]{e['target']}[/] ({e['kind']}): {e['file']}" + (f" + {e['report']}" if e["report"] else "")
                for e in report["includes"]
            ),
            f"inputs recorded: {', '.join(report['inputs']) or '-'}",
            f"bundles {human_bytes(report['write_bytes'])} (hard links where the filesystem allows, else copies)",
        ]

    def built_lines(self, result) -> list[str]:
        return summarised_result_lines(result)
