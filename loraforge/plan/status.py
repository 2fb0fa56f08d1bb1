"""Whether a target's output on disk is already what the plan would build."""

from __future__ import annotations

from loraforge.errors import FormatError
from loraforge.formats.safetensors_reader import open_safetensors
from loraforge.plan.model import BakeTarget

ACTION_KEY = "loraforge.action_key"


def output_status(target: BakeTarget) -> str:
    """"up to date", "stale" (built from other inputs or settings, or unreadable) or "missing"."""
    if not target.output.exists():
        return "missing"
    try:
        with open_safetensors(target.output) as output:
            built_key = output.metadata.get(ACTION_KEY)
    except FormatError:
        return "stale"
    return "up to date" if built_key == target.action_key else "stale"
