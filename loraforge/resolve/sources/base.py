"""The one interface every remote source implements.

A source turns a parsed recipe source (:class:`SourceRef`) into a
:class:`Resolution` (an immutable location plus what the source itself says
about the file: size, sha256) and fetches a resolution into the store.
``resolve`` may use the network (an API call, a HEAD request) but never
downloads the file; given the location pinned in the lock it needs no
network at all. ``fetch`` must verify the bytes against ``expected`` before
they enter the store (the store's ``commit`` / ``ingest_file`` do that).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Mapping

from loraforge.recipe.sources import SourceRef
from loraforge.resolve.progress import FetchProgress
from loraforge.resolve.store import Blob, Store


@dataclass(frozen=True)
class Resolution:
    location: Mapping[str, str]  # immutable, token-free; written to the lock as "resolved"
    size: int | None = None  # as the source reports it
    sha256: str | None = None  # as the source reports it (HF LFS oid, Civitai SHA256)
    download_key: str = ""  # identifies the bytes for partial downloads and store locks
    extra: Mapping[str, str] = field(default_factory=dict)  # source-private data (never in the lock)
    max_bytes: int | None = None  # the lock's pinned size: a download stops past it (resolver.py)


@dataclass(frozen=True)
class Fetched:
    blob: Blob
    location: Mapping[str, str]  # the resolution's location, completed (e.g. the final URL)


class RemoteSource(ABC):
    @abstractmethod
    def resolve(self, name: str, ref: SourceRef, pinned: Mapping[str, str] | None) -> Resolution:
        """Where the file is, without downloading it; ``pinned`` is the lock's location."""

    @abstractmethod
    def fetch(self, name: str, resolution: Resolution, store: Store, expected: str | None, progress: FetchProgress) -> Fetched:
        """Download the file into the store, verified against ``expected`` when given."""
