"""kohya LoRA and LoCon (incl. the LyCORIS Tucker/CP form with ``lora_mid``).

Keys: ``<name>.lora_down.weight`` [r,in] or [r,in,kh,kw] (Tucker: [r,in,1,1]),
``<name>.lora_up.weight`` [out,r] or [out,r,1,1], optional
``<name>.lora_mid.weight`` [r,r,kh,kw], optional 0-d ``<name>.alpha``.
The same parser handles the PEFT/diffusers halves (see peft.py), which differ
only in their suffixes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from loraforge.ops import deltas, exact

from .kind import AdapterKind
from .model import AdapterModule, ModuleKeys, rank_mismatch

KIND = "lora"
SUFFIXES = {
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "lora_mid.weight": "mid",
}


def build(mk: ModuleKeys) -> AdapterModule:
    mk.require("up", "down")
    up = mk.ndim_in("up", (2, 4))
    down = mk.ndim_in("down", (2, 4))
    if len(up) != len(down):
        raise mk.error(
            f"mixes a {len(up)}-D {mk.keys['up']} {list(up)} with a {len(down)}-D {mk.keys['down']} {list(down)}",
            "Both halves of a LoRA are linear (2-D) or both conv (4-D); re-export the adapter.",
        )
    if len(up) == 4 and tuple(up[2:]) != (1, 1):
        raise mk.error(
            f"has {mk.keys['up']} with a {up[2]}×{up[3]} kernel; LoRA/LoCon up factors are 1×1",
            "This layout is not a kohya/LyCORIS LoCon; re-export the adapter.",
        )
    if up[1] != down[0]:
        raise rank_mismatch(mk, "down", 0, "up", 1)
    mid = _check_mid(mk, up, down) if "mid" in mk.keys else None
    return mk.build(
        kind=KIND,
        scale=deltas.lora_scale(mk.alpha, down[0]),
        tucker=mid is not None,
        rank=down[0],
        delta_shape=deltas.lora_delta_shape(up, down, mid),
    )


def _check_mid(mk: ModuleKeys, up: tuple[int, ...], down: tuple[int, ...]) -> tuple[int, ...]:
    mid = mk.ndim_in("mid", (4,))
    rank = down[0]
    if len(down) != 4 or tuple(down[2:]) != (1, 1):
        raise mk.error(
            f"has a Tucker core {mk.keys['mid']} but {mk.keys['down']} of shape {list(down)} is not [rank, in, 1, 1]",
            "A LoCon with lora_mid keeps the kernel in the core; re-export the adapter.",
        )
    if mid[0] != up[1]:
        raise rank_mismatch(mk, "mid", 0, "up", 1)
    if mid[1] != rank:
        raise rank_mismatch(mk, "mid", 1, "down", 0)
    return mid


def natural_delta(module: AdapterModule, factors: dict[str, Tensor], dtype: torch.dtype, fixed_order: bool = False) -> Tensor:
    return deltas.lora_delta(
        factors["up"], factors["down"], scale=module.scale, mid=factors.get("mid"), dtype=dtype, fixed_order=fixed_order
    )


def natural_exact(module: AdapterModule, factors: dict[str, Tensor]) -> tuple[int, exact.ElementFunction]:
    """(rounding depth, exact natural-ΔW element by flat index, scale excluded)."""
    up, down, mid = factors["up"], factors["down"], factors.get("mid")
    return exact.lora_depth(up, mid), lambda index: exact.lora_element(up, down, mid, index)


class LoraKind(AdapterKind):
    """kohya LoRA and LoCon (Tucker core optional); PEFT halves spell the same kind otherwise."""

    name = KIND
    family = "lora"
    suffixes = SUFFIXES
    exact_shape = True
    factored = True

    build = staticmethod(build)

    scale = staticmethod(deltas.lora_scale)

    def label(self, module):
        if module.dora:
            return "DoRA"
        # lora_A/lora_B (and diffusers' lora.down) halves are PEFT's; dotted names with kohya's lora_down/
        # lora_up halves (ComfyUI's diffusion_model.… Flux LoRAs) are kohya-style LoRAs in another naming.
        if module.naming == "diffusers" and not module.keys["down"].endswith("lora_down.weight"):
            return "PEFT LoRA"
        return "LoCon" if module.is_conv or module.tucker else "LoRA"

    natural_delta = staticmethod(natural_delta)
    natural_exact = staticmethod(natural_exact)

    def low_rank(self, module, factors):
        """Plain LoRA/LoCon (no Tucker core, no DoRA): ΔW = up.flatten(1) @ down.flatten(1)."""
        if module.tucker or module.dora:
            return None
        up, down = factors["up"], factors["down"]
        return up.reshape(up.shape[0], -1).to(torch.float64), down.reshape(down.shape[0], -1).to(torch.float64)
