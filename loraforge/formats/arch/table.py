"""The data model of an architecture table.

An architecture is data: the list of checkpoint tensors (key, shape, dtype,
component) and the list of LoRA-targetable modules (their kohya and diffusers
names, the checkpoint key they live in, and their LoRA-Block-Weight block).
Everything else - key maps, block-weight tables, synthetic models for tests
and benchmarks - is derived from these two lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

# Components a checkpoint tensor belongs to. SD1/SD2 have one text encoder
# ("te"); SDXL has two ("te1" = CLIP ViT-L, "te2" = OpenCLIP ViT-bigG).
COMPONENTS = ("unet", "te", "te1", "te2", "vae", "other")  # Flux: transformer "unet", CLIP-L "te1", T5 "te2"
TEXT_ENCODERS = ("te", "te1", "te2")


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a checkpoint."""

    key: str  # checkpoint key, e.g. "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype code: "F32", "I64", ...
    component: str  # one of COMPONENTS


@dataclass(frozen=True)
class ModuleSpec:
    """One LoRA-targetable weight (a linear or conv layer, or a slice of a fused one)."""

    kohya: str  # kohya module name, e.g. "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    diffusers: str  # diffusers/PEFT name with component prefix, e.g. "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    key: str  # checkpoint weight key this module modifies
    rows: tuple[int, int] | None  # [start, stop) slice of the weight's first axis (fused qkv), else None
    shape: tuple[int, ...]  # shape of the target: the weight, or its row slice
    block: str  # LoRA-Block-Weight block id: "BASE", "IN00".."IN11", "M00", "OUT00".."OUT11"
    component: str  # one of COMPONENTS (never "vae"/"other")
    bias_key: str | None = None  # checkpoint bias key of the same layer (for .diff_b), if any
    # The adapter's ΔW rows are [a; b] and land as [b; a]: diffusers' norm_out.linear is BFL's
    # final_layer.adaLN_modulation.1 with scale and shift swapped (formats/adapters/flux_names.py).
    swap_halves: bool = False

    @property
    def is_conv(self) -> bool:
        return len(self.shape) == 4

    @property
    def is_text_encoder(self) -> bool:
        return self.component in TEXT_ENCODERS


@dataclass(frozen=True)
class Architecture:
    """A family member (sd1.py, sd2.py, sdxl.py) built at one set of dimensions."""

    name: str  # "sd1", "sd2", "sdxl"
    title: str  # "Stable Diffusion 1.x"
    size: str  # "full" (the released dimensions) or "scaled" (same keys, other dimensions)
    modelspec_architecture: str  # "stable-diffusion-v1", "stable-diffusion-v2-768-v", "stable-diffusion-xl-v1-base"
    ss_base_model_version: str  # kohya metadata: "sd_v1", "sd_v2", "sdxl_base_v1-0"
    tensors: tuple[TensorSpec, ...]
    modules: tuple[ModuleSpec, ...]
    # LoRA-Block-Weight forms: vector length -> the block id of each position.
    block_forms: dict[int, tuple[str, ...]] = field(hash=False, compare=False)
    modelspec_implementation: str = ""  # ModelSpec: the reference code base whose key layout the files use
    ss_v2: bool = False  # kohya metadata ``ss_v2``
    dimensions: tuple[tuple[str, int], ...] = ()  # (name, value), e.g. ("model_channels", 320)
    variant: str = ""  # a family's variant where it has several (Flux: "dev", "schnell", "fill", "control")
    ss_network_module: str = "networks.lora"  # kohya ``ss_network_module`` of a LoRA for this family

    @property
    def dimensions_text(self) -> str:
        """``model channels 320, context 768, ...``"""
        return ", ".join(f"{name.replace('_', ' ')} {value}" for name, value in self.dimensions)

    @property
    def size_text(self) -> str:
        """``full size``, or the dimensions of a scaled model."""
        return "full size" if self.size == "full" else f"scaled: {self.dimensions_text}"

    @cached_property
    def tensor_by_key(self) -> dict[str, TensorSpec]:
        return {t.key: t for t in self.tensors}

    @cached_property
    def module_by_kohya(self) -> dict[str, ModuleSpec]:
        return {m.kohya: m for m in self.modules}

    @cached_property
    def module_by_diffusers(self) -> dict[str, ModuleSpec]:
        return {m.diffusers: m for m in self.modules}

    @cached_property
    def _whole_modules(self) -> dict[str, ModuleSpec]:
        return {m.key: m for m in self.modules if m.rows is None and not m.swap_halves}

    def whole_module(self, spec: ModuleSpec) -> ModuleSpec:
        """The table row of the whole weight a row slice (or swapped view) lands on, where the table has one.

        Flux: diffusers' split ``attn.to_q`` -> BFL's fused ``img_attn.qkv``. Merges write this row, so
        split and fused inputs of one layer merge into one fused module. OpenCLIP's q/k/v slices have no
        whole row and stay as they are.
        """
        if spec.rows is None and not spec.swap_halves:
            return spec
        return self._whole_modules.get(spec.key, spec)

    @cached_property
    def full_block_form(self) -> tuple[str, ...]:
        """The longest form: it names every block."""
        return self.block_forms[max(self.block_forms)]
