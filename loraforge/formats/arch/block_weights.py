"""Per-block LoRA strengths (LoRA Block Weight convention) from a recipe spec.

A spec is one of:

* ``None``: every block at 1.0;
* a preset name (``PRESETS``: the families' presets, the 17-value presets of
  the LoRA Block Weight extension, defined in sd1.py / sd2.py; ``GROUP_PRESETS``:
  presets with one value per block-id prefix, flux.py's, which fit any block count);
* a vector, as a list of numbers or a comma-separated string, whose length is
  one of the architecture's forms (SD 1.x/2.x: 17 or 26, SDXL: 12 or 20);
* a mapping of block ids, inclusive ranges within one prefix (``OUT03-OUT06``)
  and an optional ``default`` to numbers.

The result names a weight for some blocks. A block that the spec does not name
has no weight at all: asking for it is an error (never a silent 0 or 1), so a
17-value vector cannot quietly skip a LoCon layer that lives in IN00.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from ...errors import PlanError
from .registry import FAMILIES, get_architecture, get_family
from .table import Architecture


class BlockWeightError(PlanError):
    """A block-weight spec that is malformed or does not cover a block that is needed."""


# Every family's named presets (sd1.py / sd2.py: the LoRA Block Weight extension's
# 17-value presets; SDXL defines none of its own). A name means the same values everywhere.
PRESETS: dict[str, tuple[float, ...]] = {}
for _family in FAMILIES.values():
    for _name, _values in _family.block_presets:
        PRESETS.setdefault(_name, _values)

# Presets whose value is the same for every block carry over to any form of any
# architecture; the others describe positions in the SD 1.x/2.x UNet and have
# no SDXL meaning (SDXL has other levels), so they are refused there.
UNIFORM_PRESETS: tuple[str, ...] = tuple(name for name, values in PRESETS.items() if len(set(values)) == 1)

# Presets given per block-id prefix (flux.py: FLUXALL, DOUBLES, SINGLES, NOTEXT): name -> (the family
# that defines it, ((prefix, value), ...)). They mean something only in that family.
GROUP_PRESETS: dict[str, tuple[str, tuple[tuple[str, float], ...]]] = {}
for _family in FAMILIES.values():
    for _name, _groups in _family.group_presets:
        GROUP_PRESETS.setdefault(_name, (_family.name, _groups))

DEFAULT_KEY = "default"
_BLOCK_ID = re.compile(r"^(BASE|M|IN|OUT|CLIP|T5|D|S)(\d\d)?$")  # Flux: CLIP, T5, IN, D00-D18, S00-S37, OUT


@dataclass(frozen=True)
class BlockWeights:
    """The weight of each block a spec names (in the order of the architecture's full form)."""

    weights: Mapping[str, float]
    description: str = "block weights"  # how the spec was given, for error messages
    valid_forms: tuple[int, ...] = ()  # the architecture's vector lengths, for error messages

    def covers(self, block: str) -> bool:
        return block in self.weights

    def weight(self, block: str) -> float:
        if block in self.weights:
            return self.weights[block]
        full = max(self.valid_forms, default=0)
        raise BlockWeightError(
            f"The block weights ({self.description}) name no weight for block {block}, which this adapter "
            f"modifies. Give the {full}-value form, which names every block, or a mapping such as "
            f"{{default: 1, {block}: 0.5}}."
        )

    def __hash__(self) -> int:
        return hash((tuple(self.weights.items()), self.description))


def parse_block_weights(spec: object, arch: Architecture) -> BlockWeights:
    """Turn a recipe's ``blocks:`` value into per-block weights for ``arch``."""
    full_form = arch.full_block_form
    if spec is None:
        return _result(dict.fromkeys(full_form, 1.0), "default: every block 1.0", arch)
    if isinstance(spec, str):
        return _parse_string(spec.strip(), arch)
    if isinstance(spec, Mapping):
        return _parse_mapping(spec, arch)
    if isinstance(spec, Sequence) and not isinstance(spec, (bytes, bytearray)):
        values = [_number(value, f"position {i + 1} of the block-weight vector") for i, value in enumerate(spec)]
        return _from_vector(values, arch, f"{len(values)}-value vector")
    raise BlockWeightError(
        f"Block weights must be a preset name, a list of numbers, a comma-separated string of numbers or a "
        f"mapping of block ids to numbers; got {spec!r} ({type(spec).__name__}). "
        f"Presets: {', '.join(_presets_for(arch))}."
    )


def _result(weights: dict[str, float], description: str, arch: Architecture) -> BlockWeights:
    ordered = {block: weights[block] for block in arch.full_block_form if block in weights}
    return BlockWeights(MappingProxyType(ordered), description, tuple(sorted(arch.block_forms, reverse=True)))


def _valid_lengths(arch: Architecture) -> str:
    return " or ".join(str(n) for n in sorted(arch.block_forms, reverse=True))


def _presets_for(arch: Architecture) -> list[str]:
    """The preset names that mean something for ``arch``, in definition order."""
    family = get_family(arch.name)
    own = [name for name, _ in family.block_presets]
    return [*own, *(name for name in UNIFORM_PRESETS if name not in own), *(name for name, _ in family.group_presets)]


def _parse_string(text: str, arch: Architecture) -> BlockWeights:
    preset = {name.upper(): name for name in [*PRESETS, *GROUP_PRESETS]}.get(text.upper())
    if preset is not None:
        return _from_preset(preset, arch)
    if "," not in text:
        raise BlockWeightError(
            f"Unknown block-weight preset {text!r}. Presets: {', '.join(_presets_for(arch))}; or give a vector of "
            f"{_valid_lengths(arch)} comma-separated numbers for {arch.title}, or a mapping such as "
            "{default: 0, IN04: 0.5, OUT03-OUT06: 1}."
        )
    values = [_number(part.strip(), f"position {i + 1} of the block-weight vector {text!r}")
              for i, part in enumerate(text.split(","))]
    return _from_vector(values, arch, f"{len(values)}-value vector")


def _from_preset(name: str, arch: Architecture) -> BlockWeights:
    family = get_family(arch.name)
    own = dict(family.block_presets).get(name)
    if own is not None:
        return _result(dict(zip(family.preset_form, own)), f"preset {name}", arch)
    groups = dict(family.group_presets).get(name)
    if groups is not None:
        values = dict(groups)
        return _result({block: values[_prefix(block)] for block in arch.full_block_form}, f"preset {name}", arch)
    if name in UNIFORM_PRESETS:
        short_form = arch.block_forms[min(arch.block_forms)]
        return _result(dict.fromkeys(short_form, PRESETS[name][0]), f"preset {name}", arch)
    valid = ", ".join(_presets_for(arch))
    if name in GROUP_PRESETS:
        owner = FAMILIES[GROUP_PRESETS[name][0]]
        raise BlockWeightError(
            f"Block-weight preset {name} is defined for the blocks of {owner.title} and has no meaning for "
            f"{arch.title}. Presets valid for {arch.title}: {valid}; otherwise give a vector of "
            f"{_valid_lengths(arch)} numbers or a mapping such as {{default: 0, {arch.full_block_form[-1]}: 1}}."
        )
    if family.group_presets:  # an SD preset on Flux: no UNet levels at all
        raise BlockWeightError(
            f"Block-weight preset {name} is defined for the 17 blocks of SD 1.x/2.x and has no meaning for "
            f"{arch.title}, which has no UNet levels (its blocks are {_form_ranges(arch)}). Presets valid for "
            f"{arch.title}: {valid}; otherwise give a vector of {_valid_lengths(arch)} numbers or a mapping "
            f"such as {{default: 1, {_group_range(arch, 'D')}: 0}}."
        )
    raise BlockWeightError(
        f"Block-weight preset {name} is defined for the 17 blocks of SD 1.x/2.x and has no meaning for "
        f"{arch.title}, whose UNet has different levels. Presets valid for {arch.title}: "
        f"{valid}; otherwise give a vector of {_valid_lengths(arch)} numbers or a mapping "
        "such as {default: 0, IN04: 1, OUT00-OUT02: 0.5}."
    )


def _group_range(arch: Architecture, prefix: str) -> str:
    """'D00-D18' (or the one id) for the blocks with ``prefix``."""
    same = [b for b in arch.full_block_form if _prefix(b) == prefix]
    return same[0] if len(same) == 1 else f"{same[0]}-{same[-1]}"


def _form_ranges(arch: Architecture) -> str:
    """The full form, each run of one prefix as a range: 'CLIP, T5, IN, D00-D18, S00-S37, OUT'."""
    prefixes = list(dict.fromkeys(_prefix(b) for b in arch.full_block_form))
    return ", ".join(_group_range(arch, p) for p in prefixes)


def _from_vector(values: list[float], arch: Architecture, description: str) -> BlockWeights:
    form = arch.block_forms.get(len(values))
    if form is None:
        raise BlockWeightError(
            f"A block-weight vector for {arch.title} must have {_valid_lengths(arch)} values; this one has "
            f"{len(values)}{_other_family_form(len(values), arch)}. The {len(arch.full_block_form)}-value form is "
            f"{', '.join(arch.full_block_form)}"
            + (f"; the short form is {', '.join(arch.block_forms[min(arch.block_forms)])}." if len(arch.block_forms) > 1 else ".")
        )
    return _result(dict(zip(form, values)), description, arch)


def _other_family_form(length: int, arch: Architecture) -> str:
    """", which is the length of <another family>'s form" when it is (an SD vector given for Flux, say)."""

    others = [family.title for name, family in FAMILIES.items()
              if name != arch.name and length in get_architecture(name).block_forms]
    if not others:
        return ""
    return (f", which is the length of a {' / '.join(others)} vector: block weights name blocks of one "
            f"architecture and do not carry over to {arch.title}")


def _parse_mapping(spec: Mapping, arch: Architecture) -> BlockWeights:
    full_form = arch.full_block_form
    named: dict[str, float] = {}
    default = None
    for raw_key, raw_value in spec.items():
        key = str(raw_key).strip()
        value = _number(raw_value, f"block weight {key!r}")
        if key.lower() == DEFAULT_KEY:
            default = value
            continue
        for block in _expand_key(key.upper(), arch):
            if block in named:
                raise BlockWeightError(
                    f"Block {block} is given twice in the block-weight mapping (again by {key!r}). "
                    "Name each block once; use 'default' for the blocks you do not list."
                )
            named[block] = value
    weights = dict.fromkeys(full_form, default) if default is not None else {}
    weights.update(named)
    shown = ", ".join(f"{k}: {v}" for k, v in spec.items())
    return _result(weights, f"mapping {{{shown}}}", arch)


def _expand_key(key: str, arch: Architecture) -> list[str]:
    """A block id, or an inclusive range of ids with the same prefix, in form order."""
    full_form = arch.full_block_form
    if "-" not in key:
        _check_block(key, arch)
        return [key]
    start, _, stop = (part.strip() for part in key.partition("-"))
    _check_block(start, arch, within=key)
    _check_block(stop, arch, within=key)
    if _prefix(start) != _prefix(stop):
        raise BlockWeightError(
            f"Block range {key!r} crosses from {_prefix(start)} to {_prefix(stop)} blocks; a range must stay "
            f"within one prefix (IN..IN or OUT..OUT). Split it into one entry per prefix, e.g. "
            f"'{start}-{_edge_of(start, arch, last=True)}' and '{_edge_of(stop, arch, last=False)}-{stop}' "
            "(and M00 on its own if it lies between)."
        )
    first, last = full_form.index(start), full_form.index(stop)
    if first > last:
        raise BlockWeightError(f"Block range {key!r} runs backwards; write it as '{stop}-{start}'.")
    return list(full_form[first:last + 1])


def _prefix(block: str) -> str:
    match = _BLOCK_ID.match(block)
    return match.group(1) if match else block


def _edge_of(block: str, arch: Architecture, last: bool) -> str:
    """The last (or first) block id with the same prefix as ``block``."""
    same_prefix = [b for b in arch.full_block_form if _prefix(b) == _prefix(block)]
    return same_prefix[-1] if last else same_prefix[0]


def _check_block(block: str, arch: Architecture, within: str | None = None) -> None:
    if block in arch.full_block_form:
        return
    where = f" in range {within!r}" if within else ""
    raise BlockWeightError(
        f"Unknown block id {block!r}{where} for {arch.title}. Valid block ids: "
        f"{', '.join(arch.full_block_form)} (ranges such as 'OUT03-OUT06' and the key 'default' are also accepted)."
    )


def _number(value: object, what: str) -> float:
    if isinstance(value, bool):
        raise BlockWeightError(f"The value of {what} is {value!r}; a block weight must be a number such as 0, 0.5 or 1.")
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        try:
            number = float(str(value).strip())
        except ValueError:
            raise BlockWeightError(
                f"The value of {what} is {value!r}, which is not a number; a block weight must be a number "
                "such as 0, 0.5 or 1."
            ) from None
    if not math.isfinite(number):
        raise BlockWeightError(f"The value of {what} is {value!r}; a block weight must be a finite number.")
    return number
