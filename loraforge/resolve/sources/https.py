"""``https://`` (and loopback ``http://``) sources: one URL, downloaded with resume.

The lock records the URL as written and the final URL after redirects,
without query string or credentials (signed redirect targets carry tokens and
expiry times there; recording them would leak secrets and make two lock runs
differ). A URL on the Civitai host gets the Civitai token, like ``civitai:``.
"""

from __future__ import annotations

from typing import Mapping

from loraforge.recipe.sources import SourceRef
from loraforge.resolve.http import Auth, download, safe_url
from loraforge.resolve.progress import FetchProgress
from loraforge.resolve.sources.base import Fetched, RemoteSource, Resolution
from loraforge.resolve.sources.auth import https_auth
from loraforge.resolve.store import Store


class HttpsSource(RemoteSource):
    def resolve(self, name: str, ref: SourceRef, pinned: Mapping[str, str] | None) -> Resolution:
        location = dict(pinned) if pinned else {"url": safe_url(ref.url)}
        return Resolution(location=location, download_key=f"url:{ref.url}", extra={"url": ref.url})

    def fetch(self, name: str, resolution: Resolution, store: Store, expected: str | None, progress: FetchProgress) -> Fetched:
        url = resolution.extra["url"]
        return download_to_store(name, url, https_auth(url), resolution, store, expected, progress, "final_url")


def download_to_store(name, url, auth: Auth, resolution: Resolution, store: Store, expected, progress, final_key: str | None) -> Fetched:
    """Shared by https and civitai: download (resuming) into the store under the resolution's key."""
    from loraforge.resolve.store import source_key

    key = source_key(resolution.download_key)
    part = store.partial_path(key)
    done = download(url, part, name=name, auth=auth, progress=progress, max_bytes=resolution.max_bytes)
    try:
        blob = store.commit(part, done.hashes, expected, name)  # removes the partial on a wrong hash
    finally:
        part.with_suffix(".json").unlink(missing_ok=True)
    location = dict(resolution.location)
    if final_key:
        location[final_key] = done.final_url
    return Fetched(blob, location)
