"""Architecture tables (SD 1.x, SD 2.x, SDXL base), detection and block weights.

    get_architecture(name, dimensions=None) -> Architecture   (the released model when None)
    get_family(name) -> Family   (sd1.py, sd2.py, sdxl.py: the families as data)
    detect_architecture({key: shape}) -> Detection
    parse_block_weights(spec, arch) -> BlockWeights   (block_weights.py)
"""

from .block_weights import PRESETS, BlockWeightError, BlockWeights, parse_block_weights
from .detect import Detection, detect_architecture
from .family import Family
from .registry import (
    ARCHITECTURE_NAMES,
    FAMILIES,
    UnknownArchitectureError,
    component_prefixes,
    get_architecture,
    get_config,
    get_family,
)
from .table import COMPONENTS, TEXT_ENCODERS, Architecture, ModuleSpec, TensorSpec

__all__ = [
    "ARCHITECTURE_NAMES",
    "PRESETS",
    "BlockWeightError",
    "BlockWeights",
    "parse_block_weights",
    "COMPONENTS",
    "FAMILIES",
    "Family",
    "TEXT_ENCODERS",
    "Architecture",
    "Detection",
    "ModuleSpec",
    "TensorSpec",
    "UnknownArchitectureError",
    "detect_architecture",
    "get_architecture",
    "component_prefixes",
    "get_config",
    "get_family",
]
