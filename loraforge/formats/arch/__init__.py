"""Architecture tables (SD 1.x, SD 2.x, SDXL base), detection and block weights.

    get_architecture(name, size="full") -> Architecture
    detect_architecture({key: shape}) -> Detection
    parse_block_weights(spec, arch) -> BlockWeights   (block_weights.py)
"""

from .block_weights import PRESETS, BlockWeightError, BlockWeights, parse_block_weights
from .detect import Detection, detect_architecture
from .registry import ARCHITECTURE_NAMES, SIZES, UnknownArchitectureError, get_architecture, get_config
from .table import COMPONENTS, TEXT_ENCODERS, Architecture, ModuleSpec, TensorSpec

__all__ = [
    "ARCHITECTURE_NAMES",
    "PRESETS",
    "BlockWeightError",
    "BlockWeights",
    "parse_block_weights",
    "COMPONENTS",
    "SIZES",
    "TEXT_ENCODERS",
    "Architecture",
    "Detection",
    "ModuleSpec",
    "TensorSpec",
    "UnknownArchitectureError",
    "detect_architecture",
    "get_architecture",
    "get_config",
]
