"""Split an adapter file's keys into modules and hand each to its kind's parser.

Only the safetensors header is consulted (names, shapes, dtypes), plus the
small 0-d alpha tensors, so parsing a large adapter costs no tensor reads.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from . import dora, peft
from .kinds import ADAPTER_KINDS, adapter_kind, describe_kind, suffix_family
from .model import ALPHA, DORA_SCALE, AdapterFile, AdapterModule, ModuleKeys, module_error

_SHARED = "shared"
_SHARED_SUFFIXES = {"alpha": ALPHA, "dora_scale": DORA_SCALE, **peft.DORA_SUFFIXES}

# (suffix, family, role), longest suffix first so "lora_A.default.weight" wins over shorter ones.
_SUFFIX_TABLE: tuple[tuple[str, str, str], ...] = tuple(
    sorted(
        [(s, kind.family, role) for kind in ADAPTER_KINDS for s, role in kind.suffixes.items()]
        + [(s, _SHARED, role) for s, role in _SHARED_SUFFIXES.items()],
        key=lambda row: (-len(row[0]), row[0]),
    )
)

# Dtypes a factor may be stored in; integer or bool tensors are never adapter factors.
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
# An alpha may also be an integer: diffusers' kohya converter writes torch.tensor(rank), an int64.
INTEGER_DTYPES = frozenset({"I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64"})


def split_key(key: str) -> tuple[str, str, str] | None:
    """(module name, family, role) of a key, or None when no adapter suffix matches."""
    for suffix, family, role in _SUFFIX_TABLE:
        if key.endswith("." + suffix) and len(key) > len(suffix) + 1:
            return key[: -len(suffix) - 1], family, role
    return None


@dataclasses.dataclass
class _Group:
    keys: dict[str, str] = dataclasses.field(default_factory=dict)  # role -> key
    families: set[str] = dataclasses.field(default_factory=set)


def _group_keys(path: str, names: list[str]) -> tuple[dict[str, _Group], list[str]]:
    groups: dict[str, _Group] = {}
    unclaimed: list[str] = []
    for key in sorted(names):
        split = split_key(key)
        if split is None:
            unclaimed.append(key)
            continue
        name, family, role = split
        group = groups.setdefault(name, _Group())
        if role in group.keys:
            raise module_error(
                path, name, [group.keys[role], key],
                f"has two tensors for its {role}: {group.keys[role]} and {key}",
                "Keep one of them; the file mixes two export formats for the same layer.",
            )
        group.keys[role] = key
        if family != _SHARED:
            group.families.add(family)
    return groups, unclaimed


def _family_of(path: str, name: str, group: _Group) -> str | None:
    if not group.families:
        return None
    if len(group.families) > 1:
        raise module_error(
            path, name, group.keys,
            f"mixes keys of several adapter kinds ({', '.join(sorted(group.families))})",
            "One layer can carry one adapter kind; the file was merged by name from different adapters. "
            "Split it, or re-export it with one tool.",
        )
    return next(iter(group.families))


def _read_alpha(file, name: str, keys: Mapping[str, str]) -> float | None:
    key = keys.get(ALPHA)
    if key is None:
        return None
    shape = tuple(file.info(key).shape)
    if shape != ():
        raise module_error(
            file.path, name, keys,
            f"has {key} of shape {list(shape)}; alpha must be a single 0-d number",
            "Re-save the alpha as a scalar tensor (torch.tensor(alpha)), or re-export the adapter.",
        )
    value = float(file.read(key).to(torch.float64))
    if not math.isfinite(value):
        raise module_error(
            file.path, name, keys,
            f"has alpha {value}, which is not a finite number",
            "Re-export the adapter; a finite alpha (usually the rank or half of it) is required.",
        )
    return value


def _check_dtypes(file, name: str, keys: Mapping[str, str]) -> None:
    for role, key in keys.items():
        dtype = file.info(key).dtype
        if dtype in FLOAT_DTYPES or (role == ALPHA and dtype in INTEGER_DTYPES):
            continue
        allowed = "a floating-point or integer type" if role == ALPHA else "a floating-point type"
        raise module_error(
            file.path, name, keys,
            f"stores {key} as {dtype}, which is not {allowed}",
            "Adapter factors are F16, BF16, F32 or F64 (an alpha may also be an integer); re-export the adapter.",
        )


def _parse_module(file, name: str, group: _Group, family: str, adapter_config) -> AdapterModule:
    _check_dtypes(file, name, group.keys)
    mk = ModuleKeys(
        path=str(file.path),
        name=name,
        keys=group.keys,
        shapes={role: tuple(int(d) for d in file.info(key).shape) for role, key in group.keys.items()},
        alpha=_read_alpha(file, name, group.keys),
    )
    kind = suffix_family(family)
    module = kind.build(mk)
    if kind.factored and module.naming == "diffusers" and module.alpha is None:
        alpha = peft.config_alpha(str(file.path), adapter_config, name, module.rank or 1)
        module = dataclasses.replace(module, alpha=alpha, scale=kind.scale(alpha, module.rank))
    return module


def parse_adapter(file) -> AdapterFile:
    """Parse an open SafetensorsFile into modules; raise FormatError on an inconsistent module.

    Every key ends up in exactly one module or in ``unclaimed`` (keys with no
    adapter suffix, and alphas or dora_scales with no factors beside them). A
    file with no adapter module at all (a checkpoint, say) parses to no
    modules, kind "empty", every key unclaimed; callers decide what that means.
    """
    path = str(file.path)
    groups, unclaimed = _group_keys(path, list(file.names()))
    adapter_config = peft.read_adapter_config(path, file.metadata or {})
    modules: list[AdapterModule] = []
    for name in sorted(groups):
        group = groups[name]
        family = _family_of(path, name, group)
        if family is None:
            unclaimed.extend(group.keys.values())
            continue
        modules.append(_parse_module(file, name, group, family, adapter_config))
    modules_tuple = tuple(dora.resolve_dora_axes(path, modules))
    return AdapterFile(
        path=path,
        modules=modules_tuple,
        unclaimed=tuple(sorted(unclaimed)),
        metadata=dict(sorted((file.metadata or {}).items())),
        kind=describe_kind(modules_tuple),
    )


# --------------------------------------------------------------------------- tensors


def load_factors(file, module: AdapterModule, device="cpu", dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
    """Read every tensor of ``module`` except alpha (already in ``module.alpha``), by role."""
    return {
        role: file.read(key).to(device=device, dtype=dtype)
        for role, key in module.keys.items()
        if role != ALPHA
    }


def module_delta(
    module: AdapterModule,
    factors: Mapping[str, Tensor],
    target_shape,
    dtype: torch.dtype = torch.float64,
    fixed_order: bool = False,
) -> Tensor:
    """The scaled ΔW of ``module`` in ``target_shape`` (DoRA not applied; see module_effective_delta).

    ``fixed_order``: products summed in index order with elementwise IEEE
    operations instead of BLAS (loraforge.ops.deltas.fixed_order_matmul), so
    the float64 bits are the same on every device.
    """
    from loraforge.ops import deltas

    natural = adapter_kind(module.kind).natural_delta(module, dict(factors), dtype, fixed_order)
    return deltas.fit_delta(natural, target_shape)


def module_low_rank(module: AdapterModule, factors: Mapping[str, Tensor]) -> tuple[Tensor, Tensor] | None:
    """(up, down) as float64 matrices, as stored, when ΔW = scale·up @ down; else None.

    Plain kohya LoRA/LoCon modules (no Tucker core, no DoRA) qualify: a bake
    adds them with one in-place GEMM instead of materialising ΔW.
    """
    return adapter_kind(module.kind).low_rank(module, factors)


@dataclasses.dataclass(frozen=True)
class DeltaCertificate:
    """What certified rounding needs of a ΔW computed from factors (see loraforge.ops.bake.DenseTerm)."""

    envelope: Tensor  # the formula on absolute values, |scale| included, in the target shape
    depth: int  # roundings along any one product of the float64 evaluation
    exact: Callable[[int], Fraction]  # flat index in the target shape -> exact ΔW element, scale included


def module_certificate(module: AdapterModule, factors: Mapping[str, Tensor], target_shape) -> DeltaCertificate | None:
    """The certificate of ``module_delta``; None for DoRA, whose norm and division are not certified."""
    from loraforge.ops import deltas

    if module.dora:
        return None
    absolute = {role: tensor.abs() for role, tensor in factors.items()}
    kind = adapter_kind(module.kind)
    envelope = deltas.fit_delta(kind.natural_delta(module, absolute, torch.float64).abs(), target_shape)
    depth, element = kind.natural_exact(module, dict(factors))
    scale = Fraction(module.scale)
    return DeltaCertificate(envelope, depth, lambda index: scale * element(index))


def module_effective_delta(
    module: AdapterModule,
    factors: Mapping[str, Tensor],
    weight: Tensor,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """What strength multiplies when baking: ΔW, or W_dora − W for a DoRA module.

    A DoRA module's ΔW and norm are evaluated in a fixed order of elementwise
    IEEE operations: its norm and division keep float64 rounding differences
    from being certified away, so they must not arise (docs/baking.md).
    """
    from loraforge.ops import deltas

    delta = module_delta(module, factors, tuple(weight.shape), dtype, fixed_order=module.dora)
    if not module.dora:
        return delta
    return deltas.dora_effective_delta(
        weight, delta, factors[DORA_SCALE], dtype=dtype, axis=module.dora_axis, eps=dora.norm_eps(module)
    )


def dora_convention(module: AdapterModule, chosen: str | None = None) -> str:
    """The strength convention a DoRA module is baked with: the recipe's ``dora:``, else its producer's.

    PEFT-spelled magnitudes (``lora_magnitude_vector``) default to "peft",
    LyCORIS-spelled ones (``dora_scale``) to "lycoris" (docs/adapters.md, DoRA).
    """
    if chosen is not None:
        return chosen
    return "peft" if dora.is_peft_magnitude(module) else "lycoris"


def module_dora_increment(
    module: AdapterModule,
    factors: Mapping[str, Tensor],
    weight: Tensor,
    strength: float,
    convention: str | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """W'(s) − W of a DoRA module at strength ``strength`` (strength × block weight), to be added as is.

    ``convention``: the recipe's ``dora:`` ("lycoris" | "peft"), or None for the
    file's own (:func:`dora_convention`). At strength 1 this equals
    :func:`module_effective_delta`.
    """
    from loraforge.ops import deltas

    if not module.dora:
        raise ValueError(f"module {module.name} carries no DoRA magnitude")
    delta = module_delta(module, factors, tuple(weight.shape), dtype, fixed_order=True)
    return deltas.dora_increment(
        weight, delta, factors[DORA_SCALE], strength,
        convention=dora_convention(module, convention), axis=module.dora_axis,
        eps=dora.norm_eps(module), dtype=dtype,
    )


def module_bias_delta(module: AdapterModule, factors: Mapping[str, Tensor], dtype: torch.dtype = torch.float64):
    """The bias difference of a full-diff module (``.diff_b``), or None."""
    bias = factors.get("diff_b")
    return None if bias is None else bias.to(dtype=dtype)
