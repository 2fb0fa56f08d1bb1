"""The contract every adapter kind fulfils (one class per kind, listed in kinds.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Callable, ClassVar

if TYPE_CHECKING:
    from fractions import Fraction

    import torch
    from torch import Tensor

    from .model import AdapterModule, ModuleKeys


class AdapterKind:
    """How one kind of adapter is spelled, parsed, scaled, labelled and turned into ΔW.

    ``name`` is the kind a parsed module records (``AdapterModule.kind``);
    ``family`` names the suffix spelling (kohya "lora" and "peft" are both
    kind "lora"). ``factored``: ΔW = scale·up @ down, so a bake adds one GEMM
    and a merge keeps the factors. ``takes_dora``: a dora_scale may sit beside
    the module.
    """

    name: ClassVar[str]
    family: ClassVar[str]
    suffixes: ClassVar[Mapping[str, str]]  # key suffix -> role
    factored: ClassVar[bool] = False
    takes_dora: ClassVar[bool] = True
    # Whether ΔW comes in the layer's own shape (LoHa and LoKr store k×k convs flattened).
    exact_shape: ClassVar[bool] = False

    def build(self, mk: ModuleKeys) -> AdapterModule:
        """Check the module's shapes and return it parsed (raises FormatError naming the keys)."""
        raise NotImplementedError

    def scale(self, alpha: float | None, rank: int | None) -> float:
        """The factor multiplying the product of the factors."""
        raise NotImplementedError

    label_text: ClassVar[str] = ""

    def label(self, module: AdapterModule) -> str:
        """The file-kind word this module stands for ("LoRA", "LoCon", "LoHa", ...)."""
        return self.label_text

    def natural_delta(
        self, module: AdapterModule, factors: dict[str, Tensor], dtype: torch.dtype, fixed_order: bool = False
    ) -> Tensor:
        """ΔW in the shape the factors imply (loraforge.ops.deltas), scale included."""
        raise NotImplementedError

    def natural_exact(self, module: AdapterModule, factors: dict[str, Tensor]) -> tuple[int, Callable[[int], Fraction]]:
        """(rounding depth, exact natural-ΔW element by flat index, scale excluded): for certified bakes."""
        raise NotImplementedError

    def low_rank(self, module: AdapterModule, factors: Mapping[str, Tensor]) -> tuple[Tensor, Tensor] | None:
        """(up, down) float64 matrices as stored when ΔW = scale·up @ down; None otherwise."""
        return None
