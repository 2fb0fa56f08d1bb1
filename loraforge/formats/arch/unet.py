"""The LDM/SGM UNet of SD 1.x, SD 2.x and SDXL, generated from a config.

Two things come out of one walk over the network:

* the checkpoint tensors under ``model.diffusion_model.`` in original (LDM/SGM)
  naming, with shapes;
* the LDM <-> diffusers rule table (:func:`unit_map`): one row per *unit*
  (a resnet, a transformer, a down/upsampler, a top-level layer) saying which
  LDM path prefix is which diffusers path prefix. Inside a resnet the layer
  names differ as well (:data:`RESNET_RENAMES`); inside transformers they are
  identical. The module names of every LoRA target are derived from this table,
  so the table is exercised by every key of every architecture.

Block ids follow LoRA Block Weight: ``input_blocks.N`` -> ``IN{N:02}``,
``middle_block`` -> ``M00``, ``output_blocks.N`` -> ``OUT{N:02}``. The time and
label embeddings sit before the first input block and go to IN00, the final
norm/conv after the last output block go to the last OUT block (the convention
of the block-merge tools that split a full checkpoint into 25/19 blocks).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from ._builder import TableBuilder, kohya_name

UNET_PREFIX = "model.diffusion_model."
DIFFUSERS_UNET_PREFIX = "unet."
KOHYA_UNET_PREFIX = "lora_unet_"

# Layer names inside a resnet: LDM name -> diffusers name.
RESNET_RENAMES: tuple[tuple[str, str], ...] = (
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
)


@dataclass(frozen=True)
class UNetConfig:
    model_channels: int  # 320 in every full-size model
    channel_mult: tuple[int, ...]  # per level
    transformer_depth: tuple[int, ...]  # transformer blocks per attention, per level (0 = no attention)
    transformer_depth_middle: int
    context_dim: int  # cross-attention key/value input width
    linear_proj: bool  # proj_in/proj_out are Linear (SD2, SDXL) instead of 1x1 Conv (SD1)
    kohya_uses_ldm_names: bool  # SDXL kohya names follow LDM paths; SD1/2 follow diffusers paths
    adm_in_channels: int | None = None  # SDXL: width of the vector conditioning (label_emb)
    num_res_blocks: int = 2
    in_channels: int = 4
    out_channels: int = 4

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels


@dataclass(frozen=True)
class Unit:
    """One row of the LDM <-> diffusers rule table."""

    ldm: str  # LDM path prefix without "model.diffusion_model.", e.g. "input_blocks.4.1"
    diffusers: str  # diffusers path prefix without "unet.", e.g. "down_blocks.1.attentions.0"
    kind: str  # "layer" | "resnet" | "attention" | "downsample" | "upsample"
    block: str  # LoRA-Block-Weight block id


def ldm_block_id(ldm_path: str, last_output_block: int) -> str:
    """The LBW block of a UNet path (LDM naming, without the model prefix)."""
    head, _, rest = ldm_path.partition(".")
    if head == "input_blocks":
        return f"IN{int(rest.split('.')[0]):02d}"
    if head == "middle_block":
        return "M00"
    if head == "output_blocks":
        return f"OUT{int(rest.split('.')[0]):02d}"
    if head in ("time_embed", "label_emb"):
        return "IN00"
    if head == "out":
        return f"OUT{last_output_block:02d}"
    raise ValueError(f"not a UNet path: {ldm_path}")


def _walk_units(config: UNetConfig) -> list[tuple[Unit, dict]]:
    """Every unit of the network in forward order, with the channel facts it needs."""
    mc, levels = config.model_channels, len(config.channel_mult)
    rows: list[tuple[str, str, str, dict]] = [
        ("time_embed.0", "time_embedding.linear_1", "layer", {}),
        ("time_embed.2", "time_embedding.linear_2", "layer", {}),
    ]
    if config.adm_in_channels:
        rows += [("label_emb.0.0", "add_embedding.linear_1", "layer", {}), ("label_emb.0.2", "add_embedding.linear_2", "layer", {})]
    rows.append(("input_blocks.0.0", "conv_in", "layer", {}))
    ch, skip_channels, index = mc, [mc], 1
    for level, mult in enumerate(config.channel_mult):
        for j in range(config.num_res_blocks):
            out_ch = mc * mult
            rows.append((f"input_blocks.{index}.0", f"down_blocks.{level}.resnets.{j}", "resnet", {"cin": ch, "cout": out_ch}))
            ch = out_ch
            if config.transformer_depth[level]:
                rows.append((f"input_blocks.{index}.1", f"down_blocks.{level}.attentions.{j}", "attention",
                             {"ch": ch, "depth": config.transformer_depth[level]}))
            skip_channels.append(ch)
            index += 1
        if level != levels - 1:
            rows.append((f"input_blocks.{index}.0.op", f"down_blocks.{level}.downsamplers.0.conv", "downsample", {"ch": ch}))
            skip_channels.append(ch)
            index += 1
    rows.append(("middle_block.0", "mid_block.resnets.0", "resnet", {"cin": ch, "cout": ch}))
    rows.append(("middle_block.1", "mid_block.attentions.0", "attention", {"ch": ch, "depth": config.transformer_depth_middle}))
    rows.append(("middle_block.2", "mid_block.resnets.1", "resnet", {"cin": ch, "cout": ch}))
    index = 0
    for up, level in enumerate(reversed(range(levels))):
        out_ch = mc * config.channel_mult[level]
        for j in range(config.num_res_blocks + 1):
            rows.append((f"output_blocks.{index}.0", f"up_blocks.{up}.resnets.{j}", "resnet",
                         {"cin": ch + skip_channels.pop(), "cout": out_ch}))
            ch = out_ch
            position = 1
            if config.transformer_depth[level]:
                rows.append((f"output_blocks.{index}.1", f"up_blocks.{up}.attentions.{j}", "attention",
                             {"ch": ch, "depth": config.transformer_depth[level]}))
                position = 2
            if level and j == config.num_res_blocks:
                rows.append((f"output_blocks.{index}.{position}.conv", f"up_blocks.{up}.upsamplers.0.conv", "upsample", {"ch": ch}))
            index += 1
    last_output_block = index - 1
    rows += [("out.0", "conv_norm_out", "layer", {}), ("out.2", "conv_out", "layer", {})]
    return [(Unit(ldm, dif, kind, ldm_block_id(ldm, last_output_block)), facts) for ldm, dif, kind, facts in rows]


@lru_cache(maxsize=None)
def unit_map(config: UNetConfig) -> tuple[Unit, ...]:
    """The LDM <-> diffusers rule table of one UNet config (forward order)."""
    return tuple(unit for unit, _ in _walk_units(config))


def ldm_to_diffusers(config: UNetConfig, ldm_layer_path: str) -> str:
    """Translate an LDM layer path (``input_blocks.1.0.in_layers.2``) to diffusers naming."""
    for unit in unit_map(config):
        if ldm_layer_path == unit.ldm or ldm_layer_path.startswith(unit.ldm + "."):
            inner = ldm_layer_path[len(unit.ldm) + 1:]
            if unit.kind == "resnet":
                inner = dict(RESNET_RENAMES)[inner]
            return unit.diffusers + ("." + inner if inner else "")
    raise KeyError(ldm_layer_path)


def diffusers_to_ldm(config: UNetConfig, diffusers_layer_path: str) -> str:
    """The inverse of :func:`ldm_to_diffusers`."""
    for unit in unit_map(config):
        if diffusers_layer_path == unit.diffusers or diffusers_layer_path.startswith(unit.diffusers + "."):
            inner = diffusers_layer_path[len(unit.diffusers) + 1:]
            if unit.kind == "resnet":
                inner = {d: ldm for ldm, d in RESNET_RENAMES}[inner]
            return unit.ldm + ("." + inner if inner else "")
    raise KeyError(diffusers_layer_path)


class _UNetEmitter:
    """Writes the tensors and modules of each unit into a TableBuilder."""

    def __init__(self, builder: TableBuilder, config: UNetConfig):
        self.builder, self.config = builder, config

    def layer(self, unit: Unit, inner: str, shape: tuple[int, ...], *, bias: bool = True) -> None:
        ldm_path = unit.ldm + ("." + inner if inner else "")
        diffusers_inner = dict(RESNET_RENAMES)[inner] if unit.kind == "resnet" else inner
        diffusers_path = unit.diffusers + ("." + diffusers_inner if diffusers_inner else "")
        kohya_path = ldm_path if self.config.kohya_uses_ldm_names else diffusers_path
        target = (kohya_name(KOHYA_UNET_PREFIX, kohya_path), DIFFUSERS_UNET_PREFIX + diffusers_path, unit.block)
        self.builder.layer(UNET_PREFIX + ldm_path, shape, "unet", bias=bias, target=target)

    def norm(self, unit: Unit, inner: str, channels: int) -> None:
        self.builder.norm(UNET_PREFIX + unit.ldm + ("." + inner if inner else ""), channels, "unet")

    def resnet(self, unit: Unit, cin: int, cout: int) -> None:
        self.norm(unit, "in_layers.0", cin)
        self.layer(unit, "in_layers.2", (cout, cin, 3, 3))
        self.layer(unit, "emb_layers.1", (cout, self.config.time_embed_dim))
        self.norm(unit, "out_layers.0", cout)
        self.layer(unit, "out_layers.3", (cout, cout, 3, 3))
        if cin != cout:
            self.layer(unit, "skip_connection", (cout, cin, 1, 1))

    def attention(self, unit: Unit, ch: int, depth: int) -> None:
        proj = (ch, ch) if self.config.linear_proj else (ch, ch, 1, 1)
        ctx = self.config.context_dim
        self.norm(unit, "norm", ch)
        self.layer(unit, "proj_in", proj)
        for k in range(depth):
            block = f"transformer_blocks.{k}"
            for attn, kv_in in (("attn1", ch), ("attn2", ctx)):
                self.layer(unit, f"{block}.{attn}.to_q", (ch, ch), bias=False)
                self.layer(unit, f"{block}.{attn}.to_k", (ch, kv_in), bias=False)
                self.layer(unit, f"{block}.{attn}.to_v", (ch, kv_in), bias=False)
                self.layer(unit, f"{block}.{attn}.to_out.0", (ch, ch))
            # GEGLU: the first projection produces value and gate, hence 2 x 4ch.
            self.layer(unit, f"{block}.ff.net.0.proj", (8 * ch, ch))
            self.layer(unit, f"{block}.ff.net.2", (ch, 4 * ch))
            for norm in ("norm1", "norm2", "norm3"):
                self.norm(unit, f"{block}.{norm}", ch)
        self.layer(unit, "proj_out", proj)

    def top_level(self, unit: Unit) -> None:
        c, mc, temb = self.config, self.config.model_channels, self.config.time_embed_dim
        shapes = {
            "input_blocks.0.0": (mc, c.in_channels, 3, 3),
            "time_embed.0": (temb, mc),
            "time_embed.2": (temb, temb),
            "label_emb.0.0": (temb, c.adm_in_channels),
            "label_emb.0.2": (temb, temb),
            "out.2": (c.out_channels, mc, 3, 3),
        }
        if unit.ldm == "out.0":
            self.norm(unit, "", mc)
        else:
            self.layer(unit, "", shapes[unit.ldm])


def build_unet(builder: TableBuilder, config: UNetConfig) -> None:
    """Append the UNet tensors and modules of ``config`` to ``builder``."""
    emit = _UNetEmitter(builder, config)
    for unit, facts in _walk_units(config):
        if unit.kind == "resnet":
            emit.resnet(unit, facts["cin"], facts["cout"])
        elif unit.kind == "attention":
            emit.attention(unit, facts["ch"], facts["depth"])
        elif unit.kind in ("downsample", "upsample"):
            emit.layer(unit, "", (facts["ch"], facts["ch"], 3, 3))
        else:
            emit.top_level(unit)
