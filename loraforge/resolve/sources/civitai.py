"""``civitai:<model version id>`` and Civitai AIR URNs, through Civitai's public API.

``GET {base}/api/v1/model-versions/{id}`` lists a version's files with their
ids, names and SHA256; the file is downloaded from its ``downloadUrl``
(``{base}/api/download/models/{id}``, which redirects to storage). An AIR
``urn:air:<eco>:<type>:civitai:<model>@<version>[+<file id>]`` names the
version (and file) the same way; without ``@<version>`` the model's newest
version is asked for (``GET {base}/api/v1/models/{model}``) and pinned in the
lock. The lock records model, version and file ids, the file name and the
download URL (never a token or a signed storage URL).

The token and base URL are read in :mod:`loraforge.resolve.sources.auth`.
"""

from __future__ import annotations

from typing import Mapping

from loraforge.errors import ResolveError
from loraforge.recipe.sources import SourceRef
from loraforge.resolve.http import get_json
from loraforge.resolve.progress import FetchProgress
from loraforge.resolve.sources.auth import civitai_auth, civitai_base
from loraforge.resolve.sources.base import Fetched, RemoteSource, Resolution
from loraforge.resolve.sources.https import download_to_store
from loraforge.resolve.store import Store

class CivitaiSource(RemoteSource):
    def resolve(self, name: str, ref: SourceRef, pinned: Mapping[str, str] | None) -> Resolution:
        if pinned and {"model_version", "file_id", "url"} <= set(pinned):
            return _resolution(dict(pinned), None, None)
        model, version, file_id = _ids(name, ref)
        what = f"Input '{name}'"
        if version is None:
            version = _latest_version(what, model)
        url = f"{civitai_base()}/api/v1/model-versions/{version}"
        answer = get_json(url, civitai_auth(url), what)
        chosen = _choose_file(name, ref, answer, file_id)
        sha = (chosen.get("hashes") or {}).get("SHA256")
        url = chosen.get("downloadUrl") or f"{civitai_base()}/api/download/models/{version}"
        location = {
            "model": str(answer.get("modelId", model or "")),
            "model_version": str(version),
            "file_id": str(chosen.get("id", "")),
            "file_name": str(chosen.get("name", "")),
            "url": url,
        }
        return _resolution(location, None, sha.lower() if isinstance(sha, str) and len(sha) == 64 else None)

    def fetch(self, name: str, resolution: Resolution, store: Store, expected: str | None, progress: FetchProgress) -> Fetched:
        url = resolution.location["url"]
        return download_to_store(name, url, civitai_auth(url), resolution, store, expected, progress, None)


def _resolution(location: dict, size, sha) -> Resolution:
    key = f"civitai:{location['model_version']}/{location['file_id']}"
    return Resolution(location=location, size=size, sha256=sha, download_key=key)


def _ids(name: str, ref: SourceRef) -> tuple[str | None, str | None, str | None]:
    """(model id, version id, file id) from civitai:<version> or an AIR URN."""
    if ref.scheme == "civitai":
        return None, ref.item_id, None
    if ref.air_source != "civitai":
        raise ResolveError(
            f"Input '{name}': the AIR source '{ref.air_source}' is not supported; only civitai AIRs "
            "(urn:air:<ecosystem>:<type>:civitai:<model>@<version>) can be fetched. Use an hf:// or "
            "https:// source for other hubs."
        )
    version, _, file_id = (ref.air_version or "").partition("+")
    for label, value in (("model", ref.item_id), ("version", version), ("file", file_id)):
        if value and not value.isdigit():
            raise ResolveError(f"Input '{name}': the AIR {label} id '{value}' in '{ref.raw}' is not a number; Civitai ids are digits.")
    return ref.item_id, version or None, file_id or None


def _latest_version(what: str, model: str) -> str:
    url = f"{civitai_base()}/api/v1/models/{model}"
    answer = get_json(url, civitai_auth(url), what)
    versions = answer.get("modelVersions") if isinstance(answer, dict) else None
    if not versions or not isinstance(versions[0], dict) or "id" not in versions[0]:
        raise ResolveError(f"{what}: Civitai model {model} lists no versions; write the version as @<version id>.")
    return str(versions[0]["id"])


def _choose_file(name: str, ref: SourceRef, answer, file_id: str | None) -> dict:
    files = answer.get("files") if isinstance(answer, dict) else None
    if not isinstance(files, list) or not files:
        raise ResolveError(f"Input '{name}': Civitai lists no files for '{ref.raw}'.")
    files = [f for f in files if isinstance(f, dict)]
    if file_id is not None:
        chosen = [f for f in files if str(f.get("id")) == file_id]
    else:
        chosen = [f for f in files if f.get("primary")] or (files if len(files) == 1 else [])
    if len(chosen) != 1:
        listing = ", ".join(f"{f.get('id')} ({f.get('name')})" for f in files)
        raise ResolveError(
            f"Input '{name}': cannot tell which file of '{ref.raw}' to use (files: {listing}). "
            "Name one with an AIR: urn:air:<eco>:<type>:civitai:<model>@<version>+<file id>."
        )
    return chosen[0]
