"""Collects the tensors and LoRA-targetable modules of one architecture table.

The generators (unet.py, text_encoders.py, vae.py) describe *layers*; this
collector turns each layer into its checkpoint tensors (weight, bias) and, for
linear and conv layers of the UNet and text encoders, into a ModuleSpec.
Keeping that translation in one place is what guarantees that every module's
shape equals the shape of the tensor (or row slice) it modifies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .table import ModuleSpec, TensorSpec


@dataclass
class TableBuilder:
    float_dtype: str  # dtype of every floating-point tensor, e.g. "F32" or "F16"
    tensors: list[TensorSpec] = field(default_factory=list)
    modules: list[ModuleSpec] = field(default_factory=list)

    def tensor(self, key: str, shape: tuple[int, ...], component: str, dtype: str | None = None) -> None:
        self.tensors.append(TensorSpec(key, tuple(shape), dtype or self.float_dtype, component))

    def norm(self, key_prefix: str, channels: int, component: str) -> None:
        """A GroupNorm / LayerNorm: weight and bias of one dimension, never a LoRA target."""
        self.tensor(f"{key_prefix}.weight", (channels,), component)
        self.tensor(f"{key_prefix}.bias", (channels,), component)

    def layer(
        self,
        key_prefix: str,
        weight_shape: tuple[int, ...],
        component: str,
        *,
        bias: bool = True,
        target: tuple[str, str, str] | None = None,
    ) -> None:
        """A linear (2-D weight) or conv (4-D weight) layer.

        ``target`` = (kohya name, diffusers name, block id) makes it a LoRA
        target; the VAE passes None because no LoRA format addresses it.
        """
        weight_key = f"{key_prefix}.weight"
        bias_key = f"{key_prefix}.bias" if bias else None
        self.tensor(weight_key, weight_shape, component)
        if bias_key:
            self.tensor(bias_key, (weight_shape[0],), component)
        if target is not None:
            kohya, diffusers, block = target
            self.modules.append(
                ModuleSpec(kohya, diffusers, weight_key, None, tuple(weight_shape), block, component, bias_key)
            )

    def fused_rows(
        self,
        weight_key: str,
        bias_key: str,
        rows: tuple[int, int],
        in_features: int,
        component: str,
        target: tuple[str, str, str],
    ) -> None:
        """A LoRA target that is a row slice of a fused weight (OpenCLIP in_proj: q, k, v).

        The same row range applies to the fused bias.
        """
        kohya, diffusers, block = target
        shape = (rows[1] - rows[0], in_features)
        self.modules.append(ModuleSpec(kohya, diffusers, weight_key, rows, shape, block, component, bias_key))


def kohya_name(prefix: str, dotted_path: str) -> str:
    """kohya module names are a prefix plus the module path with dots as underscores."""
    return prefix + dotted_path.replace(".", "_")
