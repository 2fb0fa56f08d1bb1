"""Local sources (a path relative to the recipe, or ``file://``) and the resolved-input record.

A local input needs no network and no store: it is used where it lies and
hashed through the stat-keyed hash cache, so an unchanged 7 GB base is not
re-read on every build. A ``sha256:`` pinned in the recipe is enforced.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping
from urllib.parse import unquote, urlparse

from loraforge.errors import ResolveError
from loraforge.resolve.hash_cache import cached_file_hashes

REMOTE_PREFIXES = ("hf://", "civitai:", "https://", "http://", "urn:air:")


@dataclass(frozen=True)
class ResolvedInput:
    """An input located on disk (a local file or a store blob) with its verified hashes."""

    name: str
    source: str
    path: Path | None  # None only for `loraforge lock` entries the source described without a download
    size: int | None
    expected_sha256: str | None  # what the recipe pins
    sha256: str | None = None  # verified whole-file hash (None: not verified yet)
    data_sha256: str | None = None  # safetensors data-section hash, when known
    location: Mapping[str, str] = field(default_factory=dict)  # the lock's "resolved" entry
    origin: str = "local"  # "local", "store" (already fetched), "downloaded", "remote" (not fetched)


def local_path(source: str, root: Path) -> Path | None:
    """The file a local source names, or None for a remote source."""
    if source.startswith("file://"):
        return Path(unquote(urlparse(source).path))
    if source.startswith(REMOTE_PREFIXES):
        return None
    path = Path(source).expanduser()
    return path if path.is_absolute() else (root / path)


def locate_input(name: str, source: str, expected_sha256: str | None, root: Path) -> ResolvedInput:
    """Find a local input's file without reading it."""
    path = local_path(source, root)
    if path is None:
        raise ResolveError(f"Input '{name}': '{source}' is a remote source; it is fetched by the resolver, not located.")
    if "\0" in str(path):
        raise ResolveError(
            f"Input '{name}': the source '{source}' names a path with a NUL byte (%00), which no file can have. "
            "Check the path."
        )
    written, path = path, path.resolve()
    if path.parts[1:2] in (("proc",), ("sys",)):
        # Kernel pseudo-files: /proc/self/mem fails to read, /proc/kmsg blocks, and none is a model.
        raise ResolveError(
            f"Input '{name}': the source '{source}' is {path}, a file the kernel makes up (under /{path.parts[1]}), "
            "not a model file; loraforge does not read it. Name the model's own file."
        )
    if not path.is_file():
        raise ResolveError(
            f"Input '{name}': the file {path} (from source '{source}') does not exist or is not a "
            "regular file. Check the path; relative paths are resolved against the recipe's folder."
        )
    # The path as written (symlinks not followed), relative to the recipe: the same on every machine.
    relative = Path(os.path.relpath(written, root)).as_posix() if written.anchor == root.anchor else str(written)
    return ResolvedInput(name, source, path, path.stat().st_size, expected_sha256, location={"path": relative})


def verify_input(resolved: ResolvedInput) -> str:
    """Hash the input's file (or reuse its cached hash) and enforce the recipe's sha256."""
    if resolved.sha256 is not None:
        return resolved.sha256
    return verified_local(resolved).sha256


def verified_local(resolved: ResolvedInput) -> ResolvedInput:
    """``resolved`` with its hashes filled in; a mismatch with the recipe's pin is an error."""
    try:
        actual, data = cached_file_hashes(resolved.path)
    except OSError as error:
        raise ResolveError(
            f"Input '{resolved.name}': the file {resolved.path} cannot be read ({error.strerror or error}); "
            "check that it is a readable model file."
        ) from None
    if resolved.expected_sha256 is not None and actual != resolved.expected_sha256:
        raise ResolveError(
            f"Input '{resolved.name}' ({resolved.path}) does not have the sha256 the recipe pins: "
            f"expected {resolved.expected_sha256}, got {actual}. Either the file changed (restore "
            "the right file) or the recipe is out of date (update `sha256:` after checking the file)."
        )
    return ResolvedInput(
        resolved.name, resolved.source, resolved.path, resolved.size, resolved.expected_sha256,
        sha256=actual, data_sha256=data, location=resolved.location, origin="local",
    )
