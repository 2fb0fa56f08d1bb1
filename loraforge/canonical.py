"""Canonical JSON: the one way loraforge turns a value into JSON text it hashes or writes.

Keys are sorted, so equal values give equal text whatever order they were
built in. Without ``indent`` the text is compact (no spaces): action keys,
the recipe's canonical form and provenance metadata hash or embed it. With
``indent`` it is the readable form of files people read and diff (locks,
reports, manifests). ``ascii`` escapes non-ASCII characters (\\uXXXX) instead
of writing them as UTF-8; ``allow_nan=False`` refuses NaN and infinities,
which are not JSON. Each caller keeps the options its bytes were made with.
"""

from __future__ import annotations

import json


def canonical_json(value, *, indent: int | None = None, ascii: bool = True, allow_nan: bool = True) -> str:
    separators = (",", ":") if indent is None else None
    return json.dumps(value, sort_keys=True, separators=separators, indent=indent, ensure_ascii=ascii, allow_nan=allow_nan)
