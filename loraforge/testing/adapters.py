"""Synthetic adapters of every supported kind, with an architecture's real key names.

Tests and benchmarks need LoRA, LoCon, LoHa, LoKr, DoRA, full-diff and PEFT
files without downloads. Every value is a pure function of (seed, kind, module
name, tensor role) through sha256-derived generator seeds, so the same
arguments give a byte-identical file on any machine, thread count or
PYTHONHASHSEED.

Magnitudes: factors are scaled so that each module's ΔW has a standard
deviation near DELTA_STD, a tenth of the synthetic checkpoints' weights
(N(0, 0.02), see checkpoints.py) - the size of a trained LoRA's effect.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence

import torch

from loraforge.formats import dtypes
from loraforge.formats.arch.table import Architecture, ModuleSpec
from loraforge.formats.safetensors_writer import WriteResult, save_tensors
from loraforge.ops.deltas import lora_scale

DELTA_STD = 0.002
KINDS = ("lora", "loha", "lokr", "lokr-full", "lokr-both", "diff", "peft")
_UNET_ATTENTION_PARTS = ("_attn1_", "_attn2_", "_ff_net_")


def derived_seed(seed: int, *parts: str) -> int:
    """A 63-bit generator seed from the seed and names via sha256 (never hash(), never dict order)."""
    digest = hashlib.sha256("\x00".join([str(seed), *parts]).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# --------------------------------------------------------------------------- targets


def is_attention_target(spec: ModuleSpec) -> bool:
    """What a standard kohya LoRA adapts: text-encoder linears and the UNet's transformer blocks."""
    if spec.is_text_encoder:
        return True
    name = spec.kohya
    return any(part in name for part in _UNET_ATTENTION_PARTS) or name.endswith(("_proj_in", "_proj_out"))


def select_targets(arch: Architecture, targets, text_encoder: bool) -> list[ModuleSpec]:
    """The architecture modules an adapter covers, in table order."""
    if targets == "attn":
        chosen = [m for m in arch.modules if is_attention_target(m)]
    elif targets == "all":
        chosen = list(arch.modules)
    else:
        wanted = list(targets)
        unknown = sorted(set(wanted) - set(arch.module_by_kohya))
        if unknown:
            raise ValueError(f"not kohya module names of {arch.name}: {unknown[:5]}")
        chosen = [arch.module_by_kohya[name] for name in wanted]
    if not text_encoder:
        chosen = [m for m in chosen if not m.is_text_encoder]
    return chosen


# --------------------------------------------------------------------------- values


class _Draw:
    """Normal draws for one module, each role seeded on its own."""

    def __init__(self, seed: int, kind: str, name: str):
        self.seed, self.kind, self.name = seed, kind, name

    def normal(self, role: str, shape: Sequence[int], std: float) -> torch.Tensor:
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.kind, self.name, role))
        return torch.randn(tuple(shape), generator=generator, dtype=torch.float32) * std

    def positive(self, role: str, shape: Sequence[int]) -> torch.Tensor:
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.kind, self.name, role))
        return torch.rand(tuple(shape), generator=generator, dtype=torch.float32) * 0.5 + 0.75


def _kernel(spec: ModuleSpec) -> tuple[int, ...]:
    return tuple(spec.shape[2:])


def _is_spatial(spec: ModuleSpec) -> bool:
    return spec.is_conv and any(k != 1 for k in _kernel(spec))


def _lora_tensors(draw: _Draw, spec: ModuleSpec, rank: int, scale: float, tucker: bool, peft: bool) -> dict:
    out, cin = spec.shape[0], spec.shape[1]
    kernel = _kernel(spec)
    down_role, up_role = ("lora_A.weight", "lora_B.weight") if peft else ("lora_down.weight", "lora_up.weight")
    if tucker and _is_spatial(spec) and not peft:
        return {
            down_role: draw.normal(down_role, (rank, cin, 1, 1), 1.0),
            "lora_mid.weight": draw.normal("lora_mid.weight", (rank, rank, *kernel), 1.0),
            up_role: draw.normal(up_role, (out, rank, 1, 1), DELTA_STD / (scale * rank)),
        }
    unit = (1,) * len(kernel)
    return {
        down_role: draw.normal(down_role, (rank, cin, *kernel), 1.0),
        up_role: draw.normal(up_role, (out, rank, *unit), DELTA_STD / (scale * math.sqrt(rank))),
    }


def _loha_tensors(draw: _Draw, spec: ModuleSpec, rank: int, scale: float, tucker: bool) -> dict:
    out, cin = spec.shape[0], spec.shape[1]
    half_std = math.sqrt(DELTA_STD / scale)
    tensors = {}
    for half in ("1", "2"):
        if tucker and _is_spatial(spec):
            tensors[f"hada_t{half}"] = draw.normal(f"hada_t{half}", (rank, rank, *_kernel(spec)), 1.0)
            tensors[f"hada_w{half}_a"] = draw.normal(f"hada_w{half}_a", (rank, out), half_std / rank)
            tensors[f"hada_w{half}_b"] = draw.normal(f"hada_w{half}_b", (rank, cin), 1.0)
        else:
            # LyCORIS stores conv LoHa factors flattened: [r, in·kh·kw].
            columns = math.prod(spec.shape[1:])
            tensors[f"hada_w{half}_a"] = draw.normal(f"hada_w{half}_a", (out, rank), half_std / math.sqrt(rank))
            tensors[f"hada_w{half}_b"] = draw.normal(f"hada_w{half}_b", (rank, columns), 1.0)
    return tensors


def factorize(dimension: int) -> tuple[int, int]:
    """(m, n), m ≤ n, m·n = dimension, m the divisor closest to √dimension (LyCORIS ``factorization`` with factor -1)."""
    m = max(d for d in range(1, math.isqrt(dimension) + 1) if dimension % d == 0)
    return m, dimension // m


def _lokr_tensors(draw: _Draw, spec: ModuleSpec, rank: int, scale: float, tucker: bool, variant: str) -> dict:
    out_small, out_big = factorize(spec.shape[0])
    in_small, in_big = factorize(spec.shape[1])
    kernel = _kernel(spec)
    tensors = {}
    if variant == "lokr-both":
        tensors["lokr_w1_a"] = draw.normal("lokr_w1_a", (out_small, rank), 1.0 / math.sqrt(rank))
        tensors["lokr_w1_b"] = draw.normal("lokr_w1_b", (rank, in_small), 1.0)
    else:
        tensors["lokr_w1"] = draw.normal("lokr_w1", (out_small, in_small), 1.0)
    w2_std = DELTA_STD / scale
    if variant == "lokr-full":
        tensors["lokr_w2"] = draw.normal("lokr_w2", (out_big, in_big, *kernel), w2_std)
    elif tucker and _is_spatial(spec):
        tensors["lokr_t2"] = draw.normal("lokr_t2", (rank, rank, *kernel), 1.0)
        tensors["lokr_w2_a"] = draw.normal("lokr_w2_a", (rank, out_big), w2_std / rank)
        tensors["lokr_w2_b"] = draw.normal("lokr_w2_b", (rank, in_big), 1.0)
    else:
        # LyCORIS stores a non-Tucker conv w2_b flattened: [r, d·kh·kw].
        tensors["lokr_w2_a"] = draw.normal("lokr_w2_a", (out_big, rank), w2_std / math.sqrt(rank))
        tensors["lokr_w2_b"] = draw.normal("lokr_w2_b", (rank, in_big * math.prod(kernel)), 1.0)
    return tensors


def _dora_scale(draw: _Draw, spec: ModuleSpec, axis: str, peft: bool) -> torch.Tensor:
    if peft:
        return draw.positive("dora", (spec.shape[0],))
    trailing = (1,) * (len(spec.shape) - 2)
    if axis == "out":
        return draw.positive("dora", (spec.shape[0], 1, *trailing))
    return draw.positive("dora", (1, spec.shape[1], *trailing))


# --------------------------------------------------------------------------- files


def _module_tensors(kind: str, spec: ModuleSpec, draw: _Draw, rank: int, alpha: float, tucker: bool) -> dict:
    if kind == "diff":
        tensors = {"diff": draw.normal("diff", spec.shape, DELTA_STD)}
        if spec.bias_key is not None:
            tensors["diff_b"] = draw.normal("diff_b", spec.shape[:1], DELTA_STD)
        return tensors
    if kind == "lokr-full":
        return _lokr_tensors(draw, spec, rank, 1.0, tucker, kind)
    scale = lora_scale(alpha, rank)
    if kind in ("lora", "peft"):
        return _lora_tensors(draw, spec, rank, scale, tucker, peft=kind == "peft")
    if kind == "loha":
        return _loha_tensors(draw, spec, rank, scale, tucker)
    return _lokr_tensors(draw, spec, rank, scale, tucker, kind)


def adapter_tensors(
    arch: Architecture,
    kind: str,
    *,
    rank: int = 4,
    alpha: float | None = None,
    seed: int = 0,
    targets="attn",
    text_encoder: bool = True,
    tucker: bool = False,
    dora: bool | str = False,
    naming: str = "kohya",
    dtype: str = "F16",
) -> dict[str, torch.Tensor]:
    """The tensors write_synthetic_adapter writes, by key, in the save dtype."""
    if kind not in KINDS:
        raise ValueError(f"unknown synthetic adapter kind {kind!r}; one of {KINDS}")
    alpha_value = float(rank if alpha is None else alpha)
    save_dtype = dtypes.torch_dtype(dtype)
    peft = kind == "peft"
    dora_axis = dora if isinstance(dora, str) else "in"
    tensors: dict[str, torch.Tensor] = {}
    for spec in select_targets(arch, targets, text_encoder):
        name = spec.diffusers if (peft or naming == "diffusers") else spec.kohya
        draw = _Draw(seed, kind, spec.kohya)
        module = _module_tensors(kind, spec, draw, rank, alpha_value, tucker)
        if kind not in ("diff", "peft"):
            # LyCORIS writes alpha = rank for an all-full LoKr, whose scale is 1 anyway.
            module["alpha"] = torch.tensor(float(rank) if kind == "lokr-full" else alpha_value)
        if dora and kind != "diff":
            module["lora_magnitude_vector" if peft else "dora_scale"] = _dora_scale(draw, spec, dora_axis, peft)
        for role, value in module.items():
            tensors[f"{name}.{role}"] = value.to(save_dtype)
    return tensors


def synthetic_metadata(arch: Architecture, kind: str, *, rank: int, alpha: float | None, has_conv: bool) -> dict:
    """Metadata as the tool that makes each kind writes it (kohya sd-scripts, LyCORIS, diffusers)."""
    alpha_value = rank if alpha is None else alpha
    if kind == "peft":
        metadata = {"format": "pt"}
        if alpha is not None:
            config = {"unet.r": rank, "unet.lora_alpha": alpha, "text_encoder.r": rank,
                      "text_encoder.lora_alpha": alpha, "text_encoder_2.r": rank, "text_encoder_2.lora_alpha": alpha}
            metadata["lora_adapter_metadata"] = json.dumps(config, sort_keys=True)
        return metadata
    args: dict[str, str] = {}
    if kind == "lora":
        module = "networks.lora"
        if has_conv:
            args = {"conv_dim": str(rank), "conv_alpha": str(alpha_value)}
    else:
        module = "lycoris.kohya"
        algo = {"loha": "loha", "diff": "full"}.get(kind, "lokr")
        args = {"algo": algo, "conv_dim": str(rank), "conv_alpha": str(alpha_value)}
    return {
        "ss_base_model_version": arch.ss_base_model_version,
        "ss_network_alpha": str(alpha_value),
        "ss_network_args": json.dumps(args, sort_keys=True),
        "ss_network_dim": str(rank),
        "ss_network_module": module,
        "ss_output_name": f"synthetic-{kind}",
        "ss_v2": str(arch.ss_v2),
    }


def write_synthetic_adapter(
    path: str | os.PathLike[str],
    arch: Architecture,
    kind: str,
    *,
    rank: int = 4,
    alpha: float | None = None,
    seed: int = 0,
    targets="attn",
    text_encoder: bool = True,
    tucker: bool = False,
    dora: bool | str = False,
    naming: str = "kohya",
    dtype: str = "F16",
    metadata: Mapping[str, str] | None = None,
) -> WriteResult:
    """Write a synthetic adapter; see the module docstring.

    kind: "lora" (LoCon when ``targets`` includes k×k convs; ``tucker`` adds
    lora_mid cores), "loha", "lokr" (full w1, factorised w2), "lokr-full" (both
    full, scale 1), "lokr-both" (both factorised), "diff" (with diff_b where the
    layer has a bias), "peft" (diffusers names, lora_A/lora_B, alpha in
    ``lora_adapter_metadata`` when given). targets: "attn", "all" or kohya names.
    dora: False, True (per-input-channel dora_scale), "in" or "out"; PEFT
    writes ``lora_magnitude_vector`` [out]. alpha None means alpha = rank.
    """
    tensors = adapter_tensors(
        arch, kind, rank=rank, alpha=alpha, seed=seed, targets=targets, text_encoder=text_encoder,
        tucker=tucker, dora=dora, naming=naming, dtype=dtype,
    )
    has_conv = any(_is_spatial(s) for s in select_targets(arch, targets, text_encoder))
    file_metadata = synthetic_metadata(arch, kind, rank=rank, alpha=alpha, has_conv=has_conv)
    file_metadata.update(metadata or {})
    return save_tensors(path, tensors, dict(sorted(file_metadata.items())))
