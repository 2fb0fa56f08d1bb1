"""``<recipe>.lock``: what a build resolved and produced, as deterministic text.

The lock sits next to the recipe (``release.yaml`` -> ``release.lock``). It is
JSON with sorted keys, two-space indent and a final newline, so the same
state always gives the same bytes and diffs review well. Sections:

* ``inputs``: per input the source as written, where it resolved to
  (``resolved``: hf commit, Civitai version/file id, final URL without query
  or credentials, or the path relative to the recipe), size, whole-file
  sha256 and safetensors data-section sha256 (absent until the file was
  read once: ``lock`` does not download what the source can describe);
* ``targets``: per built target its action key, output path (relative to
  the recipe), size and sha256; for SVD steps also the device class, the
  numeric environment (plan/numeric_environment.py; absent in locks of
  older versions, which still load) and the per-module tolerance;
* ``loraforge`` (version) and ``numeric_policy``: a change of either may
  change output bytes, so ``--locked`` refuses to run across one.

Unknown keys are kept when a lock is updated, so later versions can extend
an entry without older ones dropping it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from loraforge import __version__
from loraforge.atomic import write_text_atomic
from loraforge.canonical import canonical_json
from loraforge.errors import ResolveError

LOCK_FORMAT = "loraforge-lock/1"
COMMENT = "Written by loraforge (build, lock). Commit it with the recipe; do not edit by hand."


def lock_path(recipe_path: Path) -> Path:
    return Path(recipe_path).with_suffix(".lock")


@dataclass
class Lock:
    inputs: dict[str, dict] = field(default_factory=dict)
    targets: dict[str, dict] = field(default_factory=dict)
    loraforge: str = __version__
    numeric_policy: dict[str, str] = field(default_factory=dict)  # operation -> policy (plan/kinds.py TargetKinds)
    extra: dict = field(default_factory=dict)  # top-level keys of later versions, kept as they are

    def to_text(self) -> str:
        document = {
            **self.extra,
            "_comment": COMMENT,
            "format": LOCK_FORMAT,
            "loraforge": self.loraforge,
            "numeric_policy": dict(self.numeric_policy),
            "inputs": self.inputs,
            "targets": self.targets,
        }
        return canonical_json(document, indent=2, ascii=False) + "\n"


def read_lock(path: Path) -> Lock | None:
    """The lock at ``path``, None when there is none; a damaged lock is an error."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ResolveError(f"The lock file {path} cannot be read ({error.strerror}); check its permissions.") from None
    document = parse_lock_text(text)
    if document is None:
        raise ResolveError(
            f"The lock file {path} is not a loraforge lock (not JSON with \"format\": \"{LOCK_FORMAT}\"). "
            "If it was edited by hand or merged badly, delete it and run `loraforge lock` on the recipe."
        )
    known = {"_comment", "format", "loraforge", "numeric_policy", "inputs", "targets"}
    return Lock(
        inputs=_mapping_of_dicts(document.get("inputs")),
        targets=_mapping_of_dicts(document.get("targets")),
        loraforge=str(document.get("loraforge", "")),
        numeric_policy={str(k): str(v) for k, v in (document.get("numeric_policy") or {}).items()},
        extra={k: v for k, v in document.items() if k not in known},
    )


def parse_lock_text(text: str) -> dict | None:
    try:
        document = json.loads(text)
    except ValueError:
        return None
    if not isinstance(document, dict) or document.get("format") != LOCK_FORMAT:
        return None
    return document


def write_lock(path: Path, lock: Lock) -> bool:
    """Write atomically; returns False (and leaves the file alone) when nothing changed."""
    text = lock.to_text()
    path = Path(path)
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except OSError:
        pass
    try:
        write_text_atomic(path, text)
    except OSError as error:
        raise ResolveError(f"Cannot write the lock file {path} ({error.strerror}); check the folder's permissions.") from None
    return True


def _mapping_of_dicts(value) -> dict[str, dict]:
    if not isinstance(value, dict):
        return {}
    return {str(k): dict(v) for k, v in value.items() if isinstance(v, dict)}
