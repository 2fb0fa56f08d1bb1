"""Remote sources, one module each, all behind :class:`RemoteSource`.

Local paths and ``file://`` need no fetching; they are handled by
``loraforge.resolve.local``.
"""

from __future__ import annotations

from loraforge.resolve.sources.base import Fetched, RemoteSource, Resolution
from loraforge.resolve.sources.civitai import CivitaiSource
from loraforge.resolve.sources.hf import HfSource
from loraforge.resolve.sources.https import HttpsSource

# Parsed scheme (loraforge.recipe.sources.SCHEMES) -> source.
REMOTE_SOURCES: dict[str, RemoteSource] = {
    "https": HttpsSource(),
    "http": HttpsSource(),  # loopback only; the recipe parser refuses other hosts
    "hf": HfSource(),
    "civitai": CivitaiSource(),
    "air": CivitaiSource(),
}

__all__ = ["Fetched", "RemoteSource", "Resolution", "REMOTE_SOURCES"]
