"""Downloading one URL into a partial file: redirects, Range resume, retries.

The partial file lives in the store (keyed by what is downloaded), so an
interrupted download resumes from where it stopped, in this run (after a
retry) or a later one. Resumption sends ``Range: bytes=N-`` with ``If-Range``
set to the validator the first bytes came with; a server that answers 200
instead of 206 (it ignores Range, or the file changed) makes us start over,
never splice two versions. Bytes are hashed as they are written.

Settings (environment, read on each call so tests can shorten them):
``LORAFORGE_HTTP_TIMEOUT`` seconds without progress before a try fails (30),
``LORAFORGE_HTTP_RETRIES`` extra tries after a transient failure (5),
``LORAFORGE_HTTP_BACKOFF`` first wait between tries in seconds (1, doubling,
at most 60).

Credentials come from the source that makes the request (:class:`Auth`): this
layer sends the headers it is given and prints the source's hint on a
refusal; it knows no hub's tokens.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx

from loraforge import __version__
from loraforge.errors import ResolveError
from loraforge.resolve.progress import FetchProgress
from loraforge.resolve.stream_hash import StreamHashes

TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}
MAX_REDIRECTS = 10
READ_CHUNK = 1 << 20
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True)
class HttpSettings:
    timeout: float
    retries: int
    backoff: float

    @classmethod
    def from_env(cls) -> "HttpSettings":
        return cls(
            timeout=_env_number("LORAFORGE_HTTP_TIMEOUT", 30.0),
            retries=int(_env_number("LORAFORGE_HTTP_RETRIES", 5)),
            backoff=_env_number("LORAFORGE_HTTP_BACKOFF", 1.0),
        )


@dataclass(frozen=True)
class Auth:
    """What a source sends with its requests, and what a refusal (HTTP 401/403) tells the user to do."""

    headers: Mapping[str, str]
    hint: str


@dataclass(frozen=True)
class Downloaded:
    hashes: StreamHashes
    final_url: str  # after redirects, without query or credentials


class _Retry(Exception):
    """A transient failure: wait and try again (resuming)."""

    def __init__(self, reason: str, wait: float | None = None):
        super().__init__(reason)
        self.wait = wait


class _Restart(Exception):
    """The partial bytes cannot be continued: drop them and start from zero."""


def new_client(settings: HttpSettings) -> httpx.Client:
    return httpx.Client(
        follow_redirects=True,
        max_redirects=MAX_REDIRECTS,
        timeout=httpx.Timeout(settings.timeout),
        headers={"User-Agent": f"loraforge/{__version__}", "Accept-Encoding": "identity"},
    )


def get_json(url: str, auth: Auth, what: str, settings: HttpSettings | None = None) -> object:
    """GET a JSON document (an API answer) with the same retries and error messages as downloads."""
    settings = settings or HttpSettings.from_env()
    with new_client(settings) as client:
        for attempt in range(settings.retries + 1):
            try:
                response = client.get(url, headers=dict(auth.headers))
                _raise_for_status(response, what, url, auth.hint)
                try:
                    return response.json()
                except ValueError:
                    raise ResolveError(f"{what}: {safe_url(url)} did not answer with JSON; check the base URL.") from None
            except (httpx.TransportError, _Retry) as error:
                _wait_or_give_up(error, attempt, settings, what, url)
            except httpx.TooManyRedirects:
                raise _redirect_error(what, url) from None
    raise AssertionError("unreachable")


def download(
    url: str,
    part: Path,
    *,
    name: str,
    auth: Auth,
    progress: FetchProgress,
    settings: HttpSettings | None = None,
    max_bytes: int | None = None,
) -> Downloaded:
    """Download ``url`` into ``part`` (resuming what is there); returns the hashes of the whole file.

    ``max_bytes`` (the size a lock pins): an answer that declares more, or sends more, is cut off there
    and refused with nothing stored, instead of filling the disk with what cannot be the pinned file."""
    settings = settings or HttpSettings.from_env()
    what = f"Input '{name}'"
    meta_path = part.with_suffix(".json")
    hashes = _hash_existing(part, meta_path, url)
    progress.start(name, None, hashes.size)
    try:
        with new_client(settings) as client:
            attempt = 0
            while True:
                try:
                    final = _one_try(client, url, part, meta_path, hashes, auth, name, progress, max_bytes)
                    return Downloaded(hashes, safe_url(final))
                except _Restart:
                    _drop_partial(part, meta_path)
                    hashes = StreamHashes()
                    progress.start(name, None, 0)
                except (httpx.TransportError, _Retry) as error:
                    _wait_or_give_up(error, attempt, settings, what, url)
                    attempt += 1
    except httpx.TooManyRedirects:
        raise _redirect_error(what, url) from None
    except _TooLarge as large:
        _drop_partial(part, meta_path)
        raise ResolveError(
            f"{what}: {safe_url(url)} {large.args[0]}, more than the {max_bytes:,} bytes the lock pins; the download "
            "was stopped there and nothing was stored. The file at the source is not the pinned one: check the "
            "source, then `loraforge lock` to pin what it serves now."
        ) from None
    except OSError as error:  # the store's disk: full, read-only, gone
        _drop_partial(part, meta_path)
        raise ResolveError(
            f"{what}: cannot write the download of {safe_url(url)} into the store ({part.parent}): "
            f"{error.strerror or error}. Nothing was stored. Free disk space or make $LORAFORGE_CACHE "
            "writable (or point it at another folder), then run the command again."
        ) from None
    finally:
        progress.finish(name)


def _redirect_error(what: str, url: str) -> ResolveError:
    return ResolveError(
        f"{what}: {safe_url(url)} redirects more than {MAX_REDIRECTS} times (a redirect loop); nothing was "
        "downloaded or stored. Check the URL in a browser, or download the file yourself and give its local path "
        "with `sha256:`."
    )


class _TooLarge(Exception):
    """The answer is larger than the pinned size (args[0]: what it declared or sent)."""


def _one_try(client, url, part, meta_path, hashes, auth: Auth, name, progress, max_bytes: int | None = None) -> str:
    request_headers = dict(auth.headers)
    validator = _read_meta(meta_path).get("validator")
    if hashes.size:
        request_headers["Range"] = f"bytes={hashes.size}-"
        if validator:
            request_headers["If-Range"] = validator
    with client.stream("GET", url, headers=request_headers) as response:
        status = response.status_code
        if status == 416 and hashes.size:
            raise _Restart()  # the partial is not a prefix of what the server has now
        _raise_for_status(response, f"Input '{name}'", url, auth.hint)
        total = _int(response.headers.get("Content-Length"))
        if hashes.size and status == 200:
            # Range ignored, or the file changed (If-Range): this answer is the whole file; use it.
            with open(part, "r+b") as out:
                out.truncate(0)
            hashes.reset()
        if hashes.size:
            if status != 206:
                raise _Restart()
            match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
            if not match or int(match[1]) != hashes.size:
                raise _Restart()
            total = None if match[3] == "*" else int(match[3])
        elif status == 206:
            raise _Restart()  # a range we did not ask for: distrust it
        if max_bytes is not None and total is not None and total > max_bytes:
            raise _TooLarge(f"declares {total:,} bytes")
        _write_meta(meta_path, url, response)
        progress.start(name, total, hashes.size)
        with open(part, "ab") as out:
            for chunk in response.iter_bytes():  # as received: a buffered chunk would be lost on a drop
                if max_bytes is not None and hashes.size + len(chunk) > max_bytes:
                    raise _TooLarge(f"sent more than {max_bytes:,} bytes")
                out.write(chunk)
                hashes.update(chunk)
                progress.advance(name, len(chunk))
        if total is not None and hashes.size != total:
            raise _Retry(f"the connection ended after {hashes.size} of {total} bytes")
        return str(response.url)


def _raise_for_status(response: httpx.Response, what: str, url: str, hint: str) -> None:
    status = response.status_code
    if status in TRANSIENT_STATUS:
        raise _Retry(f"HTTP {status}", _retry_after(response))
    if status < 400:
        return
    shown = safe_url(url)
    if status in (401, 403):
        raise ResolveError(
            f"{what}: {shown} refused access (HTTP {status}). The file needs authentication or "
            f"permission. {hint}"
        )
    if status == 404:
        raise ResolveError(f"{what}: {shown} does not exist (HTTP 404). Check the URL, repository, revision and file name.")
    raise ResolveError(f"{what}: {shown} answered HTTP {status} {response.reason_phrase}. Check the URL.")


def _wait_or_give_up(error: Exception, attempt: int, settings: HttpSettings, what: str, url: str) -> None:
    if attempt >= settings.retries:
        raise ResolveError(
            f"{what}: downloading {safe_url(url)} failed after {attempt + 1} tries: {_describe(error, settings)}. "
            "Check the network and the server; run the command again to resume (downloaded bytes are kept), "
            "or raise LORAFORGE_HTTP_TIMEOUT / LORAFORGE_HTTP_RETRIES for a slow server."
        ) from None
    wait = getattr(error, "wait", None)
    delay = settings.backoff * (2 ** attempt)
    time.sleep(min(max(delay, wait or 0.0), 60.0))


def _describe(error: Exception, settings: HttpSettings) -> str:
    if isinstance(error, httpx.TimeoutException):
        return f"no data for {settings.timeout:g} s (timeout)"
    if isinstance(error, httpx.TooManyRedirects):
        return f"more than {MAX_REDIRECTS} redirects"
    if isinstance(error, httpx.ConnectError):
        return f"cannot connect ({error})"
    return str(error) or type(error).__name__


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After", "")
    return float(value) if value.isdigit() else None


def _hash_existing(part: Path, meta_path: Path, url: str) -> StreamHashes:
    """Hashes of the bytes already in ``part``, or a fresh start when they came from another URL."""
    hashes = StreamHashes()
    if not part.exists() or _read_meta(meta_path).get("url") != url:
        _drop_partial(part, meta_path)
        return hashes
    with open(part, "rb") as handle:
        while chunk := handle.read(READ_CHUNK):
            hashes.update(chunk)
    return hashes


def _read_meta(meta_path: Path) -> dict:
    try:
        value = json.loads(meta_path.read_text())
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_meta(meta_path: Path, url: str, response: httpx.Response) -> None:
    """Remember what the partial bytes are a prefix of: a strong ETag, else Last-Modified."""
    etag = response.headers.get("ETag")
    validator = etag if etag and not etag.startswith("W/") else response.headers.get("Last-Modified")
    meta_path.write_text(json.dumps({"url": url, "validator": validator}, sort_keys=True))


def _drop_partial(part: Path, meta_path: Path) -> None:
    for path in (part, meta_path):
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def safe_url(url: str) -> str:
    """The URL without credentials or query (signed URLs carry tokens and expiry times there)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _int(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ResolveError(f"The environment variable {name}={raw!r} is not a number; set it to e.g. {default:g}.") from None
    if value < 0:
        raise ResolveError(f"The environment variable {name}={raw!r} is negative; set it to e.g. {default:g}.")
    return value
