"""Family name (+ dimensions) -> configuration -> cached Architecture."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache

from ...errors import PlanError
from . import flux, sd1, sd2, sdxl
from .family import ArchitectureConfig, Dimensions, Family, assemble
from .table import Architecture
from .unet import DIFFUSERS_UNET_PREFIX, KOHYA_UNET_PREFIX

FAMILIES: dict[str, Family] = {family.name: family for family in (sd1.FAMILY, sd2.FAMILY, sdxl.FAMILY, flux.FAMILY)}
ARCHITECTURE_NAMES: tuple[str, ...] = tuple(FAMILIES)


class UnknownArchitectureError(PlanError):
    """An architecture name or dimension that loraforge does not know."""


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise UnknownArchitectureError(
            f"Unknown architecture {name!r}. Supported architectures are: "
            f"{', '.join(ARCHITECTURE_NAMES)} (Stable Diffusion 1.x, 2.x, XL base and Flux.1). "
            "Fix the architecture name in the recipe, or leave it out to detect it from the base checkpoint."
        )
    return FAMILIES[name]


def _dimensions(name: str, dimensions: Mapping[str, int] | Dimensions | None) -> Dimensions:
    try:
        return get_family(name).dimensions(dict(dimensions or {}))
    except ValueError as error:
        raise UnknownArchitectureError(str(error)) from None


def get_config(name: str, dimensions: Mapping[str, int] | Dimensions | None = None) -> ArchitectureConfig:
    """The component configs of ``name`` at ``dimensions`` (the released model's where not given)."""
    dims = _dimensions(name, dimensions)
    return get_family(name).configure(dict(dims))


def get_architecture(name: str, dimensions: Mapping[str, int] | Dimensions | None = None) -> Architecture:
    """The table of ``name`` ("sd1", "sd2", "sdxl") at ``dimensions``; built once per dimensions."""
    return _build(name, _dimensions(name, dimensions))


@lru_cache(maxsize=64)
def _build(name: str, dimensions: Dimensions) -> Architecture:
    return assemble(get_family(name).configure(dict(dimensions)))


def component_prefixes() -> tuple[tuple[str, str], ...]:
    """(adapter module-name prefix, component) of every family: kohya and diffusers, UNet and text encoders."""
    prefixes = {KOHYA_UNET_PREFIX: "unet", DIFFUSERS_UNET_PREFIX: "unet"}
    for name in ARCHITECTURE_NAMES:  # a prefix two families share keeps the first family's component
        for prefix, component in get_family(name).adapter_prefixes:
            prefixes.setdefault(prefix, component)
        for encoder in get_config(name).text_encoders:
            prefixes.setdefault(encoder.kohya_prefix, encoder.component)
            prefixes.setdefault(encoder.diffusers_prefix, encoder.component)
    return tuple(prefixes.items())
