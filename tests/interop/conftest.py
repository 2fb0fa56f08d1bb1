"""The interop layer: adapters made by the real producers, baked by loraforge, compared with the producers.

Needs the `[interop]` extra (diffusers, peft, transformers, LyCORIS at the
pinned versions); without it every test here is skipped.
"""

from __future__ import annotations

import pytest

for _package in ("diffusers", "peft", "transformers", "lycoris"):
    pytest.importorskip(_package, reason="the interop tests need the [interop] extra: pip install -e '.[interop]'")

from loraforge.formats.arch import get_architecture  # noqa: E402

from interop_harness import Setup  # noqa: E402

# Smaller than loraforge.testing's presets (the producers run in float64 layer by layer); every
# width a multiple of 8 so the diffusers models can use 8 GroupNorm groups.
DIMENSIONS = {
    "sd1": {"model_channels": 8, "context": 16, "vocab": 32, "vae_channels": 8},
    "sdxl": {
        "model_channels": 8, "context": 8 + 16, "clip_l_width": 8, "clip_g_width": 16, "vocab": 32,
        "adm_in_channels": 16 + 6 * 8, "vae_channels": 8,
    },
}


@pytest.fixture(scope="module")
def sd1(tmp_path_factory) -> Setup:
    return Setup(get_architecture("sd1", DIMENSIONS["sd1"]), tmp_path_factory.mktemp("sd1"))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory) -> Setup:
    return Setup(get_architecture("sdxl", DIMENSIONS["sdxl"]), tmp_path_factory.mktemp("sdxl"))
