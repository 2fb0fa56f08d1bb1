"""Small dimensions of each family for tests and the demo models (never registered in the product).

The product builds any family at any dimensions (``get_architecture(name,
dimensions)``); these named presets are the small ones the test suite and
recipes/make_demo_inputs.py use. Changing a value changes the demo models'
bytes and therefore the recipes' pinned sha256.
"""

from __future__ import annotations

from types import MappingProxyType

from loraforge.formats.arch import Architecture, get_architecture

TINY: dict[str, MappingProxyType] = {
    "sd1": MappingProxyType({"model_channels": 16, "context": 24, "vocab": 64, "vae_channels": 8}),
    "sd2": MappingProxyType({"model_channels": 16, "context": 32, "vocab": 64, "vae_channels": 8}),
    "sdxl": MappingProxyType({
        "model_channels": 16, "context": 16 + 32, "clip_l_width": 16, "clip_g_width": 32, "vocab": 64,
        "adm_in_channels": 32 + 6 * 8, "vae_channels": 8,
    }),
    # Flux.1 dev, all-in-one layout: hidden 32 (4 heads of 8), 2 double + 3 single blocks, T5 of 2 layers.
    "flux": MappingProxyType({
        "hidden": 32, "head_dim": 8, "depth": 2, "depth_single": 3, "in_channels": 16, "out_channels": 16,
        "context_in": 24, "vec_in": 16, "clip_l_width": 16, "clip_vocab": 64, "t5_width": 24, "t5_heads": 2,
        "t5_inner": 16, "t5_ff": 40, "t5_layers": 2, "t5_vocab": 64, "vae_channels": 8,
    }),
}


def tiny_architecture(name: str) -> Architecture:
    """``name`` ("sd1", "sd2", "sdxl") at the tests' small dimensions."""
    return get_architecture(name, TINY[name])


def architecture_at(name: str, size: str) -> Architecture:
    """``size`` "full" (the released model) or "tiny" (:data:`TINY`)."""
    return get_architecture(name) if size == "full" else tiny_architecture(name)


def is_tiny(arch: Architecture) -> bool:
    return arch.name in TINY and arch.dimensions == get_architecture(arch.name, TINY[arch.name]).dimensions
