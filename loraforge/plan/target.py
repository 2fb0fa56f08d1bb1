"""What every planned target has, whatever its kind: the frozen record the executor, the lock,
`plan --json`, `verify` and releases read.

Each kind's planned target (BakeTarget, MergeTarget, ExtractionTarget,
ReleaseTarget, ...) extends it with what only that kind needs. Optional
behaviour is declared here with a default, never probed with getattr: a
kind whose output is a LoRA says ``produces = "lora"`` and implements
``lora_adapter``; a kind whose bytes depend on the device class overrides
``device_class``; a kind of several files overrides ``intact``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping

# What a target's output is: a checkpoint file, a LoRA file, or a bundle folder.
Produces = Literal["checkpoint", "lora", "bundle"]
PRODUCT_WORDS = {"checkpoint": "checkpoint", "lora": "LoRA", "bundle": "release folder"}  # for messages


@dataclass(frozen=True, kw_only=True)
class PlannedTarget:
    kind: ClassVar[str]  # the recipe's `kind:` (the TargetKind that planned it)
    produces: ClassVar[Produces]

    name: str
    output: Path  # the file (or bundle folder) written
    device: str  # "auto" | "cpu" | "cuda" | "cuda:N"
    dependencies: tuple[str, ...]  # targets that must be built first
    action_key: str | None  # None while a target it reads is not built yet
    read_bytes: int
    write_bytes: int  # what progress counts towards (an upper bound for LoRAs of adaptive rank)
    memory_bytes: int  # estimated peak memory while building (for --jobs)
    architecture: Any = None  # formats.arch Architecture of the output; None for bundles
    report_path: Path | None = None  # a JSON report written next to the output (merge, extract)
    identity_path: Path | None = None  # the file the lock records when it is not ``output`` (a bundle's manifest)
    # sha256 of every input and target output it reads (provenance); None while a producer is unbuilt.
    # Filled by plan/planner.py for every kind, so a runner never asks the plan for it.
    read_hashes: Mapping[str, str] | None = None

    @property
    def device_class(self) -> str | None:
        """The device class the output's bytes depend on (SVD steps); None when they depend on none."""
        return None

    def recorded_path(self) -> Path:
        """The file whose sha256 and size the lock records."""
        return Path(self.identity_path or self.output)

    def intact(self) -> bool:
        """For outputs of several files: whether the rest is as recorded (checked once the recorded file matches)."""
        return True

    def checkpoint_structure(self):
        """Kinds that produce a checkpoint: (a file with the output's tensor names and shapes that can be read
        now, its formats.arch Detection or None when no known family fits, the dtype code its float tensors are
        saved in or "same" for that file's), so readers plan before it is built."""
        raise TypeError(f"a `kind: {self.kind}` target produces a {PRODUCT_WORDS[self.produces]}, not a checkpoint")

    # Kinds that produce a LoRA (``produces = "lora"``) implement these two.
    def lora_adapter(self):
        """The output as a bake that uses it will see it, before it is built: formats.adapters AdapterFile."""
        raise TypeError(f"a `kind: {self.kind}` target produces a {PRODUCT_WORDS[self.produces]}, not a LoRA")

    @property
    def lora_dtype(self) -> str:
        """The safetensors dtype code of the LoRA's factors."""
        raise TypeError(f"a `kind: {self.kind}` target produces a {PRODUCT_WORDS[self.produces]}, not a LoRA")
