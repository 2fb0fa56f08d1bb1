"""The output checkpoint's tensor layout, derived from the base's header.

Output tensors keep the base's order and names. Floating-point tensors are
saved in the recipe's save dtype (``same`` keeps each base dtype); integer,
boolean and float8 tensors are never converted. A tensor that no adapter
touches and whose dtype does not change is copied byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Collection

from loraforge.formats.dtypes import itemsize
from loraforge.formats.safetensors_reader import SafetensorsFile

CONVERTIBLE = ("F16", "BF16", "F32", "F64")


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: str  # output dtype code
    shape: tuple[int, ...]
    action: str  # "copy" (bytes unchanged) | "convert" (dtype only) | "bake" (weights change)

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * itemsize(self.dtype)


def output_dtype(base_dtype: str, save: str) -> str:
    return save if save != "same" and base_dtype in CONVERTIBLE else base_dtype


def output_layout(base: SafetensorsFile, save: str, baked: Collection[str] = ()) -> list[OutputTensor]:
    layout = []
    for name in base.names():
        info = base.info(name)
        dtype = output_dtype(info.dtype, save)
        if name in baked:
            action = "bake"
        else:
            action = "copy" if dtype == info.dtype else "convert"
        layout.append(OutputTensor(name, dtype, tuple(info.shape), action))
    return layout
