"""Every target kind, in one list: the recipe's `kind:` values, in the order docs and errors list them.

A new kind is a module in this package (a TargetKind: plan/kinds.py), its
recipe model in recipe/schema.py's TARGET_SPECS, and one line here.
"""

from __future__ import annotations

from loraforge.plan.kinds import TargetKinds
from loraforge.targets.checkpoint import CheckpointKind
from loraforge.targets.convert import ConvertKind
from loraforge.targets.extract import ExtractKind
from loraforge.targets.lora import LoraKind
from loraforge.targets.release import ReleaseKind

TARGET_KINDS = TargetKinds((CheckpointKind(), ExtractKind(), LoraKind(), ReleaseKind(), ConvertKind()))
