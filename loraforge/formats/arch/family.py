"""A model family as data, and the one place that turns it into a table.

A :class:`Family` is everything loraforge knows about one architecture: its
metadata strings, its released dimensions, the anchors from which detection
reads a file's dimensions, where an inpainting UNet deviates, and a function
that turns dimensions into an :class:`ArchitectureConfig` of component builder
configs (UNet, text encoders, VAE). sd1.py, sd2.py and sdxl.py are such data;
:func:`assemble` builds the table (tensors in checkpoint order: UNet, text
encoders, VAE, then the remaining tensors of a full checkpoint).

Dimensions are named integers (model channels, context width, ...). The
released model is the family at its ``full`` dimensions; any other values give
a consistently scaled model with the same keys.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ._builder import TableBuilder
from .table import Architecture
from .text_encoders import TextEncoderConfig, build_text_encoder
from .unet import UNetConfig, build_unet
from .vae import VAEConfig, build_vae

# Noise-schedule buffers that LDM's LatentDiffusion registers and that SD 1.x/2.x
# checkpoints therefore carry (one value per training timestep).
SCHEDULE_BUFFERS: tuple[str, ...] = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)
TRAINING_TIMESTEPS = 1000

Dimensions = tuple[tuple[str, int], ...]  # (name, value) in the family's order
# One way to read a dimension from a file: (tensor key, axis, divisor).
Anchor = tuple[str, int, int]


@dataclass(frozen=True)
class ArchitectureConfig:
    family: "Family"
    dimensions: Dimensions
    float_dtype: str
    unet: UNetConfig | None  # None for a family whose denoiser is built by ``builders`` (Flux's transformer)
    text_encoders: tuple[TextEncoderConfig, ...]
    vae: VAEConfig | None
    block_forms: tuple[tuple[int, tuple[str, ...]], ...]  # (length, block ids), longest first
    # Other tensors of a full checkpoint: (key, shape, dtype or None for float_dtype).
    other: tuple[tuple[str, tuple[int, ...], str | None], ...] = ()
    # Component builders a family defines itself (flux.py: the transformer, T5), run before the UNet.
    builders: tuple[Callable[[TableBuilder], None], ...] = ()
    # A family with variants (Flux dev / schnell / Fill) names the one these dimensions describe.
    variant: str = ""
    title: str | None = None  # the family's title where None
    modelspec_architecture: str | None = None  # the family's where None


@dataclass(frozen=True)
class Family:
    """One architecture family: naming, metadata, dimensions, detection anchors and builders."""

    name: str  # "sd1"
    title: str  # "Stable Diffusion 1.x"
    modelspec_architecture: str  # ModelSpec ``modelspec.architecture``
    modelspec_implementation: str  # ModelSpec ``modelspec.implementation``: the reference code base
    ss_base_model_version: str  # kohya ``ss_base_model_version``
    ss_v2: bool  # kohya ``ss_v2``
    full: Dimensions  # the released model's dimensions
    # Detection anchors: dimension name -> the places it can be read from, first present wins.
    anchors: tuple[tuple[str, tuple[Anchor, ...]], ...]
    configure: Callable[[Mapping[str, int]], ArchitectureConfig]
    # Inpainting: this tensor may have ``inpaint_in_channels`` inputs instead of the table's.
    inpaint_key: str
    inpaint_in_channels: int
    # Named block-weight presets: (name, one value per block of ``preset_form``).
    block_presets: tuple[tuple[str, tuple[float, ...]], ...] = ()
    preset_form: tuple[str, ...] = ()
    # Named presets given as one value per block-id prefix (flux.py: CLIP, T5, IN, D, S, OUT), so they
    # fit any block count (a scaled model's): (name, ((prefix, value), ...)); every prefix is named.
    group_presets: tuple[tuple[str, tuple[tuple[str, float], ...]], ...] = ()
    # Dimensions read by code rather than at one anchor (block counts, the presence of a tensor,
    # the key layout): shapes -> {name: value}; applied after the anchors.
    infer_extra: Callable[[Mapping[str, tuple[int, ...]]], Mapping[str, int]] | None = None
    # Dimensions that pick a variant or a key layout, not a size: ignored when telling full from scaled.
    variant_dimensions: tuple[str, ...] = ()
    # Adapter module-name prefixes -> component, besides the text encoders' own (flux.py: transformer dialects).
    adapter_prefixes: tuple[tuple[str, str], ...] = ()
    ss_network_module: str = "networks.lora"  # kohya ``ss_network_module`` its LoRAs carry (Flux: networks.lora_flux)

    def dimensions(self, values: Mapping[str, int] | None = None) -> Dimensions:
        """The full dimensions with ``values`` put in; unknown names are a ValueError."""
        values = dict(values or {})
        unknown = sorted(set(values) - {name for name, _ in self.full})
        if unknown:
            raise ValueError(
                f"{self.name} has no dimension {', '.join(unknown)}; its dimensions are "
                f"{', '.join(name for name, _ in self.full)}"
            )
        return tuple((name, int(values.get(name, default))) for name, default in self.full)

    def infer(self, shapes: Mapping[str, tuple[int, ...]]) -> Dimensions:
        """The dimensions a file's tensors imply, read at the anchors (the full value where none is present)."""
        found = {}
        for name, anchors in self.anchors:
            for key, axis, divisor in anchors:
                shape = shapes.get(key)
                if shape is not None and len(shape) > axis and shape[axis] > 0 and shape[axis] % divisor == 0:
                    found[name] = int(shape[axis]) // divisor
                    break
        if self.infer_extra is not None:
            found.update(self.infer_extra(shapes))
        return self.dimensions(found)

    def is_full(self, dimensions: Dimensions) -> bool:
        """The released model's size (variant and layout dimensions aside)."""
        sizes = dict(self.full)
        return all(value == sizes[name] for name, value in dimensions if name not in self.variant_dimensions)


def schedule_tensors() -> tuple[tuple[str, tuple[int, ...], None], ...]:
    return tuple((name, (TRAINING_TIMESTEPS,), None) for name in SCHEDULE_BUFFERS)


def assemble(config: ArchitectureConfig) -> Architecture:
    builder = TableBuilder(config.float_dtype)
    for build in config.builders:
        build(builder)
    if config.unet is not None:
        build_unet(builder, config.unet)
    for text_encoder in config.text_encoders:
        build_text_encoder(builder, text_encoder)
    if config.vae is not None:
        build_vae(builder, config.vae)
    for key, shape, dtype in config.other:
        builder.tensor(key, shape, "other", dtype=dtype)
    family = config.family
    return Architecture(
        name=family.name,
        title=config.title or family.title,
        size="full" if family.is_full(config.dimensions) else "scaled",
        modelspec_architecture=config.modelspec_architecture or family.modelspec_architecture,
        ss_base_model_version=family.ss_base_model_version,
        tensors=tuple(builder.tensors),
        modules=tuple(builder.modules),
        block_forms=dict(config.block_forms),
        modelspec_implementation=family.modelspec_implementation,
        ss_v2=family.ss_v2,
        dimensions=config.dimensions,
        variant=config.variant,
        ss_network_module=family.ss_network_module,
    )
