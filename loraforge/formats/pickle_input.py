"""Pickled checkpoints (.ckpt/.pt/.bin): refused by default, converted on explicit opt-in.

Unpickling runs code named by the file, so a pickle is only ever opened when
the recipe says ``allow_pickle: true`` on that input, and even then only with
``torch.load(weights_only=True)``: torch's restricted unpickler, which builds
tensors, plain containers and numbers and refuses every other global (a
malicious ``__reduce__`` fails to load instead of running).

The tensors are then written once to a safetensors file in the cache,
``$LORAFORGE_CACHE/converted/<sha256 of the pickle>.safetensors``, so the rest
of loraforge (planner, streaming bake) only ever sees safetensors. The entry is
written atomically and records the pickle's sha256 in its metadata; an entry
that does not validate or names another source is converted again.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from loraforge.errors import FormatError
from loraforge.formats import dtypes
from loraforge.formats.safetensors_reader import open_safetensors
from loraforge.formats.safetensors_writer import save_tensors
from loraforge.formats.sniff import ZIP_MAGIC, pickle_kind, pickle_refusal, read_head

SOURCE_KEY = "loraforge.converted_from_sha256"


def detect_pickle(path: str | os.PathLike[str]) -> str | None:
    """A description of the pickle ``path`` is, or None if it is not one (unreadable files: None)."""
    try:
        head, size = read_head(path)
    except OSError:
        return None  # the safetensors reader reports missing/unreadable files itself
    return pickle_kind(head, size, Path(path).name)


def check_not_pickle(path: str | os.PathLike[str], allow: bool = False) -> None:
    """Raise FormatError explaining the refusal when ``path`` is a pickle and pickles are not allowed."""
    kind = detect_pickle(path)
    if kind is not None and not allow:
        raise FormatError(pickle_refusal(path, kind))


def safetensors_input(path: str | os.PathLike[str], sha256: str, allow: bool, cache_dir: Path) -> Path:
    """The safetensors file to read for an input: ``path`` itself, or its conversion when it is an allowed pickle.

    ``sha256`` is the (verified) hash of ``path``; it names the cache entry.
    """
    path = Path(path)
    check_not_pickle(path, allow)
    if detect_pickle(path) is None:
        return path
    target = Path(cache_dir) / f"{sha256}.safetensors"
    if not _valid_entry(target, sha256):
        tensors = load_pickled_tensors(path)  # first: a refused pickle leaves no trace in the cache
        target.parent.mkdir(parents=True, exist_ok=True)
        save_tensors(target, tensors, {SOURCE_KEY: sha256})
    return target


def _valid_entry(target: Path, sha256: str) -> bool:
    if not target.is_file():
        return False
    try:
        with open_safetensors(target) as converted:
            return converted.metadata.get(SOURCE_KEY) == sha256
    except FormatError:
        return False


def load_pickled_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The state dict of a pickled checkpoint, loaded with weights_only=True (never the full unpickler)."""
    path = Path(path)
    try:
        head, _ = read_head(path)
        # mmap keeps a multi-GB zip checkpoint out of RAM; the legacy format cannot be mapped.
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=head.startswith(ZIP_MAGIC))
    except Exception as error:  # noqa: BLE001 - torch.load documents no error types; all mean "unusable"
        raise FormatError(
            f"{path} could not be loaded as a tensors-only pickle: {_first_line(error)}. "
            "torch.load(weights_only=True) refuses pickles that name functions or classes other than "
            "tensors and plain containers (a pickle that would run code is refused this way), and fails on "
            "damaged files. Convert the file with the tool that made it, or get a .safetensors release."
        ) from None
    return _state_dict(path, loaded)


def _state_dict(path: Path, loaded: object) -> dict[str, torch.Tensor]:
    # A1111/Lightning checkpoints wrap the weights as {"state_dict": {...}, "epoch": ..., ...}.
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise FormatError(
            f"{path} holds a {type(loaded).__name__}, not a dictionary of named tensors; "
            "loraforge can only use a state dict. Convert the file with the tool that made it."
        )
    tensors: dict[str, torch.Tensor] = {}
    for name, value in loaded.items():
        if not isinstance(value, torch.Tensor):
            continue  # counters and config values beside the weights ("global_step")
        if not isinstance(name, str) or not name:
            raise FormatError(f"{path} has a tensor under the key {name!r}; tensor names must be non-empty text.")
        tensors[name] = _plain_tensor(path, name, value)
    if not tensors:
        raise FormatError(f"{path} holds no tensors; it is not a checkpoint or adapter.")
    return tensors


def _plain_tensor(path: Path, name: str, value: torch.Tensor) -> torch.Tensor:
    if value.layout != torch.strided or value.is_quantized:
        raise FormatError(f"{path}: tensor {name!r} is sparse or quantized, which safetensors cannot hold; convert it first.")
    try:
        dtypes.dtype_code(value.dtype)
    except ValueError:
        raise FormatError(
            f"{path}: tensor {name!r} has dtype {value.dtype}, which loraforge does not support "
            f"(supported: {', '.join(dtypes.DTYPE_CODES)})."
        ) from None
    return value.detach()


def _first_line(error: BaseException) -> str:
    """The informative line of torch's error (for a refused global, the line naming it)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # torch's own text advises weights_only=False, the unsafe load this refusal exists to avoid.
    named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    text = (named or lines or [""])[0]
    # Keep the sentence naming the refused global, not torch's advice on allow-listing it.
    sentences = [part for part in text.split(". ") if "GLOBAL" in part] or [text]
    text = sentences[0].rstrip(".")
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
