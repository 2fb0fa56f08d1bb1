"""The adapter kinds, in one list: every suffix table, scale rule, label and ΔW comes from here.

Each kind is a class in its own module (lora.py, peft.py, loha.py, lokr.py,
diff.py) fulfilling :class:`loraforge.formats.adapters.kind.AdapterKind`;
DoRA is a decoration any kind with ``takes_dora`` may carry (dora.py). A new
kind is a new module with its class, added to ``ADAPTER_KINDS``.
"""

from __future__ import annotations

from .diff import DiffKind
from .kind import AdapterKind
from .loha import LohaKind
from .lokr import LokrKind
from .lora import LoraKind
from .model import AdapterModule
from .peft import PeftKind

# Suffix families in parse order; lora and peft are both kind "lora".
ADAPTER_KINDS: tuple[AdapterKind, ...] = (LoraKind(), PeftKind(), LohaKind(), LokrKind(), DiffKind())
_BY_FAMILY = {kind.family: kind for kind in ADAPTER_KINDS}
_BY_KIND: dict[str, AdapterKind] = {}
for _kind in ADAPTER_KINDS:
    _BY_KIND.setdefault(_kind.name, _kind)  # the first family of a kind speaks for it


def adapter_kind(name: str) -> AdapterKind:
    """The kind a parsed module records (``AdapterModule.kind``)."""
    return _BY_KIND[name]


def suffix_family(family: str) -> AdapterKind:
    """The kind that owns a suffix family ("lora", "peft", "loha", "lokr", "diff")."""
    return _BY_FAMILY[family]


def module_label(module: AdapterModule) -> str:
    """The file-kind word one module stands for."""
    return adapter_kind(module.kind).label(module)


def describe_kind(modules: tuple[AdapterModule, ...]) -> str:
    """One word for the whole file.

    Each module has a label: LoRA-family modules are "DoRA" when they carry a
    dora_scale, else "PEFT LoRA" with diffusers names, else "LoCon" when they
    adapt a k×k conv or use a Tucker core, else "LoRA"; other kinds are "LoHa",
    "LoKr", "diff". LoRA and LoCon labels together make "LoCon" (a LoCon file
    has both); DoRA and LoRA/LoCon together make "DoRA". One label left names
    the file; several give "mixed (A, B)" in sorted order.
    """
    labels = {module_label(m) for m in modules}
    if labels >= {"LoRA", "LoCon"}:
        labels.discard("LoRA")
    if "DoRA" in labels:
        labels -= {"LoRA", "LoCon"}
    if not labels:
        return "empty"
    if len(labels) == 1:
        return next(iter(labels))
    return f"mixed ({', '.join(sorted(labels))})"
