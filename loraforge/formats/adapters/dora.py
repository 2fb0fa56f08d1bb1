"""DoRA (weight-decomposed LoRA): a magnitude next to any LoRA-family module.

Two spellings, three layouts:

* LyCORIS / kohya ``<name>.dora_scale``: ``[out, 1, …]`` (LyCORIS
  ``wd_on_out=True``, its default) is one magnitude per output row;
  ``[1, in, 1, …]`` (``wd_on_out=False``, older files) one per input channel.
* PEFT ``<name>.lora_magnitude_vector``: always one magnitude per output row,
  stored ``[out]`` for a linear layer and ``[1, out, 1, 1]`` for a conv
  (PEFT's ``_DoraConvNdLayer`` keeps the norm transposed).

Which norm a module uses (its ``dora_axis``, "out" or "in") is decided here,
at parse time, by which axis of the ΔW the magnitude's length matches. A PEFT
magnitude is per output row whatever its shape. A ``dora_scale`` of shape
``[1, n, 1, 1]`` on a conv with as many inputs as outputs (every ResNet
``conv2``) matches both: it is LyCORIS's per-input layout, or a PEFT
magnitude renamed by a converter. The rest of the file decides (its
unambiguous modules all use one layout); where nothing decides, parsing stops
with an error naming the module rather than guessing. The bake applies the
magnitude with :func:`loraforge.ops.deltas.dora_effective_delta`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from loraforge.ops.deltas import DORA_NORM_EPS

from .kinds import adapter_kind
from .model import DORA_SCALE, AdapterModule, module_error
from .peft import DORA_SUFFIXES

OUT, IN = "out", "in"


def is_peft_magnitude(module: AdapterModule) -> bool:
    """Whether the module's magnitude is spelled the PEFT way (``lora_magnitude_vector``)."""
    return module.keys[DORA_SCALE].endswith(tuple("." + suffix for suffix in DORA_SUFFIXES))


def norm_eps(module: AdapterModule) -> float:
    """What the producer adds to the norm before dividing: LyCORIS float32's epsilon, PEFT nothing.

    LyCORIS (``lycoris/functional/general.py``, ``_weight_decompose``) adds
    ``finfo(dtype).eps`` of the dtype it normalises in, float32 for its
    float32 ``dora_scale``; PEFT (``peft/tuners/lora/dora.py``) divides by the
    bare norm.
    """
    return 0.0 if is_peft_magnitude(module) else DORA_NORM_EPS


def candidate_axes(module: AdapterModule) -> tuple[str, ...]:
    """The norms the module's magnitude shape can stand for, on its ΔW: (), ("out",), ("in",) or both."""
    scale = tuple(module.shapes[DORA_SCALE])
    delta = tuple(module.delta_shape)
    out = delta[0]
    if not scale:
        return ()
    if is_peft_magnitude(module):
        # One value per output row; only the position of the non-unit axis varies ([out], [1, out, 1, 1]).
        return (OUT,) if math.prod(scale) == out and sum(1 for d in scale if d != 1) <= 1 else ()
    axes = []
    if scale[0] == out and math.prod(scale[1:]) == 1:
        axes.append(OUT)  # [out, 1, …] (LyCORIS wd_on_out) or [out] (a renamed PEFT linear magnitude)
    if len(scale) >= 2 and scale[0] == 1 and math.prod(scale[2:]) == 1:
        n = scale[1]
        if len(delta) > 2:
            takes_in = delta[1] == n
        else:
            # A linear ΔW, or a flattened k×k conv ΔW (LoHa, LoKr) of in·kh·kw columns.
            takes_in = delta[1] == n if len(scale) == 2 else delta[1] % n == 0
        if takes_in:
            axes.append(IN)
        # [1, out, 1, 1]: PEFT's conv layout under the LyCORIS name (diffusers' kohya converter renames it).
        if len(scale) > 2 and n == out and OUT not in axes:
            axes.append(OUT)
    return tuple(axes)


def resolve_dora_axes(path: str, modules: Sequence[AdapterModule]) -> list[AdapterModule]:
    """The modules with ``dora_axis`` set; raise FormatError on a magnitude that fits no axis or is ambiguous."""
    candidates: dict[str, tuple[str, ...]] = {}
    for module in modules:
        if not module.dora:
            continue
        if not adapter_kind(module.kind).takes_dora:
            raise module_error(
                path, module.name, module.keys,
                "has a dora_scale on a full difference, which DoRA is not defined for",
                "Remove the dora_scale tensor or re-export the adapter.",
            )
        axes = candidate_axes(module)
        if not axes:
            raise _no_fit(path, module)
        candidates[module.name] = axes
    # The layout the file's unambiguous LyCORIS-spelled magnitudes use (PEFT ones say nothing about it).
    decided = {
        axes[0]
        for name, axes in candidates.items()
        if len(axes) == 1 and not is_peft_magnitude(_by_name(modules, name)) and _is_row_layout(_by_name(modules, name))
    }
    result = []
    for module in modules:
        axes = candidates.get(module.name)
        if axes is None:
            result.append(module)
            continue
        if len(axes) > 1:
            if len(decided) != 1:
                raise _ambiguous(path, module, decided)
            axes = (next(iter(decided)),)
        result.append(dataclasses.replace(module, dora_axis=axes[0]))
    return result


def _by_name(modules: Sequence[AdapterModule], name: str) -> AdapterModule:
    return next(m for m in modules if m.name == name)


def _is_row_layout(module: AdapterModule) -> bool:
    """Magnitudes stored as a row ([1, n, …] or [n]): the layouts a square conv's magnitude is ambiguous between."""
    scale = tuple(module.shapes[DORA_SCALE])
    return len(scale) == 1 or scale[0] == 1


def _no_fit(path: str, module: AdapterModule):
    scale = list(module.shapes[DORA_SCALE])
    delta = list(module.delta_shape)
    return module_error(
        path, module.name, module.keys,
        f"has {module.keys[DORA_SCALE]} of shape {scale}, which is neither one magnitude per output row "
        f"([{delta[0]}, 1, …], [{delta[0]}], or PEFT's conv layout [1, {delta[0]}, 1, 1]) nor one per input "
        f"channel ([1, in, 1, …]) of its ΔW {delta}",
        "The magnitude belongs to another layer or the file is damaged; re-export the adapter.",
    )


def _ambiguous(path: str, module: AdapterModule, decided: set[str]):
    scale = list(module.shapes[DORA_SCALE])
    evidence = (
        "the file's other DoRA modules use both layouts" if decided else "no other module of the file tells which"
    )
    return module_error(
        path, module.name, module.keys,
        f"has {module.keys[DORA_SCALE]} of shape {scale} on a layer with as many inputs as outputs "
        f"(ΔW {list(module.delta_shape)}): that is one magnitude per input channel in LyCORIS's wd_on_out=False "
        f"layout, and one per output row in PEFT's conv layout, and {evidence}",
        "If the file came from PEFT/diffusers, keep PEFT's key name (`.lora_magnitude_vector`); if it came from "
        "LyCORIS, re-export it with wd_on_out=True (LyCORIS's default, shape [out, 1, 1, 1]).",
    )
