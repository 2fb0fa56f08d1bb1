"""Pickled checkpoints, harmless and malicious, made with torch.save.

``Payload`` is a pickle whose unpickling creates a marker file (through
``builtins.open``): what a real attack would do with ``os.system``. Loading it
with the full unpickler (``torch.load(weights_only=False)``) creates the
marker; loraforge must never.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


class Payload:
    """Unpickling calls open(marker, "w"): proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def zip_checkpoint(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """The A1111/Lightning layout: {"state_dict": ..., "global_step": ...} in torch's zip format."""
    torch.save({"state_dict": tensors, "global_step": 1000, "epoch": 3}, path)
    return path


def legacy_pickle(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A bare state dict in the pre-1.6 torch.save format (a plain pickle stream)."""
    torch.save(tensors, path, _use_new_zipfile_serialization=False)
    return path


def malicious(path: Path, marker: Path, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    torch.save({"state_dict": {**(tensors or {}), "evil": Payload(marker)}}, path)
    return path


def from_safetensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)
