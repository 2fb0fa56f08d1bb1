"""One rebuilt target against the lock and the file on disk: the verdict and its reasons.

Rules (docs/reproducibility.md, "Verifying a build"):

* bake, concat, and any other non-SVD step: the rebuild must have the
  lock's sha256 (byte-identical);
* an SVD step (merge ``method: svd``, resize, extract) rebuilt in the
  numeric environment the lock records (plan/numeric_environment.py:
  device class, BLAS, CPU vendor and SIMD level or GPU, BLAS settings,
  torch): byte-identical too;
* an SVD step rebuilt in another numeric environment (or locked without
  one, by an older loraforge), and any target that reads a target which
  reproduced only within tolerance: every module of the rebuild must be
  within the lock entry's ``tolerance.relative_error`` of the locked file
  on disk (which must itself have the lock's sha256).

In every case the output on disk, when present, must have the lock's sha256.
Whenever something differs and both files are there, they are compared
tensor by tensor so the verdict can name the modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loraforge.errors import FormatError
from loraforge.formats.hashing import file_sha256
from loraforge.verify.files import FileDifference, compare_files
from loraforge.verify.report import (
    BYTE_IDENTICAL,
    DIFFERS,
    NOT_LOCKED,
    REPRODUCED,
    TOLERANCE,
    WITHIN_TOLERANCE,
    TargetVerdict,
)


@dataclass(frozen=True)
class Rebuilt:
    """What verify knows about one target before judging it."""

    name: str
    operation: str
    lora: bool  # the output is a LoRA (modules are key prefixes) rather than a checkpoint
    architecture: object  # Architecture or None: maps checkpoint keys to modules
    rebuilt_path: Path  # in the temporary folder
    rebuilt_sha256: str
    on_disk_path: Path  # where the build would have put it
    output: str  # on_disk_path relative to the recipe, for messages
    device_class: str
    rule: str  # BYTE_IDENTICAL or TOLERANCE
    tolerance: float | None
    why_tolerance: str | None  # the reason the tolerance rule applies
    action_key: str | None = None  # as planned now
    environment: object = None  # NumericEnvironment of an SVD step's rebuild, None for other steps
    why_identical: str | None = None  # an SVD step in the lock's environment: said when its bytes differ


def judge(rebuilt: Rebuilt, entry: dict | None) -> TargetVerdict:
    if entry is None:
        return _verdict(rebuilt, entry, NOT_LOCKED, (f"'{rebuilt.name}' is not in the lock: build it once and commit the lock.",), None, None)
    locked = entry.get("sha256")
    on_disk = file_sha256(rebuilt.on_disk_path) if rebuilt.on_disk_path.is_file() else None
    reasons = []
    if rebuilt.why_tolerance:
        reasons.append(rebuilt.why_tolerance)
    if rebuilt.rebuilt_sha256 != locked:
        reasons.append(f"rebuilt sha256 {_short(rebuilt.rebuilt_sha256)} differs from the lock's {_short(locked)}")
        if rebuilt.why_identical:
            reasons.append(rebuilt.why_identical)
        if rebuilt.action_key and entry.get("action_key") not in (None, rebuilt.action_key) and not rebuilt.why_tolerance:
            reasons.append("its action key differs from the lock's too: the target's recipe entry, precision, "
                           "inputs or the loraforge version changed since the locked build")
    if on_disk is None:
        reasons.append(f"{rebuilt.output} is not present here; only the rebuild was checked against the lock")
    elif on_disk != locked:
        reasons.append(f"{rebuilt.output} on disk (sha256 {_short(on_disk)}) differs from the lock's {_short(locked)}")
    difference = None
    if on_disk is not None and (rebuilt.rebuilt_sha256 != locked or on_disk != locked):
        difference = _compare(rebuilt)
    status = _status(rebuilt, locked, on_disk, difference, reasons)
    return _verdict(rebuilt, entry, status, tuple(reasons), on_disk, difference)


def _status(rebuilt: Rebuilt, locked, on_disk, difference: FileDifference | None, reasons: list[str]) -> str:
    disk_ok = on_disk is None or on_disk == locked
    if rebuilt.rebuilt_sha256 == locked and disk_ok:
        return REPRODUCED
    if rebuilt.rule != TOLERANCE:
        return DIFFERS
    if on_disk is None:
        reasons.append("the tolerance rule needs the locked output to compare with")
        return DIFFERS
    if not disk_ok or difference is None:
        return DIFFERS
    outside = difference.out_of_tolerance(rebuilt.tolerance or 0.0)
    if outside:
        reasons.append(f"{len(outside)} of {len(difference.modules)} differing modules exceed the tolerance {rebuilt.tolerance:.3g}")
        return DIFFERS
    reasons.append(f"all {len(difference.modules)} differing modules are within the tolerance {rebuilt.tolerance:.3g}")
    return WITHIN_TOLERANCE


def _compare(rebuilt: Rebuilt) -> FileDifference | None:
    """Tensor by tensor, when both are safetensors files (a release manifest is not)."""
    try:
        return compare_files(rebuilt.rebuilt_path, rebuilt.on_disk_path, lora=rebuilt.lora, architecture=rebuilt.architecture)
    except FormatError:
        return None


def _verdict(rebuilt: Rebuilt, entry, status, reasons, on_disk, difference) -> TargetVerdict:
    return TargetVerdict(
        name=rebuilt.name,
        operation=rebuilt.operation,
        rule=rebuilt.rule,
        status=status,
        reasons=reasons,
        output=rebuilt.output,
        device_class=rebuilt.device_class,
        locked_device_class=(entry or {}).get("device_class"),
        environment=rebuilt.environment.to_json() if rebuilt.environment is not None else None,
        locked_environment=(entry or {}).get("numeric_environment") if rebuilt.environment is not None else None,
        tolerance=rebuilt.tolerance if rebuilt.rule == TOLERANCE else None,
        locked_sha256=(entry or {}).get("sha256"),
        rebuilt_sha256=rebuilt.rebuilt_sha256,
        on_disk_sha256=on_disk,
        difference=difference,
    )


def _short(sha: str | None) -> str:
    return f"{sha[:12]}…" if sha else "(none)"


__all__ = ["BYTE_IDENTICAL", "Rebuilt", "judge"]
