"""What the remote sources send to the servers they fetch from, and what a refusal tells the user.

The HTTP layer (:mod:`loraforge.resolve.http`) takes an :class:`Auth` from the
source and knows no hub's tokens; the Civitai token and host live here, read
by ``civitai:`` sources and by ``https://`` URLs on the Civitai host.
``CIVITAI_API_TOKEN`` is sent as ``Authorization: Bearer`` and only to the
Civitai origin: the scheme, host and port of ``LORAFORGE_CIVITAI_BASE``
(default ``https://civitai.com``; mirrors, tests), over https (plain http
only to a loopback host). A URL from a lock file or from an API answer that
points anywhere else is fetched without it, and httpx drops the header on a
redirect to another origin. ``HF_TOKEN`` goes only to ``HF_ENDPOINT`` through
huggingface_hub, which drops it for CDN redirects, and only when that
endpoint is https or loopback (:func:`token_allowed`).
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from loraforge.resolve.http import Auth

TOKEN_ENV = "CIVITAI_API_TOKEN"
BASE_ENV = "LORAFORGE_CIVITAI_BASE"
DEFAULT_BASE = "https://civitai.com"

GENERIC_HINT = (
    "Set HF_TOKEN (or run `hf auth login`) for hf:// sources and CIVITAI_API_TOKEN for civitai: "
    "sources; for other servers, download the file yourself and give its local path with `sha256:`."
)


def civitai_base() -> str:
    return (os.environ.get(BASE_ENV) or DEFAULT_BASE).rstrip("/")


def civitai_host() -> str:
    return urlsplit(civitai_base()).hostname or ""


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
_DEFAULT_PORTS = {"https": 443, "http": 80}


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of ``url``, lower-cased, with the scheme's default port filled in."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:  # a malformed port: matches no origin
        return scheme, "", -1
    return scheme, (parts.hostname or "").lower(), port or _DEFAULT_PORTS.get(scheme)


def token_allowed(url: str, base: str) -> bool:
    """Whether a token for the service at ``base`` may go to ``url``: same origin, over https or to loopback."""
    scheme, host, _ = origin(url)
    return bool(host) and origin(url) == origin(base) and (scheme == "https" or (scheme == "http" and host in LOOPBACK_HOSTS))


def _on_civitai(url: str) -> bool:
    return (urlsplit(url).hostname or "") == civitai_host()


def _hint(url: str) -> str:
    if _on_civitai(url):
        return f"Set {TOKEN_ENV} to your Civitai API key (it is sent as a Bearer header, never stored)."
    return GENERIC_HINT


def _civitai_headers() -> dict[str, str]:
    token = os.environ.get(TOKEN_ENV, "").strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def civitai_auth(url: str) -> Auth:
    """A Civitai request (API or download): the token (when set) only where ``url`` is on the Civitai origin.

    Download URLs come from API answers and from lock files, which a cloned
    repository controls; neither may steer the token to another host.
    """
    return Auth(_civitai_headers() if token_allowed(url, civitai_base()) else {}, _hint(url))


def https_auth(url: str) -> Auth:
    """An ``https://`` source's request: the Civitai token only for a URL on the Civitai origin."""
    return civitai_auth(url)
