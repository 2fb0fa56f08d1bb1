"""The KL autoencoder (``first_stage_model.*``) shared by SD 1.x, SD 2.x and SDXL.

No LoRA format targets the VAE, so it only contributes tensors. Its attention
layers are 1x1 convolutions in LDM naming (q, k, v, proj_out).
"""

from __future__ import annotations

from dataclasses import dataclass

from ._builder import TableBuilder

VAE_PREFIX = "first_stage_model."


@dataclass(frozen=True)
class VAEConfig:
    channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    image_channels: int = 3
    prefix: str = VAE_PREFIX  # Flux all-in-one files: "vae."
    quant_conv: bool = True  # Flux's autoencoder has no quant_conv / post_quant_conv


class _VAEEmitter:
    def __init__(self, builder: TableBuilder, prefix: str = VAE_PREFIX):
        self.builder = builder
        self.prefix = prefix

    def conv(self, key: str, cout: int, cin: int, kernel: int) -> None:
        self.builder.layer(self.prefix + key, (cout, cin, kernel, kernel), "vae")

    def norm(self, key: str, channels: int) -> None:
        self.builder.norm(self.prefix + key, channels, "vae")

    def resnet(self, key: str, cin: int, cout: int) -> None:
        self.norm(f"{key}.norm1", cin)
        self.conv(f"{key}.conv1", cout, cin, 3)
        self.norm(f"{key}.norm2", cout)
        self.conv(f"{key}.conv2", cout, cout, 3)
        if cin != cout:
            self.conv(f"{key}.nin_shortcut", cout, cin, 1)

    def middle(self, key: str, ch: int) -> None:
        self.resnet(f"{key}.block_1", ch, ch)
        self.norm(f"{key}.attn_1.norm", ch)
        for proj in ("q", "k", "v", "proj_out"):
            self.conv(f"{key}.attn_1.{proj}", ch, ch, 1)
        self.resnet(f"{key}.block_2", ch, ch)


def build_vae(builder: TableBuilder, config: VAEConfig) -> None:
    emit, c = _VAEEmitter(builder, config.prefix), config
    levels = len(c.channel_mult)
    # Encoder: downsampling path, then the middle block, then moments (mean, logvar).
    emit.conv("encoder.conv_in", c.channels, c.image_channels, 3)
    ch = c.channels
    for level, mult in enumerate(c.channel_mult):
        for j in range(c.num_res_blocks):
            emit.resnet(f"encoder.down.{level}.block.{j}", ch, c.channels * mult)
            ch = c.channels * mult
        if level != levels - 1:
            emit.conv(f"encoder.down.{level}.downsample.conv", ch, ch, 3)
    emit.middle("encoder.mid", ch)
    emit.norm("encoder.norm_out", ch)
    emit.conv("encoder.conv_out", 2 * c.z_channels, ch, 3)
    # Decoder: middle block, then the upsampling path; "up" is indexed by level, deepest first.
    emit.conv("decoder.conv_in", ch, c.z_channels, 3)
    emit.middle("decoder.mid", ch)
    for level in reversed(range(levels)):
        out_ch = c.channels * c.channel_mult[level]
        for j in range(c.num_res_blocks + 1):
            emit.resnet(f"decoder.up.{level}.block.{j}", ch, out_ch)
            ch = out_ch
        if level != 0:
            emit.conv(f"decoder.up.{level}.upsample.conv", ch, ch, 3)
    emit.norm("decoder.norm_out", ch)
    emit.conv("decoder.conv_out", c.image_channels, ch, 3)
    if c.quant_conv:
        emit.conv("quant_conv", 2 * c.z_channels, 2 * c.z_channels, 1)
        emit.conv("post_quant_conv", c.z_channels, c.z_channels, 1)
