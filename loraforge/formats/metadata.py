"""Metadata conventions for the files loraforge writes.

ModelSpec (``modelspec.*``) is the Stability AI metadata standard that
A1111, ComfyUI and the hubs read; ``loraforge.*`` keys carry our provenance.
Every value is a string and nothing here depends on the clock: dates come
from the recipe or SOURCE_DATE_EPOCH.
"""

from __future__ import annotations

import datetime
import os
from typing import Mapping, Sequence

from loraforge import __version__
from loraforge.canonical import canonical_json
from loraforge.formats.arch.table import Architecture

MODELSPEC_VERSION = "1.0.1"
HASH_KEY = "modelspec.hash_sha256"
# The data hash is only known after the tensors are written; the writer
# reserves this many characters in the header and fills them in at the end.
HASH_PLACEHOLDER = "0x" + "0" * 64

def release_date(recipe_date: str | None) -> str | None:
    """The recipe's date, else SOURCE_DATE_EPOCH as a UTC date, else none at all."""
    if recipe_date:
        return str(recipe_date)
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch and epoch.strip().isdigit():
        return datetime.datetime.fromtimestamp(int(epoch), tz=datetime.timezone.utc).date().isoformat()
    return None


def checkpoint_metadata(
    arch: Architecture,
    *,
    title: str,
    date: str | None,
    merged_from: Sequence[str],
    provenance: Mapping[str, str],
) -> dict[str, str]:
    """ModelSpec keys for a checkpoint plus the ``loraforge.*`` provenance keys, sorted."""
    metadata = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": arch.modelspec_architecture,
        "modelspec.implementation": arch.modelspec_implementation,
        "modelspec.title": title,
        "modelspec.merged_from": ", ".join(merged_from),
        HASH_KEY: HASH_PLACEHOLDER,
        "loraforge.version": __version__,
    }
    if date:
        metadata["modelspec.date"] = date
    metadata.update({f"loraforge.{key}": value for key, value in provenance.items()})
    return dict(sorted(metadata.items()))


def provenance_json(value) -> str:
    """Canonical JSON for metadata values: sorted keys, no optional whitespace, UTF-8."""
    return canonical_json(value, ascii=False)
