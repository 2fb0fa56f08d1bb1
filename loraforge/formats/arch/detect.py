"""Which architecture a checkpoint is, from its tensor names and shapes alone.

Rule: a table (architecture x size) *fits* a file when every UNet key of the
table is in the file and every table key present in the file has the table's
shape. Of the fitting tables the one that explains the most keys wins. Keys the
table has and the file lacks (no VAE, no schedule buffers, ...) are reported in
``missing``; keys the file has and the table lacks (marker tensors such as
``v_pred`` / ``ztsnr``, extra training state) in ``extra``.

Allowed deviations from the table:

* an inpainting UNet: ``input_blocks.0.0.weight`` with 9 input channels
  (4 latent + 4 masked-image latent + 1 mask) instead of 4;
* the ``v_pred`` marker: v-prediction is known only when it is present. SD 2.x
  768-v and 512 (epsilon) checkpoints have identical keys and shapes, so
  without a marker ``v_prediction`` is None (unknown), never a guess.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

from ...errors import FormatError
from .registry import ARCHITECTURE_NAMES, SIZES, get_architecture
from .table import Architecture
from .unet import UNET_PREFIX

CONV_IN_KEY = UNET_PREFIX + "input_blocks.0.0.weight"
INPAINT_IN_CHANNELS = 9
V_PRED_MARKER = "v_pred"


@dataclass(frozen=True)
class Detection:
    architecture: Architecture
    inpaint: bool  # 9-channel conv_in
    v_prediction: bool | None  # True with a v_pred marker tensor, else None (unknown)
    missing: tuple[str, ...]  # table keys absent from the file, in table order
    extra: tuple[str, ...]  # file keys not in the table, sorted


@dataclass(frozen=True)
class _Candidate:
    architecture: Architecture
    shapes: dict[str, tuple[int, ...]]
    unet_keys: tuple[str, ...]


@lru_cache(maxsize=1)
def _candidates() -> tuple[_Candidate, ...]:
    result = []
    for name in ARCHITECTURE_NAMES:
        for size in SIZES:
            arch = get_architecture(name, size)
            shapes = {t.key: t.shape for t in arch.tensors}
            unet_keys = tuple(t.key for t in arch.tensors if t.component == "unet")
            result.append(_Candidate(arch, shapes, unet_keys))
    return tuple(result)


def _is_inpaint_conv_in(table_shape: tuple[int, ...], file_shape: tuple[int, ...]) -> bool:
    return (
        len(file_shape) == 4
        and file_shape[1] == INPAINT_IN_CHANNELS
        and (file_shape[0],) + file_shape[2:] == (table_shape[0],) + table_shape[2:]
    )


def _shape_mismatches(candidate: _Candidate, shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    mismatches = []
    for key, table_shape in candidate.shapes.items():
        file_shape = shapes.get(key)
        if file_shape is None or tuple(file_shape) == table_shape:
            continue
        if key == CONV_IN_KEY and _is_inpaint_conv_in(table_shape, tuple(file_shape)):
            continue
        mismatches.append(f"{key} is {list(file_shape)}, expected {list(table_shape)}")
    return mismatches


def _missing_unet(candidate: _Candidate, shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    return [key for key in candidate.unet_keys if key not in shapes]


def _describe_closest(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """Why the table that shares the most keys with the file does not fit it."""
    best = max(_candidates(), key=lambda c: sum(1 for k in c.shapes if k in shapes))
    shared = sum(1 for k in best.shapes if k in shapes)
    if shared == 0:
        sample = ", ".join(sorted(shapes)[:5]) or "no tensors at all"
        return f"none of its {len(shapes)} tensor names belongs to any of them (first names: {sample})"
    problems = _shape_mismatches(best, shapes)[:3] + [f"{k} is absent" for k in _missing_unet(best, shapes)[:3]]
    arch = best.architecture
    return (
        f"the closest is {arch.name} ({arch.size}), which shares {shared} of {len(best.shapes)} tensor names, "
        f"but {'; '.join(problems[:4])}"
    )


def detect_architecture(shapes: Mapping[str, tuple[int, ...]]) -> Detection:
    """Identify the architecture (and size) of a checkpoint from ``{key: shape}``.

    Raises FormatError when no table fits.
    """
    fitting = [
        c for c in _candidates() if not _missing_unet(c, shapes) and not _shape_mismatches(c, shapes)
    ]
    if not fitting:
        raise FormatError(
            "The checkpoint looks like no supported architecture: it was compared with "
            f"{', '.join(ARCHITECTURE_NAMES)} (full and tiny sizes) in original LDM/SGM naming "
            f"(UNet keys under '{UNET_PREFIX}'), and {_describe_closest(shapes)}. "
            "Check that the file is a full Stable Diffusion 1.x/2.x/XL checkpoint (not a LoRA, a diffusers-format "
            "UNet or another model family), or convert it to the original single-file layout."
        )
    best = max(fitting, key=lambda c: sum(1 for k in c.shapes if k in shapes))
    conv_in = shapes.get(CONV_IN_KEY)
    return Detection(
        architecture=best.architecture,
        inpaint=conv_in is not None and tuple(conv_in)[1:2] == (INPAINT_IN_CHANNELS,),
        v_prediction=True if V_PRED_MARKER in shapes else None,
        missing=tuple(key for key in best.shapes if key not in shapes),
        extra=tuple(sorted(key for key in shapes if key not in best.shapes)),
    )
