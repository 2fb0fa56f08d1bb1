"""``hf://<org>/<repo>[@<revision>]/<path>`` sources, through huggingface_hub.

Resolving asks the Hub for the file's metadata (one HEAD request): the
commit the revision points to now, the size, and for LFS files the sha256
(the LFS oid is the file's sha256). The lock pins that commit, so a later
build downloads exactly the same file even when the branch moved.

Downloading goes through ``hf_hub_download`` at the pinned commit, so the
Hub's own cache, token (``HF_TOKEN`` or ``hf auth login``) and transfer code
are reused; the file is then hard-linked (or copied) into our store and
hashed: huggingface_hub checks only the size, we verify the sha256.
``HF_ENDPOINT`` selects another Hub (a mirror, or the tests' local server);
it is read on every call. ``HF_HUB_CACHE`` / ``HF_HOME`` place its cache.
"""

from __future__ import annotations

import os
import re
from typing import Mapping

from loraforge.errors import ResolveError
from loraforge.recipe.sources import SourceRef
from loraforge.resolve.progress import FetchProgress
from loraforge.resolve.sources.base import Fetched, RemoteSource, Resolution
from loraforge.resolve.store import Store

_SHA256 = re.compile(r"[0-9a-f]{64}")
DEFAULT_ENDPOINT = "https://huggingface.co"


def hf_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_token():
    """huggingface_hub's ``token`` argument: its usual lookup (HF_TOKEN, `hf auth login`) only for an https
    (or loopback) endpoint; False, no token at all, for a plain-http endpoint elsewhere."""
    from loraforge.resolve.sources.auth import token_allowed

    endpoint = hf_endpoint()
    return None if token_allowed(endpoint, endpoint) else False


class HfSource(RemoteSource):
    def resolve(self, name: str, ref: SourceRef, pinned: Mapping[str, str] | None) -> Resolution:
        if pinned and {"repo", "commit", "path"} <= set(pinned):
            return _resolution(dict(pinned), None, None)
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        revision = ref.revision or "main"
        url = hf_hub_url(ref.repo, ref.path, revision=revision, endpoint=hf_endpoint())
        with _hub_errors(name, ref):
            meta = get_hf_file_metadata(url, token=hub_token(), endpoint=hf_endpoint(), retry_on_errors=True)
        if not meta.commit_hash:
            raise ResolveError(
                f"Input '{name}': {hf_endpoint()} did not say which commit '{revision}' of {ref.repo} is "
                "(no X-Repo-Commit header); is HF_ENDPOINT a Hugging Face Hub?"
            )
        etag = (meta.etag or "").lower()
        location = {"repo": ref.repo, "revision": revision, "commit": meta.commit_hash, "path": ref.path}
        return _resolution(location, meta.size, etag if _SHA256.fullmatch(etag) else None)

    def fetch(self, name: str, resolution: Resolution, store: Store, expected: str | None, progress: FetchProgress) -> Fetched:
        from huggingface_hub import hf_hub_download

        location = resolution.location
        ref = SourceRef(raw=f"hf://{location['repo']}@{location['commit']}/{location['path']}", scheme="hf")
        with _hub_errors(name, ref):
            path = hf_hub_download(
                location["repo"],
                location["path"],
                revision=location["commit"],
                endpoint=hf_endpoint(),
                token=hub_token(),
                cache_dir=os.environ.get("HF_HUB_CACHE") or None,
                tqdm_class=_progress_bar_class(name, progress),
            )
        return Fetched(store.ingest_file(_real_path(path), expected, name, progress), dict(location))


def _resolution(location: dict, size, sha) -> Resolution:
    key = f"hf:{location['repo']}@{location['commit']}/{location['path']}"
    return Resolution(location=location, size=size, sha256=sha, download_key=key)


def _real_path(path: str):
    from pathlib import Path

    return Path(path).resolve()  # the Hub cache's snapshot entry is a symlink to its blob


class _hub_errors:
    """Turn huggingface_hub's exceptions into one-paragraph ResolveErrors."""

    def __init__(self, name: str, ref: SourceRef):
        self.name, self.ref = name, ref

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if error is None or isinstance(error, ResolveError):
            return False
        from huggingface_hub import errors as hub

        what = f"Input '{self.name}' ({self.ref.raw})"
        if isinstance(error, hub.GatedRepoError):
            message = f"{what}: the repository is gated; accept its terms on the Hub and set HF_TOKEN (or run `hf auth login`)."
        elif isinstance(error, hub.RepositoryNotFoundError):
            message = f"{what}: the repository does not exist or is private; check the name, or set HF_TOKEN (or run `hf auth login`) if it is private."
        elif isinstance(error, hub.RevisionNotFoundError):
            message = f"{what}: the revision does not exist in the repository; check the branch, tag or commit after '@'."
        elif isinstance(error, hub.EntryNotFoundError):
            message = f"{what}: the repository has no file at that path (at that revision); check the path after the revision."
        elif isinstance(error, hub.HfHubHTTPError):
            status = getattr(getattr(error, "response", None), "status_code", "?")
            hint = " Set HF_TOKEN (or run `hf auth login`)." if status in (401, 403) else ""
            message = f"{what}: the Hub answered HTTP {status}.{hint}"
        elif isinstance(error, (OSError, ValueError)) or _is_transport_error(error):
            message = f"{what}: cannot reach {hf_endpoint()} ({type(error).__name__}: {error}). Check the network, or use --offline with a filled store."
        else:
            return False
        raise ResolveError(message) from None


def _is_transport_error(error: BaseException) -> bool:
    """A network failure (refused, DNS, timeout) from httpx, or httpx2, which huggingface_hub 2.x uses.

    Neither derives from OSError, so without this an offline machine would get a traceback.
    """
    return any(
        cls.__name__ in ("TransportError", "RequestError") and cls.__module__.split(".")[0] in ("httpx", "httpx2")
        for cls in type(error).__mro__
    )


def _progress_bar_class(name: str, progress: FetchProgress):
    """A tqdm stand-in that forwards huggingface_hub's byte counts to our progress display."""

    class Bar:
        def __init__(self, *args, total=None, initial=0, **kwargs):
            progress.start(name, total, initial or 0)

        def update(self, n=1):
            progress.advance(name, n or 0)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def __getattr__(self, attribute):
            return lambda *args, **kwargs: None  # set_description, refresh, close, ...

    return Bar
