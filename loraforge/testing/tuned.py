"""Synthetic "fine-tuned" checkpoints: a base plus known weight differences.

For extraction tests and benchmarks: the tuned file is the base streamed
tensor by tensor with a difference added to chosen weights, so a full-size
SDXL never sits in memory. Differences are pure functions of (seed, key):
the same arguments give the same bytes.
"""

from __future__ import annotations

import math
import os
from typing import Callable

import torch

from loraforge.formats import dtypes
from loraforge.formats.safetensors_reader import open_safetensors
from loraforge.formats.safetensors_writer import SafetensorsWriter, TensorPlan, WriteResult
from loraforge.testing.checkpoints import derived_seed

# key, weight (float32) -> the difference to add (same shape), or None to copy the tensor unchanged
DeltaFunction = Callable[[str, torch.Tensor], "torch.Tensor | None"]


def planted_delta(
    shape: tuple[int, ...],
    *,
    rank: int,
    seed: int,
    key: str,
    scale: float = 1e-3,
    decay: float = 0.8,
    noise: float = 0.0,
) -> torch.Tensor:
    """A difference of exactly ``rank`` (plus optional i.i.d. noise) with singular values scale * decay^i.

    Built as Q_u diag(s) Q_v^T from orthonormal Q's, so its singular values
    are known exactly. ``noise`` is the standard deviation of a full-rank
    Gaussian term added on top (a "realistic" fine-tune is not exactly low-rank).
    """
    out, flat_in = shape[0], math.prod(shape[1:])
    generator = torch.Generator().manual_seed(derived_seed(seed, key, 0))
    k = min(rank, out, flat_in)
    q_u, _ = torch.linalg.qr(torch.randn(out, k, generator=generator, dtype=torch.float64))
    q_v, _ = torch.linalg.qr(torch.randn(flat_in, k, generator=generator, dtype=torch.float64))
    values = scale * decay ** torch.arange(k, dtype=torch.float64)
    delta = (q_u * values) @ q_v.T
    if noise:
        delta += noise * torch.randn(out, flat_in, generator=generator, dtype=torch.float64)
    return delta.reshape(shape)


def write_tuned_checkpoint(
    path: str | os.PathLike[str],
    base_path: str | os.PathLike[str],
    delta: DeltaFunction,
    *,
    dtype: str | None = None,
) -> WriteResult:
    """Write base + delta(key, weight) for every tensor where ``delta`` returns one.

    ``dtype`` (a code such as "F32") converts every float tensor; None keeps
    the base's dtypes. The sum is formed in float64 and rounded once.
    """
    with open_safetensors(base_path) as base:
        infos = [base.info(name) for name in base.names()]
        plan = [
            TensorPlan(i.name, dtype if dtype and dtypes.is_float_code(i.dtype) else i.dtype, tuple(i.shape))
            for i in infos
        ]
        with SafetensorsWriter(path, plan, base.metadata or None) as writer:
            for item in plan:
                tensor = base.read(item.name)
                if dtypes.is_float_code(item.dtype) and tensor.numel():
                    change = delta(item.name, tensor.float())
                    if change is not None:
                        tensor = tensor.double() + change.double()
                writer.write(item.name, tensor.to(dtypes.torch_dtype(item.dtype)))
            return writer.commit()
