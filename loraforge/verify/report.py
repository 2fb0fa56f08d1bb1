"""What ``verify`` found: input drift, and one verdict per rebuilt target (plain data, JSON-ready)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from loraforge.verify.files import FileDifference

REPRODUCED, WITHIN_TOLERANCE, DIFFERS, NOT_LOCKED = "reproduced", "within tolerance", "differs", "not in lock"
BYTE_IDENTICAL, TOLERANCE = "byte-identical", "tolerance"


@dataclass(frozen=True)
class InputDrift:
    """An input whose file no longer has the sha256 the lock recorded."""

    name: str
    locked_sha256: str
    current_sha256: str
    readers: tuple[str, ...]  # targets that read it, directly or through another target

    def to_json(self) -> dict:
        return {"input": self.name, "locked_sha256": self.locked_sha256, "sha256": self.current_sha256,
                "targets": list(self.readers)}


@dataclass(frozen=True)
class TargetVerdict:
    name: str
    operation: str  # "bake", "merge (concat)", "merge (svd)", "extract", …
    rule: str  # BYTE_IDENTICAL or TOLERANCE
    status: str  # REPRODUCED, WITHIN_TOLERANCE, DIFFERS, NOT_LOCKED
    reasons: tuple[str, ...]
    output: str  # the output path relative to the recipe
    device_class: str  # the class this rebuild ran on
    locked_device_class: str | None
    tolerance: float | None  # per-module relative error allowed (TOLERANCE rule only)
    locked_sha256: str | None
    rebuilt_sha256: str
    on_disk_sha256: str | None  # None when the output is not present
    difference: FileDifference | None = None  # rebuilt vs on-disk, when they were compared
    environment: dict | None = None  # SVD steps: the numeric environment of this rebuild
    locked_environment: dict | None = None  # SVD steps: the one the lock records (None: not recorded)

    @property
    def ok(self) -> bool:
        return self.status in (REPRODUCED, WITHIN_TOLERANCE)

    def modules(self, only_out_of_tolerance: bool = False) -> tuple[str, ...]:
        if self.difference is None:
            return ()
        modules = self.difference.modules
        if only_out_of_tolerance and self.tolerance is not None:
            modules = self.difference.out_of_tolerance(self.tolerance)
        return tuple(m.module for m in modules)

    def to_json(self) -> dict:
        return {
            "target": self.name,
            "operation": self.operation,
            "rule": self.rule,
            "status": self.status,
            "ok": self.ok,
            "reasons": list(self.reasons),
            "output": self.output,
            "device_class": self.device_class,
            "locked_device_class": self.locked_device_class,
            "numeric_environment": {"lock": self.locked_environment, "rebuilt": self.environment},
            "tolerance": self.tolerance,
            "sha256": {"lock": self.locked_sha256, "rebuilt": self.rebuilt_sha256, "on_disk": self.on_disk_sha256},
            "difference": self.difference.to_json(self.tolerance) if self.difference else None,
        }


@dataclass(frozen=True)
class VerifyReport:
    recipe: Path
    lock: Path
    drift: tuple[InputDrift, ...]
    targets: tuple[TargetVerdict, ...]
    notes: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.drift and all(v.ok for v in self.targets)

    def to_json(self) -> dict:
        return {
            "recipe": str(self.recipe),
            "lock": str(self.lock),
            "ok": self.ok,
            "notes": list(self.notes),
            "input_drift": [d.to_json() for d in self.drift],
            "targets": [v.to_json() for v in self.targets],
        }
