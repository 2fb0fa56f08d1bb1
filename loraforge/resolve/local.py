"""Local sources: a path relative to the recipe, or a ``file://`` URL.

Remote schemes (``hf://``, ``civitai:``, ``https://``, AIR URNs) are parsed by
the recipe schema but fetched by the resolver's store; until then they fail
here with an explanation instead of a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from loraforge.errors import ResolveError
from loraforge.resolve.hash_cache import cached_file_sha256

REMOTE_PREFIXES = ("hf://", "civitai:", "https://", "http://", "urn:air:")


@dataclass(frozen=True)
class ResolvedInput:
    """An input located on disk, with the hash it must have (if the recipe pins one)."""

    name: str
    source: str
    path: Path
    size: int
    expected_sha256: str | None


def local_path(source: str, root: Path) -> Path | None:
    """The file a local source names, or None for a remote source."""
    if source.startswith("file://"):
        return Path(unquote(urlparse(source).path))
    if source.startswith(REMOTE_PREFIXES):
        return None
    path = Path(source).expanduser()
    return path if path.is_absolute() else (root / path)


def locate_input(name: str, source: str, expected_sha256: str | None, root: Path) -> ResolvedInput:
    """Find an input's file without reading it; remote sources are not supported yet."""
    path = local_path(source, root)
    if path is None:
        raise ResolveError(
            f"Input '{name}' uses the remote source '{source}', which this version of loraforge "
            "cannot download yet. Download the file yourself and point `source:` at the local "
            "path (relative to the recipe), keeping `sha256:` so the file is verified."
        )
    path = path.resolve()
    if not path.is_file():
        raise ResolveError(
            f"Input '{name}': the file {path} (from source '{source}') does not exist or is not a "
            "regular file. Check the path; relative paths are resolved against the recipe's folder."
        )
    return ResolvedInput(name, source, path, path.stat().st_size, expected_sha256)


def verify_input(resolved: ResolvedInput) -> str:
    """Hash the input's file (or reuse its cached hash) and enforce the recipe's sha256."""
    actual = cached_file_sha256(resolved.path)
    if resolved.expected_sha256 is not None and actual != resolved.expected_sha256:
        raise ResolveError(
            f"Input '{resolved.name}' ({resolved.path}) does not have the sha256 the recipe pins: "
            f"expected {resolved.expected_sha256}, got {actual}. Either the file changed (restore "
            "the right file) or the recipe is out of date (update `sha256:` after checking the file)."
        )
    return actual
