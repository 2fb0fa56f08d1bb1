"""The numeric environment of an SVD step: what, besides the inputs, can change its bytes.

SVD steps (merge ``method: svd``, resize, extract) run LAPACK/BLAS kernels
whose rounding depends on which kernels run: the device class (CPU LAPACK or
GPU cuSOLVER), the BLAS library, the code path it dispatches to (MKL picks
its kernels by CPU vendor and widest SIMD instruction set, unless
``MKL_CBWR`` pins a branch), torch's own vectorised kernels (reductions) and
the torch version. The thread count is not part of it: every SVD step runs
each module on one thread (execute/device.py, ``one_thread_per_module``).

The build records this in the lock entry of every SVD target
(``numeric_environment``); ``verify`` demands identical bytes when its own
environment is the same and the lock's per-module tolerance when it is not
(or when the lock records none). The action key keeps only the device class,
so a lock built on another x86-64 CPU does not force a rebuild.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path

import torch

from loraforge.plan.device_class import device_class

# Environment variables that select BLAS kernels (recorded when set).
BLAS_SETTINGS = ("MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS")
# x86-64 SIMD levels MKL dispatches on, widest first, as /proc/cpuinfo names their flags.
X86_ISAS = ("avx512f", "avx2", "avx", "sse4_2")
VENDORS = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}


@dataclass(frozen=True)
class NumericEnvironment:
    """Where an SVD step ran, as far as its bytes can tell (every field a short string)."""

    device_class: str  # "cpu" | "cuda"
    blas: str  # "mkl", "openblas", …; "cusolver" on CUDA; "unknown"
    processor: str  # CPU vendor ("intel", "amd", …) or the GPU's name
    isa: str  # CPU: widest SIMD ISA ("avx512f", "avx2", …, or the machine name); GPU: "sm_90" etc.
    blas_settings: str  # "MKL_CBWR=AVX2" etc. (space-separated), "" when none is set
    torch_kernels: str  # torch's CPU kernel capability ("avx2", "avx512", "default"); "cuda" on a GPU
    torch: str  # torch version (with "+cuda12.4" on a GPU)

    def label(self) -> str:
        """``cpu/mkl/amd/avx2`` (plus any BLAS setting): what a report names."""
        parts = [self.device_class, self.blas, self.processor, self.isa]
        if self.blas_settings:
            parts.append(self.blas_settings)
        return "/".join(parts)

    def to_json(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_json(cls, value) -> NumericEnvironment | None:
        """The environment a lock entry records; None when it records none (older locks) or a damaged one."""
        if not isinstance(value, dict):
            return None
        try:
            return cls(**{f.name: str(value[f.name]) for f in fields(cls)})
        except KeyError:
            return None

    def differences(self, other: NumericEnvironment) -> tuple[str, ...]:
        """``"isa avx512f vs avx2"`` for each field where ``self`` (first) and ``other`` differ."""
        return tuple(
            f"{f.name.replace('_', ' ')} {getattr(self, f.name) or '(none)'} vs {getattr(other, f.name) or '(none)'}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        )


def numeric_environment(device: str) -> NumericEnvironment:
    """The environment an SVD step on ``device`` (auto | cpu | cuda | cuda:N) runs in, in this process."""
    klass = device_class(device)
    if klass == "cuda":
        index = int(device.split(":", 1)[1]) if device.startswith("cuda:") else None
        return _cuda_environment(index)
    return _cpu_environment()


def target_environment(target) -> NumericEnvironment | None:
    """The environment of a planned target whose bytes depend on one (SVD steps); None for the others."""
    if target.device_class is None:
        return None
    return numeric_environment(target.device)


@lru_cache(maxsize=None)
def _cpu_environment() -> NumericEnvironment:
    vendor, flags = _cpuinfo()
    return NumericEnvironment(
        device_class="cpu",
        blas=_blas(),
        processor=vendor,
        isa=next((isa for isa in X86_ISAS if isa in flags), platform.machine().lower() or "unknown"),
        blas_settings=_blas_settings(),
        torch_kernels=_torch_kernels(),
        torch=torch.__version__,
    )


@lru_cache(maxsize=None)
def _cuda_environment(index: int | None) -> NumericEnvironment:
    if not torch.cuda.is_available():  # planned for a GPU this machine lacks: the build will refuse
        name, arch = "unknown", "unknown"
    else:
        index = torch.cuda.current_device() if index is None else index
        major, minor = torch.cuda.get_device_capability(index)
        name, arch = torch.cuda.get_device_name(index), f"sm_{major}{minor}"
    return NumericEnvironment(
        device_class="cuda",
        blas="cusolver",
        processor=name,
        isa=arch,
        blas_settings="",
        torch_kernels="cuda",
        torch=f"{torch.__version__}+cuda{torch.version.cuda}" if torch.version.cuda else torch.__version__,
    )


def _cpuinfo(path: Path = Path("/proc/cpuinfo")) -> tuple[str, frozenset[str]]:
    """(vendor, flags) of the first CPU listed; ("unknown", {}) where there is no /proc/cpuinfo."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "unknown", frozenset()
    vendor = re.search(r"^vendor_id\s*:\s*(\S+)", text, re.MULTILINE)
    flags = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", text, re.MULTILINE)
    name = VENDORS.get(vendor.group(1), vendor.group(1).lower()) if vendor else "unknown"
    return name, frozenset(flags.group(1).split()) if flags else frozenset()


def _blas() -> str:
    if torch.backends.mkl.is_available():
        return "mkl"
    found = re.search(r"BLAS_INFO=([^,\s]+)", torch.__config__.show())
    return found.group(1).lower() if found else "unknown"


def _blas_settings() -> str:
    return " ".join(f"{name}={os.environ[name].strip().upper()}" for name in BLAS_SETTINGS if os.environ.get(name, "").strip())


def _torch_kernels() -> str:
    try:
        return str(torch.backends.cpu.get_cpu_capability()).lower()
    except (AttributeError, RuntimeError):
        return "unknown"
