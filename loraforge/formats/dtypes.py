"""Safetensors dtype codes and their torch counterparts.

Only the codes that both safetensors and torch can represent exactly are
supported; sub-byte and unsigned-wide codes (F4, F6_*, U16, U32, U64, C64, ...)
are refused by the reader with a message that lists these.
"""

from __future__ import annotations

import torch

# code -> (torch dtype, bytes per element)
_CODES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
}

# Codes in a fixed, documented order (for messages and tests).
DTYPE_CODES: tuple[str, ...] = tuple(_CODES)

FLOAT_CODES: frozenset[str] = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})

_CODE_BY_TORCH: dict[torch.dtype, str] = {dtype: code for code, (dtype, _) in _CODES.items()}

# Recipe precision names -> codes. Short aliases are accepted because users
# type them; the canonical spelling is the torch name.
_PRECISIONS: dict[str, str] = {
    "float64": "F64",
    "fp64": "F64",
    "float32": "F32",
    "fp32": "F32",
    "float16": "F16",
    "fp16": "F16",
    "half": "F16",
    "bfloat16": "BF16",
    "bf16": "BF16",
}

# The order in which safetensors.torch.save_file lays tensors out: descending
# rank in the Rust `Dtype` enum (its declaration order), then by name. Measured
# with safetensors 0.8: I64, F64, F32, I32, BF16, F16, I16, F8_E4M3, F8_E5M2,
# I8, U8, BOOL.
_SAVE_FILE_RANK: dict[str, int] = {
    "BOOL": 0,
    "U8": 1,
    "I8": 2,
    "F8_E5M2": 3,
    "F8_E4M3": 4,
    "I16": 5,
    "F16": 6,
    "BF16": 7,
    "I32": 8,
    "F32": 9,
    "F64": 10,
    "I64": 11,
}


def is_known_code(code: object) -> bool:
    return isinstance(code, str) and code in _CODES


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype code ("F16" -> torch.float16)."""
    try:
        return _CODES[code][0]
    except KeyError:
        raise ValueError(f"unknown safetensors dtype {code!r}; supported: {', '.join(DTYPE_CODES)}") from None


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors dtype code of a torch dtype (torch.float16 -> "F16")."""
    try:
        return _CODE_BY_TORCH[dtype]
    except KeyError:
        raise ValueError(
            f"torch dtype {dtype} has no safetensors code loraforge supports; supported: {', '.join(DTYPE_CODES)}"
        ) from None


def itemsize(code: str) -> int:
    """Bytes per element of a safetensors dtype code."""
    try:
        return _CODES[code][1]
    except KeyError:
        raise ValueError(f"unknown safetensors dtype {code!r}; supported: {', '.join(DTYPE_CODES)}") from None


def is_float_code(code: str) -> bool:
    return code in FLOAT_CODES


def precision_code(name: str) -> str:
    """The dtype code of a recipe precision name ("bfloat16" -> "BF16").

    A dtype code itself ("F16") is accepted too, so callers may pass either.
    """
    key = name.strip()
    if key.lower() in _PRECISIONS:
        return _PRECISIONS[key.lower()]
    if key.upper() in ("F64", "F32", "F16", "BF16"):
        return key.upper()
    raise ValueError(
        f"unknown precision {name!r}; use one of float16, bfloat16, float32, float64"
    )


def save_file_rank(code: str) -> int:
    """Sort rank safetensors.save_file gives a dtype (higher is written first)."""
    return _SAVE_FILE_RANK[code]
