"""Regenerate the small synthetic inputs of the example recipes (fixed seeds).

    python recipes/make_demo_inputs.py

The files are committed so that the README's quick start needs no download;
this script is how they were made, and running it again reproduces them byte
for byte (the recipes pin their sha256). They are tiny models with the real
key names and shapes scaled down, not real weights: outputs are useful for
checking the pipeline, not for generating images.
"""

from __future__ import annotations

from pathlib import Path

from loraforge.testing.adapters import write_synthetic_adapter
from loraforge.testing.arch import tiny_architecture
from loraforge.testing.checkpoints import write_synthetic_checkpoint
from loraforge.testing.flux import write_flux_diffusers_lora

MODELS = Path(__file__).resolve().parent / "models"


def make_sd15_demo() -> None:
    arch = tiny_architecture("sd1")
    write_synthetic_checkpoint(MODELS / "tiny-sd15-base.safetensors", arch, seed=1, dtype="F16")
    write_synthetic_adapter(MODELS / "neon-lora.safetensors", arch, "lora", rank=8, alpha=4, seed=2)
    write_synthetic_adapter(MODELS / "noir-locon.safetensors", arch, "lora", rank=4, seed=3, targets="all")
    write_synthetic_adapter(MODELS / "grain-loha.safetensors", arch, "loha", rank=4, seed=4, text_encoder=False)


def make_merge_demo() -> None:
    # Two more SD 1.5 checkpoints at the base's dimensions for recipes/merge-checkpoints.yaml
    # (stand-ins for two fine-tunes of the base; other seeds, same generator).
    arch = tiny_architecture("sd1")
    write_synthetic_checkpoint(MODELS / "tiny-sd15-anime.safetensors", arch, seed=5, dtype="F16")
    write_synthetic_checkpoint(MODELS / "tiny-sd15-photo.safetensors", arch, seed=6, dtype="F16")


def make_sdxl_demo() -> None:
    arch = tiny_architecture("sdxl")
    write_synthetic_checkpoint(MODELS / "tiny-sdxl-base.safetensors", arch, seed=11, dtype="F16")
    write_synthetic_adapter(MODELS / "xl-style-lora.safetensors", arch, "lora", rank=8, seed=12)
    write_synthetic_adapter(MODELS / "xl-detail-lokr.safetensors", arch, "lokr", rank=4, seed=13, text_encoder=False)


def make_flux_demo() -> None:
    arch = tiny_architecture("flux")  # Flux.1 dev, all-in-one layout (transformer, CLIP-L, T5, VAE)
    write_synthetic_checkpoint(MODELS / "tiny-flux-dev.safetensors", arch, seed=21, dtype="BF16")
    write_synthetic_adapter(MODELS / "flux-style-kohya.safetensors", arch, "lora", rank=4, alpha=2, seed=22,
                            targets=[m.kohya for m in arch.modules if m.component == "unet"], text_encoder=False)
    write_flux_diffusers_lora(MODELS / "flux-detail-diffusers.safetensors", arch, rank=4, seed=23,
                              blocks=("D01", "S00", "S01", "S02", "OUT"))


if __name__ == "__main__":
    MODELS.mkdir(parents=True, exist_ok=True)
    make_sd15_demo()
    make_merge_demo()
    make_sdxl_demo()
    make_flux_demo()
    for path in sorted(MODELS.glob("*.safetensors")):
        print(f"{path.relative_to(MODELS.parent)}  {path.stat().st_size} bytes")
