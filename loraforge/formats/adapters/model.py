"""The parsed form of an adapter file: what each module is, which keys it owns, its ΔW shape."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from loraforge.errors import FormatError
from loraforge.formats.arch.registry import component_prefixes

NAMINGS = ("kohya", "diffusers")

# Roles every kind may carry besides its factors.
ALPHA = "alpha"
DORA_SCALE = "dora_scale"


@dataclass(frozen=True)
class AdapterModule:
    """One adapted layer of an adapter file.

    ``keys`` maps a role ("up", "down", "mid", "alpha", "dora_scale",
    "hada_w1_a", "lokr_w2", "diff", "diff_b", ...) to the tensor key in the
    file; treat it as read-only. ``delta_shape`` is the natural ΔW shape the
    factor shapes imply (see :mod:`loraforge.ops.deltas`): the target's shape
    or its (out, in·kh·kw) matrix view.
    """

    name: str  # as in the file, without the suffix ("lora_unet_…_to_q", "unet.down_blocks.…")
    naming: str  # "kohya" | "diffusers"
    kind: str  # "lora" | "loha" | "lokr" | "diff"
    tucker: bool
    dora: bool
    keys: Mapping[str, str] = field(hash=False)
    rank: int | None  # None for diffs and LoKr with both factors full
    alpha: float | None  # None when the file has no alpha (PEFT: from metadata, see docs)
    scale: float  # what multiplies the product of the factors: the kind's alpha/rank rule (kinds.py)
    delta_shape: tuple[int, ...]
    # The shapes of every tensor in ``keys`` (alpha: ()), so plans need no data.
    shapes: Mapping[str, tuple[int, ...]] = field(hash=False, default_factory=dict)
    # DoRA only: the norm its magnitude stands for, "out" (per output row) or "in" (per input channel);
    # decided from the magnitude's shape and spelling when the file is parsed (dora.py).
    dora_axis: str | None = None

    @property
    def is_conv(self) -> bool:
        """A spatial conv (kernel larger than 1×1), the layers LoCon adds over plain LoRA."""
        return len(self.delta_shape) == 4 and tuple(self.delta_shape[2:]) != (1, 1)

    @property
    def has_bias(self) -> bool:
        return "diff_b" in self.keys

    @property
    def component(self) -> str:
        """"unet", "te", "te1", "te2" or "" (unknown), read off the name's prefix."""
        return component_of(self.name)


@dataclass(frozen=True)
class AdapterFile:
    """A parsed adapter: every key of the file is in exactly one module or in ``unclaimed``."""

    path: str
    modules: tuple[AdapterModule, ...]  # sorted by name
    unclaimed: tuple[str, ...]  # sorted
    metadata: Mapping[str, str] = field(hash=False)
    kind: str  # see describe_kind()

    def module(self, name: str) -> AdapterModule:
        for module in self.modules:
            if module.name == name:
                return module
        raise KeyError(name)


_COMPONENT_PREFIXES = component_prefixes()  # from the family configs (formats/arch/<family>.py)


def component_of(name: str) -> str:
    for prefix, component in _COMPONENT_PREFIXES:
        if name.startswith(prefix):
            return component
    return ""


def naming_of(name: str) -> str:
    """kohya names are one underscore-joined word starting "lora_"; everything else is dotted diffusers."""
    return "kohya" if name.startswith("lora_") and "." not in name else "diffusers"


def module_error(path: str, name: str, keys: Mapping[str, str] | list[str], problem: str, fix: str) -> FormatError:
    """A FormatError naming the file, the module and its keys, with what is wrong and how to fix it."""
    key_list = sorted(keys.values()) if isinstance(keys, Mapping) else sorted(keys)
    return FormatError(
        f"{path}: adapter module '{name}' (keys: {', '.join(key_list)}) {problem}. {fix}"
    )


@dataclass(frozen=True)
class ModuleKeys:
    """What a kind parser gets for one module name: its keys by role and their header facts."""

    path: str
    name: str
    keys: Mapping[str, str]  # role -> key
    shapes: Mapping[str, tuple[int, ...]]  # role -> shape
    alpha: float | None  # value of the 0-d alpha tensor, already checked

    @property
    def naming(self) -> str:
        return naming_of(self.name)

    def error(self, problem: str, fix: str) -> FormatError:
        return module_error(self.path, self.name, self.keys, problem, fix)

    def require(self, *roles: str) -> None:
        """Raise naming the missing roles' suffixes when any is absent."""
        missing = [role for role in roles if role not in self.keys]
        if missing:
            raise self.error(
                f"lacks its {', '.join(missing)} tensor(s)",
                "The file is truncated or was written by a broken tool; re-export the adapter, or remove the "
                "module's keys if it should not be there.",
            )

    def ndim_in(self, role: str, allowed: tuple[int, ...]) -> tuple[int, ...]:
        shape = self.shapes[role]
        if len(shape) not in allowed:
            raise self.error(
                f"has {self.keys[role]} of shape {list(shape)}, which should have "
                f"{' or '.join(str(n) for n in allowed)} dimensions",
                "This is not a layout loraforge knows for this adapter kind; check that the file is a "
                "LoRA-family adapter and not damaged.",
            )
        if any(d == 0 for d in shape):
            raise self.error(
                f"has {self.keys[role]} of shape {list(shape)}, with an empty (zero-length) axis, i.e. rank 0",
                "Re-export the adapter with a rank of at least 1.",
            )
        return shape

    def build(self, *, kind: str, scale: float, tucker: bool, rank: int | None, delta_shape: tuple[int, ...]) -> AdapterModule:
        return AdapterModule(
            name=self.name,
            naming=self.naming,
            kind=kind,
            tucker=tucker,
            dora=DORA_SCALE in self.keys,
            keys=dict(sorted(self.keys.items())),
            rank=rank,
            alpha=self.alpha,
            scale=scale,
            delta_shape=tuple(int(d) for d in delta_shape),
            shapes=dict(sorted(self.shapes.items())),
        )


def rank_mismatch(mk: ModuleKeys, role_a: str, axis_a: int, role_b: str, axis_b: int) -> FormatError:
    """The standard error for two factors that disagree on the rank (or an inner dimension)."""
    return mk.error(
        f"has {mk.keys[role_a]} with {mk.shapes[role_a][axis_a]} on axis {axis_a} (shape "
        f"{list(mk.shapes[role_a])}) but {mk.keys[role_b]} with {mk.shapes[role_b][axis_b]} on axis {axis_b} "
        f"(shape {list(mk.shapes[role_b])}); these are the same rank and must be equal",
        "The halves come from different adapters or a failed resize; re-export the adapter.",
    )
