"""Choosing the torch device a target runs on."""

from __future__ import annotations

import torch

from loraforge.errors import BuildError


def select_device(requested: str) -> torch.device:
    """Map a recipe/CLI device string to a torch device, failing clearly if it is absent."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cpu":
        return torch.device("cpu")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BuildError(
                f"device '{requested}' was requested but this torch build sees no CUDA GPU "
                f"(torch {torch.__version__}). Use `--device cpu` or `device: auto`, or install a CUDA build of torch."
            )
        device = torch.device(requested)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BuildError(
                f"device '{requested}' does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)."
            )
        return device
    raise BuildError(f"unknown device '{requested}': use auto, cpu, cuda or cuda:N.")
