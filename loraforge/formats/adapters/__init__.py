"""Adapter files: kohya LoRA/LoCon, LyCORIS LoHa and LoKr, DoRA, full diffs, diffusers/PEFT.

``parse_adapter(file)`` reads a SafetensorsFile's header into an
:class:`AdapterFile` of :class:`AdapterModule` s; ``load_factors`` reads one
module's tensors; ``module_delta`` turns them into the dense ΔW of a target
shape (math in :mod:`loraforge.ops.deltas`); ``matching`` maps modules onto an
architecture. docs/adapters.md describes every format and convention.
"""

from .kinds import ADAPTER_KINDS, adapter_kind, describe_kind, module_label
from .model import AdapterFile, AdapterModule
from .parse import (
    dora_convention,
    load_factors,
    module_bias_delta,
    module_certificate,
    module_delta,
    module_dora_increment,
    module_effective_delta,
    module_low_rank,
    parse_adapter,
    split_key,
)

__all__ = [
    "ADAPTER_KINDS",
    "adapter_kind",
    "AdapterFile",
    "AdapterModule",
    "describe_kind",
    "dora_convention",
    "load_factors",
    "module_bias_delta",
    "module_certificate",
    "module_delta",
    "module_dora_increment",
    "module_effective_delta",
    "module_low_rank",
    "module_label",
    "parse_adapter",
    "split_key",
]
