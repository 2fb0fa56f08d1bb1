"""Name/size -> configuration -> cached Architecture."""

from __future__ import annotations

from functools import lru_cache

from ...errors import PlanError
from . import sd1, sd2, sdxl
from .family import ArchitectureConfig, assemble
from .table import Architecture

ARCHITECTURE_NAMES: tuple[str, ...] = ("sd1", "sd2", "sdxl")
SIZES: tuple[str, ...] = ("full", "tiny")

_CONFIG_FACTORIES = {"sd1": sd1.config, "sd2": sd2.config, "sdxl": sdxl.config}


class UnknownArchitectureError(PlanError):
    """An architecture name or size that loraforge does not know."""


def _check(name: str, size: str) -> None:
    if name not in _CONFIG_FACTORIES:
        raise UnknownArchitectureError(
            f"Unknown architecture {name!r}. Supported architectures are: "
            f"{', '.join(ARCHITECTURE_NAMES)} (Stable Diffusion 1.x, 2.x and XL base). "
            "Fix the architecture name in the recipe, or leave it out to detect it from the base checkpoint."
        )
    if size not in SIZES:
        raise UnknownArchitectureError(
            f"Unknown size {size!r} for architecture {name!r}; valid sizes are: {', '.join(SIZES)} "
            "('full' is the real model, 'tiny' has the same keys with small channel counts for tests)."
        )


@lru_cache(maxsize=None)
def get_config(name: str, size: str = "full") -> ArchitectureConfig:
    _check(name, size)
    return _CONFIG_FACTORIES[name](size)


def get_architecture(name: str, size: str = "full") -> Architecture:
    """The architecture table ``name`` ("sd1", "sd2", "sdxl") at ``size`` ("full", "tiny"); built once."""
    return _build(name, size)


@lru_cache(maxsize=None)
def _build(name: str, size: str) -> Architecture:
    return assemble(get_config(name, size))
