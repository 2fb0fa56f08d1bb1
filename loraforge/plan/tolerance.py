"""The per-module tolerance of an SVD output rebuilt in another numeric environment.

SVD steps (merge ``method: svd``, resize, extract) compute in float64 and
round once to the save dtype. Another numeric environment (CPU LAPACK vs GPU
cuSOLVER, another BLAS code path or CPU: plan/numeric_environment.py) gives
float64 factors that differ in the last few of their 53 bits; after the
rounding almost every element comes out the same, and the few that sit near
a rounding boundary move by one unit in the last place (ulp) of the save
dtype. Moving *every* element of both factors by one ulp changes the product
by about 2·u relative (u = 2^-p, the unit roundoff of a p-bit significand),
so a bound of ``ULPS`` = 4 unit roundoffs per module is met by any honest
re-rounding with room to spare, while a real change (another rank, a flipped
byte in a high bit, other inputs) is orders of magnitude larger. F32 has 13
more bits than F16, so its bound is 8192× tighter; the float64 SVDs
themselves agree to ~1e-13 on well-separated spectra, far below it.

The build records the number in the lock entry of every SVD target
(``tolerance: {"relative_error": x}``, next to ``device_class`` and
``numeric_environment``), so
``verify`` checks against what the lock promised, not against whatever this
version of loraforge would choose.
"""

from __future__ import annotations

from pathlib import Path

from loraforge.formats.safetensors_reader import open_safetensors

ULPS = 4
# Significand bits (with the implicit one) of each float dtype an SVD output can be saved in.
SIGNIFICAND_BITS = {"BF16": 8, "F16": 11, "F32": 24, "F64": 53}


def relative_error_tolerance(dtype_codes) -> float:
    """The tolerance for a file whose float tensors have ``dtype_codes``: the coarsest one decides."""
    bits = [SIGNIFICAND_BITS[code] for code in dtype_codes if code in SIGNIFICAND_BITS]
    if not bits:
        return 0.0  # no float tensors: nothing can round differently
    return ULPS * 2.0 ** -min(bits)


def file_tolerance(path: str | Path) -> float:
    """The tolerance of one written output, from the dtypes in its header."""
    with open_safetensors(path) as handle:
        return relative_error_tolerance({handle.info(name).dtype for name in handle.names()})


def lock_tolerance_entry(path: str | Path) -> dict:
    """What the build writes into an SVD target's lock entry under ``tolerance``."""
    return {"relative_error": file_tolerance(path)}


def is_svd_step(target) -> bool:
    """Targets whose bytes depend on the numeric environment (SVD merges and resizes, extractions):
    those that have a device class."""
    return target.device_class is not None
