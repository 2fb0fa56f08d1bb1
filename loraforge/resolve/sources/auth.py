"""What the remote sources send to the servers they fetch from, and what a refusal tells the user.

The HTTP layer (:mod:`loraforge.resolve.http`) takes an :class:`Auth` from the
source and knows no hub's tokens; the Civitai token and host live here, read
by ``civitai:`` sources and by ``https://`` URLs on the Civitai host.
``CIVITAI_API_TOKEN`` is sent as ``Authorization: Bearer`` (httpx drops it on
redirects to another host). ``LORAFORGE_CIVITAI_BASE`` replaces
``https://civitai.com`` (mirrors, tests).
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
    """A ``civitai:`` source's request: always with the token (when set)."""
    return Auth(_civitai_headers(), _hint(url))


def https_auth(url: str) -> Auth:
    """An ``https://`` source's request: the Civitai token only for a URL on the Civitai host."""
    return Auth(_civitai_headers() if _on_civitai(url) else {}, _hint(url))
