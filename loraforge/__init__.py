"""loraforge: declarative, reproducible builds of Stable Diffusion model releases."""

__version__ = "0.1.0"
