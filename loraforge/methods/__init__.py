"""Merge methods: one class per method, in one registry (docs/design.md).

A method declares its recipe parameters, whether its bytes depend on the
numeric environment (SVD steps do), how it bounds each output module's rank,
and how it merges and rounds one module. The recipe schema, the planner, the
executor, `plan` rendering and the release card read these declarations
instead of comparing method names. ``kind: lora`` methods live in
:mod:`loraforge.methods.lora`; checkpoint-merge methods will join the same
registry.
"""

from loraforge.methods.base import MergeMethod
from loraforge.methods.lora import LORA_METHODS, lora_method

__all__ = ["LORA_METHODS", "MergeMethod", "lora_method"]
