"""The device class of a target: the part of the device that can change SVD bytes.

CPU LAPACK and GPU cuSOLVER round differently, so SVD-based outputs are
byte-identical within one class and within a tolerance across classes
(docs/reproducibility.md). "auto" is the class it will run on here.
"""

from __future__ import annotations

import torch


def device_class(device: str) -> str:
    """"cpu" or "cuda" for a recipe/CLI device string (auto | cpu | cuda | cuda:N)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if device.startswith("cuda") else "cpu"
