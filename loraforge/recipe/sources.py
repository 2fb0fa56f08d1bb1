"""Syntax of an input's ``source`` string.

The recipe keeps each source as the string the user wrote; this module only
checks that the string is well-formed for its scheme and splits it into parts
so the resolver does not have to parse it again. Nothing here touches the
network or the disk.

Schemes:

* a local path (no scheme), relative to the recipe directory or absolute;
* ``file://<path>``;
* ``https://<host>/<path>`` (``http://`` only for a loopback host, which is
  what local mirrors and the download tests use);
* ``hf://<org>/<repo>[@<revision>]/<path in repo>``;
* ``civitai:<model version id>``;
* ``urn:air:<ecosystem>:<type>:<source>:<id>[@<version>][.<format>]``
  (Civitai's AI Resource names).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

SCHEMES = ("path", "file", "https", "http", "hf", "civitai", "air")

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

_HF = re.compile(
    r"hf://(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)"
    r"(?:@(?P<revision>[^/@\s]+))?/(?P<path>[^@\s]+)"
)
_CIVITAI = re.compile(r"civitai:(?P<id>[0-9]+)")
_AIR = re.compile(
    r"urn:air:(?P<ecosystem>[a-z0-9_-]+):(?P<type>[a-z0-9_-]+):(?P<source>[a-z0-9_-]+):"
    r"(?P<id>[^@:\s.]+)(?:@(?P<version>[^@:\s.]+))?(?:\.(?P<format>[a-z0-9]+))?"
)
# "C:\models\x.safetensors" has a one-letter "scheme"; it is a Windows path.
_URL_SCHEME = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]+):")


class SourceSyntaxError(ValueError):
    """A source string is malformed; ``hint`` says how to write it."""

    def __init__(self, message: str, hint: str):
        super().__init__(message)
        self.hint = hint


@dataclass(frozen=True)
class SourceRef:
    """A parsed source. Only the fields of its scheme are set."""

    raw: str
    scheme: str  # one of SCHEMES
    path: str | None = None  # "path", "file": the file path; "hf": the path inside the repo
    url: str | None = None  # "https", "http"
    repo: str | None = None  # "hf": "org/repo"
    revision: str | None = None  # "hf": branch, tag or commit, None = not pinned
    item_id: str | None = None  # "civitai": model version id; "air": resource id
    air_ecosystem: str | None = None
    air_type: str | None = None
    air_source: str | None = None
    air_version: str | None = None
    air_format: str | None = None


def parse_source(raw: str) -> SourceRef:
    """Parse ``raw`` or raise :class:`SourceSyntaxError` saying what is wrong."""
    if not raw.strip():
        raise SourceSyntaxError("the source is empty", "give a file path or a URL such as hf://org/repo@main/file.safetensors")
    if raw != raw.strip() or "\x00" in raw:
        raise SourceSyntaxError(
            f"the source {raw!r} has leading/trailing whitespace or a NUL character",
            "remove the extra characters",
        )
    lowered = raw.lower()
    if lowered.startswith("hf://"):
        return _parse_hf(raw)
    if lowered.startswith("civitai:"):
        return _parse_civitai(raw)
    if lowered.startswith("urn:air:"):
        return _parse_air(raw)
    if lowered.startswith(("https://", "http://")):
        return _parse_url(raw)
    if lowered.startswith("file://"):
        return _parse_file_url(raw)
    scheme = _URL_SCHEME.match(raw)
    if scheme and raw[scheme.end():].startswith("//"):
        raise SourceSyntaxError(
            f"the source {raw!r} uses the unsupported scheme '{scheme['scheme']}'",
            "supported are a local path, file://, https://, hf://, civitai: and urn:air:",
        )
    return SourceRef(raw=raw, scheme="path", path=raw)


def _parse_hf(raw: str) -> SourceRef:
    match = _HF.fullmatch(raw)
    if not match:
        raise SourceSyntaxError(
            f"the Hugging Face source {raw!r} is malformed",
            "write hf://<org>/<repo>@<revision>/<path/in/repo.safetensors>, "
            "e.g. hf://stabilityai/sdxl-vae@main/sdxl_vae.safetensors",
        )
    return SourceRef(raw=raw, scheme="hf", repo=match["repo"], revision=match["revision"], path=match["path"])


def _parse_civitai(raw: str) -> SourceRef:
    match = _CIVITAI.fullmatch(raw)
    if not match:
        raise SourceSyntaxError(
            f"the Civitai source {raw!r} is malformed",
            "write civitai:<model version id> with digits only, e.g. civitai:123456",
        )
    return SourceRef(raw=raw, scheme="civitai", item_id=match["id"])


def _parse_air(raw: str) -> SourceRef:
    match = _AIR.fullmatch(raw)
    if not match:
        raise SourceSyntaxError(
            f"the AIR source {raw!r} is malformed",
            "write urn:air:<ecosystem>:<type>:<source>:<id>[@<version>][.<format>], "
            "e.g. urn:air:sdxl:lora:civitai:328553@368189",
        )
    return SourceRef(
        raw=raw,
        scheme="air",
        item_id=match["id"],
        air_ecosystem=match["ecosystem"],
        air_type=match["type"],
        air_source=match["source"],
        air_version=match["version"],
        air_format=match["format"],
    )


def _parse_url(raw: str) -> SourceRef:
    parts = urlsplit(raw)
    scheme = parts.scheme.lower()
    if not parts.hostname or not parts.path or parts.path == "/" or " " in raw:
        raise SourceSyntaxError(
            f"the URL {raw!r} is malformed",
            f"write {scheme}://<host>/<path to the file>, without spaces (percent-encode them as %20)",
        )
    if scheme == "http" and parts.hostname not in LOOPBACK_HOSTS:
        raise SourceSyntaxError(
            f"the URL {raw!r} uses plain http",
            "use https:// (plain http is accepted only for 127.0.0.1/localhost)",
        )
    return SourceRef(raw=raw, scheme=scheme, url=raw)


def _parse_file_url(raw: str) -> SourceRef:
    path = raw[len("file://"):]
    if not path:
        raise SourceSyntaxError(f"the file URL {raw!r} has no path", "write file:///absolute/path.safetensors")
    return SourceRef(raw=raw, scheme="file", path=path)
