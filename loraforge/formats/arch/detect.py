"""Which architecture a checkpoint is, from its tensor names and shapes alone.

Rule: for each family (sd1.py, sd2.py, sdxl.py) the file's dimensions (model
channels, context width, text-encoder widths, ...) are read at the family's
detection anchors, as ComfyUI's model detection does, and the family's table
is built at those dimensions. That table *fits* the file when every UNet key of
the table is in the file and every table key present in the file has the
table's shape, so a consistently scaled model is accepted (and reported with
its dimensions) while one tensor of another width is not. Of the fitting
tables the one that explains the most keys wins. Keys the table has and the
file lacks (no VAE, no schedule buffers, ...) are reported in ``missing``;
keys the file has and the table lacks (marker tensors such as ``v_pred`` /
``ztsnr``, extra training state) in ``extra``.

Allowed deviations from the table:

* an inpainting UNet: the family's ``inpaint_key`` (``input_blocks.0.0.weight``)
  with ``inpaint_in_channels`` (9: 4 latent + 4 masked-image latent + 1 mask)
  input channels instead of 4;
* the ``v_pred`` marker: v-prediction is known only when it is present. SD 2.x
  768-v and 512 (epsilon) checkpoints have identical keys and shapes, so
  without a marker ``v_prediction`` is None (unknown), never a guess.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ...errors import FormatError
from .family import Family
from .registry import ARCHITECTURE_NAMES, get_architecture, get_family
from .table import Architecture
from .unet import UNET_PREFIX

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
    family: Family
    architecture: Architecture
    shapes: dict[str, tuple[int, ...]]
    unet_keys: tuple[str, ...]


def _candidates(shapes: Mapping[str, tuple[int, ...]]) -> tuple[_Candidate, ...]:
    """Each family at the dimensions the file's tensors imply, in tie-break order."""
    result = []
    for name in ARCHITECTURE_NAMES:
        family = get_family(name)
        arch = get_architecture(name, family.infer(shapes))
        table_shapes = {t.key: t.shape for t in arch.tensors}
        unet_keys = tuple(t.key for t in arch.tensors if t.component == "unet")
        result.append(_Candidate(family, arch, table_shapes, unet_keys))
    return tuple(result)


def _is_inpaint_input(family: Family, table_shape: tuple[int, ...], file_shape: tuple[int, ...]) -> bool:
    return (
        len(file_shape) == 4
        and file_shape[1] == family.inpaint_in_channels
        and (file_shape[0],) + file_shape[2:] == (table_shape[0],) + table_shape[2:]
    )


def _shape_mismatches(candidate: _Candidate, shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    mismatches = []
    for key, table_shape in candidate.shapes.items():
        file_shape = shapes.get(key)
        if file_shape is None or tuple(file_shape) == table_shape:
            continue
        if key == candidate.family.inpaint_key and _is_inpaint_input(candidate.family, table_shape, tuple(file_shape)):
            continue
        mismatches.append(f"{key} is {list(file_shape)}, expected {list(table_shape)}")
    return mismatches


def _missing_unet(candidate: _Candidate, shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    return [key for key in candidate.unet_keys if key not in shapes]


def _describe_closest(candidates: tuple[_Candidate, ...], shapes: Mapping[str, tuple[int, ...]]) -> str:
    """Why the table that shares the most keys with the file does not fit it."""
    best = max(candidates, key=lambda c: sum(1 for k in c.shapes if k in shapes))
    shared = sum(1 for k in best.shapes if k in shapes)
    if shared == 0:
        sample = ", ".join(sorted(shapes)[:5]) or "no tensors at all"
        return f"none of its {len(shapes)} tensor names belongs to any of them (first names: {sample})"
    problems = _shape_mismatches(best, shapes)[:3] + [f"{k} is absent" for k in _missing_unet(best, shapes)[:3]]
    arch = best.architecture
    return (
        f"the closest is {arch.name} ({arch.size if arch.size == 'full' else arch.size_text}), which shares {shared} of {len(best.shapes)} tensor "
        f"names, but {'; '.join(problems[:4])}"
    )


def detect_architecture(shapes: Mapping[str, tuple[int, ...]]) -> Detection:
    """Identify the architecture (and its dimensions) of a checkpoint from ``{key: shape}``.

    Raises FormatError when no table fits.
    """
    shapes = {key: tuple(shape) for key, shape in shapes.items()}
    candidates = _candidates(shapes)
    fitting = [c for c in candidates if not _missing_unet(c, shapes) and not _shape_mismatches(c, shapes)]
    if not fitting:
        raise FormatError(
            "The checkpoint looks like no supported architecture: it was compared with "
            f"{', '.join(ARCHITECTURE_NAMES)} (each at the dimensions its tensors imply) in original LDM/SGM "
            f"naming (UNet keys under '{UNET_PREFIX}'), and {_describe_closest(candidates, shapes)}. "
            "Check that the file is a full Stable Diffusion 1.x/2.x/XL checkpoint (not a LoRA, a diffusers-format "
            "UNet or another model family), or convert it to the original single-file layout."
        )
    best = max(fitting, key=lambda c: sum(1 for k in c.shapes if k in shapes))
    conv_in = shapes.get(best.family.inpaint_key)
    return Detection(
        architecture=best.architecture,
        inpaint=conv_in is not None and tuple(conv_in)[1:2] == (best.family.inpaint_in_channels,),
        v_prediction=True if V_PRED_MARKER in shapes else None,
        missing=tuple(key for key in best.shapes if key not in shapes),
        extra=tuple(sorted(key for key in shapes if key not in best.shapes)),
    )
