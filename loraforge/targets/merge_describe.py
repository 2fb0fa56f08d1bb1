"""`plan` lines and `plan --json` fields of a checkpoint target's `merge:` (docs/merging-checkpoints.md)."""

from __future__ import annotations

from typing import Any, Mapping

from rich.markup import escape

from loraforge.text import human_bytes


def merge_report(merge) -> dict:
    """The merge's method, models, base, each parameter (a number, or per block) and what it reads."""
    names = [m.name for m in merge.models]
    return {
        "method": merge.method,
        "formula": merge.method_class.formula,
        "linear": merge.method_class.linear,
        "models": names[: len(names) - merge.has_base],
        "base": names[-1] if merge.has_base else None,
        "parameters": dict(merge.shown),
        "merged_tensors": len(merge.tensor_blocks),
        "taken_tensors": {names[i]: sum(1 for v in merge.taken.values() if v == i) for i in sorted(set(merge.taken.values()))},
        "read_bytes": merge.read_bytes(),
    }


def merge_lines(report: Mapping, after: str = "") -> list[str]:
    base = f" against base {report['base']}" if report["base"] else ""
    numerics = "correctly rounded" if report["linear"] else "float64, one rounding"
    taken = ", ".join(f"{count} from {name}" for name, count in report["taken_tensors"].items())
    lines = [
        f"merge: {report['method']} of {', '.join(report['models'])}{base}{after}  ({numerics})",
        f"  {escape(report['formula'])}",
        f"  {report['merged_tensors']} tensors merged" + (f", {taken} taken as they are" if taken else "")
        + f"; reads {human_bytes(report['read_bytes'])} of models",
    ]
    for name, value in report["parameters"].items():
        lines.append(f"  {name}: {escape(_value_text(value))}")
    return lines


def _value_text(value: Any) -> str:
    if isinstance(value, list):
        return "[" + "; ".join(_value_text(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return ", ".join(f"{block}={number:g}" for block, number in value.items())
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)
