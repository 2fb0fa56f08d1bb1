"""Synthetic checkpoints generated from an architecture table.

Tests and benchmarks need checkpoints with the real key names and shapes but
no download. The file is streamed tensor by tensor (in chunks for the big
ones) through the safetensors writer, so a full-size SDXL never sits in
memory. Every value is a pure function of (seed, tensor key, chunk index):
the same arguments give a byte-identical file on any machine, thread count or
PYTHONHASHSEED.

Values: norm weights are ones and norm biases zeros (LayerNorm/GroupNorm
tensors named ``*norm*`` or ``ln_*``); other float tensors are N(0, 0.02),
roughly the scale of trained SD weights; integer tensors (``position_ids``)
count 0, 1, 2, ... along their last axis; bool tensors are False.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping, Sequence

import torch

from loraforge.formats import dtypes
from loraforge.formats.arch.table import COMPONENTS, Architecture, TensorSpec
from loraforge.formats.safetensors_writer import SafetensorsWriter, TensorPlan, WriteResult

WEIGHT_STD = 0.02
# Elements generated per random draw. Part of the output definition: changing
# it changes every synthetic file of more than one chunk.
CHUNK_ELEMENTS = 1 << 20
# Below torch's intra-op grain size (32768), so elementwise ops stay serial.
SERIAL_ELEMENTS = 1 << 15

# Marker tensors some checkpoints carry: ComfyUI and others store them as
# empty float32 tensors of shape (0,) (torch.tensor([])); only their presence
# means something (v-prediction, zero terminal SNR).
MARKERS = ("v_pred", "ztsnr")
MARKER_DTYPE = "F32"
MARKER_SHAPE = (0,)


def derived_seed(seed: int, key: str, chunk: int) -> int:
    """A 63-bit seed from (seed, key, chunk) via sha256, so it never depends on hash() or dict order."""
    digest = hashlib.sha256(f"{seed}\x00{key}\x00{chunk}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _is_norm(spec: TensorSpec) -> bool:
    if len(spec.shape) != 1:
        return False
    module = spec.key.rsplit(".", 2)[-2] if spec.key.count(".") >= 1 else spec.key
    return "norm" in module or module.startswith("ln_")


def _saved_code(spec: TensorSpec, float_code: str) -> str:
    return float_code if dtypes.is_float_code(spec.dtype) else spec.dtype


def _integer_values(spec: TensorSpec, code: str) -> torch.Tensor:
    dtype = dtypes.torch_dtype(code)
    if code == "BOOL" or not spec.shape:
        return torch.zeros(spec.shape, dtype=dtype)
    return torch.arange(spec.shape[-1], dtype=dtype).expand(spec.shape).contiguous()


def _random_parts(key: str, numel: int, code: str, seed: int) -> Iterator[torch.Tensor]:
    """N(0, WEIGHT_STD) in the save dtype, CHUNK_ELEMENTS at a time, each chunk seeded on its own.

    The yielded pieces are views of two reused buffers (no page faults from
    fresh allocations): consume each before asking for the next.
    """
    size = min(numel, CHUNK_ELEMENTS)
    normal = torch.empty(size, dtype=torch.float32)
    target = dtypes.torch_dtype(code)
    scaled = normal if target == torch.float32 else torch.empty(size, dtype=target)
    for chunk, start in enumerate(range(0, numel, CHUNK_ELEMENTS)):
        count = min(CHUNK_ELEMENTS, numel - start)
        generator = torch.Generator().manual_seed(derived_seed(seed, key, chunk))
        torch.randn(count, generator=generator, out=normal[:count])
        # Scaled in float32, rounded once to the save dtype, in slices small
        # enough that torch runs them on this thread: waking (and then
        # spinning) intra-op worker threads for this cheap step made
        # generation 2x slower on a 2-core machine.
        for piece in range(0, count, SERIAL_ELEMENTS):
            stop = min(piece + SERIAL_ELEMENTS, count)
            torch.mul(normal[piece:stop], WEIGHT_STD, out=scaled[piece:stop])
        yield scaled[:count]


def tensor_parts(spec: TensorSpec, code: str, seed: int) -> Iterator[torch.Tensor]:
    """The values of one tensor as flat pieces in C order (at least one piece, maybe empty).

    Pieces may share a buffer: write each before taking the next.
    """
    numel = 1
    for size in spec.shape:
        numel *= size
    if not dtypes.is_float_code(code):
        yield _integer_values(spec, code).reshape(-1)
    elif numel == 0:
        yield torch.empty(0, dtype=dtypes.torch_dtype(code))
    elif _is_norm(spec):
        fill = 1.0 if spec.key.endswith(".weight") else 0.0
        yield torch.full((numel,), fill, dtype=dtypes.torch_dtype(code))
    else:
        yield from _random_parts(spec.key, numel, code, seed)


def synthetic_tensor(spec: TensorSpec, *, seed: int = 0, dtype: str = "F16") -> torch.Tensor:
    """One tensor exactly as write_synthetic_checkpoint writes it (for tests that need the values)."""
    code = _saved_code(spec, dtypes.precision_code(dtype))
    parts = [part.clone() for part in tensor_parts(spec, code, seed)]  # the parts reuse one buffer
    return torch.cat(parts).reshape(spec.shape)


def _check_choices(label: str, chosen: Sequence[str], allowed: Sequence[str]) -> None:
    unknown = [name for name in chosen if name not in allowed]
    if unknown:
        raise ValueError(f"unknown {label} {unknown}; choose from {list(allowed)}")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"{label} {list(chosen)} names one entry twice")


def synthetic_plan(
    arch: Architecture, *, dtype: str = "F16", markers: Sequence[str] = (), missing_components: Sequence[str] = ()
) -> list[TensorPlan]:
    """The tensors (name, saved dtype, shape) a synthetic checkpoint holds, in file order."""
    float_code = dtypes.precision_code(dtype)
    _check_choices("markers", markers, MARKERS)
    _check_choices("missing_components", missing_components, COMPONENTS)
    kept = [spec for spec in arch.tensors if spec.component not in missing_components]
    plan = [TensorPlan(spec.key, _saved_code(spec, float_code), spec.shape) for spec in kept]
    plan += [TensorPlan(marker, MARKER_DTYPE, MARKER_SHAPE) for marker in markers]
    return plan


def write_synthetic_checkpoint(
    path: str | os.PathLike[str],
    arch: Architecture,
    *,
    seed: int = 0,
    dtype: str = "F16",
    markers: Sequence[str] = (),
    missing_components: Sequence[str] = (),
    metadata: Mapping[str, str] | None = None,
) -> WriteResult:
    """Stream a checkpoint with the table's keys and shapes to ``path``; same arguments, same bytes.

    ``dtype`` (a code such as "F16" or a precision name such as "bfloat16")
    applies to float tensors; integer tensors keep the table's dtype. Tensors
    of ``missing_components`` (e.g. ["vae"]) are left out; ``markers`` appends
    the named marker tensors after the table's tensors.
    """
    plan = synthetic_plan(arch, dtype=dtype, markers=markers, missing_components=missing_components)
    specs = arch.tensor_by_key
    with SafetensorsWriter(path, plan, metadata) as writer:
        for item in plan:
            if item.name in MARKERS:
                writer.write(item.name, torch.empty(MARKER_SHAPE, dtype=torch.float32))
                continue
            for part in tensor_parts(specs[item.name], item.dtype, seed):
                writer.write_part(item.name, part)
        return writer.commit()
