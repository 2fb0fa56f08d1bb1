"""LoRA Block Weight block ids and the vector forms that name them.

The ids and forms are those of the LoRA Block Weight extension
(hako-mikan/sd-webui-lora-block-weight), the de-facto standard for per-block
LoRA strengths:

* SD 1.x / 2.x: 26 blocks (BASE = text encoder, IN00-IN11, M00, OUT00-OUT11)
  and the 17-value form that names only the blocks holding a transformer.
* SDXL: 20 blocks (BASE, IN00-IN08, M00, OUT00-OUT08) and the 12-value form
  that names only the blocks holding a transformer.
"""

from __future__ import annotations


def _numbered(prefix: str, count: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i:02d}" for i in range(count))


SD_BLOCKS_26: tuple[str, ...] = ("BASE",) + _numbered("IN", 12) + ("M00",) + _numbered("OUT", 12)
SD_BLOCKS_17: tuple[str, ...] = (
    "BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00",
    "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11",
)
SDXL_BLOCKS_20: tuple[str, ...] = ("BASE",) + _numbered("IN", 9) + ("M00",) + _numbered("OUT", 9)
SDXL_BLOCKS_12: tuple[str, ...] = (
    "BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05",
)

SD_BLOCK_FORMS: dict[int, tuple[str, ...]] = {26: SD_BLOCKS_26, 17: SD_BLOCKS_17}
SDXL_BLOCK_FORMS: dict[int, tuple[str, ...]] = {20: SDXL_BLOCKS_20, 12: SDXL_BLOCKS_12}
