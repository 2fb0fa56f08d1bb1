"""Streaming checkpoint merge: the models read tensor by tensor, merged on demand.

:class:`MergedBase` stands in for the base file of a bake (execute/bake.py):
it has the primary model's names, dtypes and shapes, and ``read(name)`` /
``read_bytes(name)`` return the merged tensor in the primary model's dtype,
computed from that tensor of every model only (the bake's read-ahead thread
calls it, so memory holds a few tensors of each model, never a whole model).
LoRAs are then baked on the result exactly as on a base read from disk.
"""

from __future__ import annotations

import torch

from loraforge.errors import BuildError
from loraforge.formats.dtypes import torch_dtype
from loraforge.formats.safetensors_reader import open_safetensors
from loraforge.ops.checkpoint_merge import in_chunks, linear_combination, mask_seed, rounded
from loraforge.plan.checkpoint_merge import CheckpointMergePlan


MERGE_CHUNK = 1 << 18  # elements of an elementwise non-linear merge computed at once (2 MiB per float64 array)


class MergedBase:
    """The merge of ``plan``'s models, read like a safetensors file of the primary model's layout."""

    def __init__(self, plan: CheckpointMergePlan, target_name: str):
        self._plan = plan
        self._target = target_name
        self._files = []
        try:
            for model in plan.models:
                self._files.append(open_safetensors(model.path))
        except BaseException:
            self.close()
            raise
        self._primary = self._files[plan.primary]
        self.path = self._primary.path
        self._pool = None

    def use_pool(self, pool) -> None:
        """Threads that may compute chunks of one merged tensor side by side (None: this thread only).
        Chunks are elementwise and written into their own slice, so the bytes never depend on them."""
        self._pool = pool

    # --- the SafetensorsFile surface a bake uses ---
    def names(self) -> list[str]:
        return self._primary.names()

    def info(self, name: str):
        return self._primary.info(name)

    def __contains__(self, name: object) -> bool:
        return name in self._primary

    def read_bytes(self, name: str):
        if self._plan.taken.get(name) == self._plan.primary:
            return self._primary.read_bytes(name)
        return self.read(name)  # the writer takes a tensor of the planned dtype as well as bytes

    def read(self, name: str) -> torch.Tensor:
        dtype = torch_dtype(self._primary.info(name).dtype)
        taken = self._plan.taken.get(name)
        if taken is not None:
            tensor = self._files[taken].read(name)
            return tensor if tensor.dtype == dtype else rounded(tensor.to(torch.float64), dtype)
        return self._merged(name, dtype)

    def close(self) -> None:
        for handle in self._files:
            handle.close()

    def __enter__(self) -> MergedBase:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the merge of one tensor ---
    def _merged(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        plan, method = self._plan, self._plan.method_class
        values = plan.values_at(name)
        stored = [(handle.info(name).dtype, handle.read_bytes(name)) for handle in self._files]
        if all(item == stored[plan.primary] for item in stored) and method.keeps_equal_inputs(values):
            return self._primary.read(name)  # the method gives its input back: the bytes are the answer
        tensors = [_tensor(raw, code, self._primary.info(name).shape) for code, raw in stored]
        del stored  # one copy of each model's tensor in memory, not two
        n_models = len(tensors) - plan.has_base
        if method.linear:
            terms, divisor = method.linear_terms(values, n_models)
            result = linear_combination(tensors, terms, divisor, dtype, self._pool)
        elif method.elementwise:
            result = self._merged_in_chunks(name, tensors, values, n_models, dtype)
        else:
            wide = [t.to(torch.float64) for t in tensors]
            base = wide[-1] if plan.has_base else None
            seeds = [mask_seed(plan.seed, name, index) for index in range(n_models)]
            result = rounded(method.merge(wide[:n_models], base, values, seeds), dtype)
        self._refuse_overflow(name, result, tensors)
        return result

    def _merged_in_chunks(self, name: str, tensors, values, n_models: int, dtype: torch.dtype) -> torch.Tensor:
        """An elementwise method's merge, MERGE_CHUNK elements at a time: float64 copies of one chunk
        of each model in memory per thread, however large the tensor."""
        plan, method = self._plan, self._plan.method_class
        flat = [t.reshape(-1) for t in tensors]
        base = flat[-1] if plan.has_base else None
        seeds = [mask_seed(plan.seed, name, index) for index in range(n_models)]
        state = method.prepare(flat[:n_models], base, values, self._pool)
        out = torch.empty(flat[0].numel(), dtype=dtype)

        def chunk(start: int) -> None:
            wide = [t[start:start + MERGE_CHUNK].to(torch.float64) for t in flat]
            merged = method.merge_part(wide[:n_models], wide[-1] if plan.has_base else None, values, seeds, state, start)
            out[start:start + MERGE_CHUNK] = rounded(merged, dtype)

        in_chunks(chunk, out.numel(), MERGE_CHUNK, self._pool)
        return out.reshape(tensors[0].shape)

    def _refuse_overflow(self, name: str, result: torch.Tensor, tensors) -> None:
        if not result.is_floating_point() or bool(torch.isfinite(result).all()):
            return
        if not all(bool(torch.isfinite(t).all()) for t in tensors):
            return  # non-finite inputs give non-finite outputs: nothing the merge did
        count = int((~torch.isfinite(result)).sum())
        raise BuildError(
            f"target '{self._target}': the merged tensor {name} would hold {count:,} infinite or NaN values "
            f"(none in the models): the {self._plan.method} result exceeds the largest {result.dtype} number. Nothing "
            "was written. Check the merge's weights and parameters, or save in a wider dtype (precision: {save: float32})."
        )


def _tensor(raw: bytes, code: str, shape) -> torch.Tensor:
    dtype = torch_dtype(code)
    if not raw:
        return torch.empty(tuple(shape), dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(tuple(shape))
