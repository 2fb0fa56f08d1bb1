"""DoRA (weight-decomposed LoRA): a ``<name>.dora_scale`` next to any LoRA-family module.

The scale is a magnitude per output row ([out,1,…] from LyCORIS with
``wd_on_out``, or PEFT's ``lora_magnitude_vector`` [out]) or per input channel
([1,in,1,…], the LyCORIS default). The bake applies it with
:func:`loraforge.ops.deltas.dora_effective_delta` once the base weight is known;
here we only check at parse time that its shape can belong to the module.
"""

from __future__ import annotations

import math

from .kinds import adapter_kind
from .model import DORA_SCALE, AdapterModule, module_error


def check_dora_scale(path: str, module: AdapterModule) -> None:
    """Raise FormatError when the module's dora_scale fits neither orientation of its ΔW."""
    if not module.dora:
        return
    scale = tuple(module.shapes[DORA_SCALE])
    if not adapter_kind(module.kind).takes_dora:
        raise module_error(
            path, module.name, module.keys,
            "has a dora_scale on a full difference, which DoRA is not defined for",
            "Remove the dora_scale tensor or re-export the adapter.",
        )
    if _fits(module.delta_shape, scale):
        return
    raise module_error(
        path, module.name, module.keys,
        f"has {module.keys[DORA_SCALE]} of shape {list(scale)}, which is neither one magnitude per output row "
        f"([{module.delta_shape[0]}, 1, …]) nor one per input channel ([1, in, 1, …]) of its ΔW "
        f"{list(module.delta_shape)}",
        "The dora_scale belongs to another layer or the file is damaged; re-export the adapter.",
    )


def _fits(delta_shape: tuple[int, ...], scale: tuple[int, ...]) -> bool:
    if not scale:
        return False
    if scale[0] == delta_shape[0] and math.prod(scale[1:]) == 1:
        return True
    if len(scale) < 2 or scale[0] != 1 or math.prod(scale[2:]) != 1:
        return False
    channels = scale[1]
    if len(delta_shape) > 2:
        return delta_shape[1] == channels
    # A flattened k×k conv delta (LoHa, LoKr) has in·kh·kw columns.
    return delta_shape[1] % channels == 0
