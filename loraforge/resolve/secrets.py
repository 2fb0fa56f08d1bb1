"""Credentials in source URLs: never copied into what loraforge records.

A recipe may name ``https://user:pass@host/x`` or ``https://host/x?token=…``
(a signed or tokenised link pasted from a browser). The recipe is the
user's; everything loraforge writes from it (the lock, output provenance,
a release's README and manifest, plan output) records the URL with the
user part and every secret-looking query value replaced by ``REDACTED``, so
the record still says where the file came from without the key to it.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit, urlunsplit

MARK = "REDACTED"
# Query parameter names that carry credentials (case-insensitive): exact names, and any name containing these.
_SECRET_NAMES = {"key", "sig", "auth", "pass", "pwd", "code", "session", "sid", "se", "sp", "sv", "skoid", "sktid"}
_SECRET_PARTS = re.compile(r"token|secret|passw|signature|credential|api[-_]?key|apikey|auth|x-amz-|x-goog-|sas")


def is_secret_parameter(name: str) -> bool:
    lowered = unquote(name).strip().lower()
    return lowered in _SECRET_NAMES or bool(_SECRET_PARTS.search(lowered))


def redact_url(source: str) -> str:
    """``source`` with credentials replaced by REDACTED; any other string (a path, hf://, civitai:) unchanged."""
    if not source.lower().startswith(("http://", "https://")):
        return source
    parts = urlsplit(source)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MARK}@{netloc.rsplit('@', 1)[1]}"
    query = "&".join(_redact_pair(pair) for pair in parts.query.split("&")) if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _redact_pair(pair: str) -> str:
    name, equals, value = pair.partition("=")
    return f"{name}={MARK}" if equals and value and is_secret_parameter(name) else pair


def secret_values(source: str) -> list[str]:
    """The credentials :func:`redact_url` removes from ``source`` (the user part, secret query values)."""
    if not source.lower().startswith(("http://", "https://")):
        return []
    parts = urlsplit(source)
    found = [parts.netloc.rsplit("@", 1)[0]] if "@" in parts.netloc else []
    for pair in parts.query.split("&") if parts.query else ():
        name, equals, value = pair.partition("=")
        if equals and value and is_secret_parameter(name):
            found.append(value)
    return found


def redact_text(text: str, sources) -> str | None:
    """``text`` (a recipe) with every source URL that carries credentials replaced by its redacted form;
    None when a credential is still in it (the URL was written with YAML escapes or split over lines)."""
    for source in sources:
        text = text.replace(source, redact_url(source))
    if any(value in text for source in sources for value in secret_values(source)):
        return None
    return text
