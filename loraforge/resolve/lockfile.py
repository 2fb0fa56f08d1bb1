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


MAX_LOCK_BYTES = 64 << 20  # far above any real lock (a few KiB per input and target)
_HINT = "If it was edited by hand or merged badly, delete it and run `loraforge lock` on the recipe."


def read_lock(path: Path) -> Lock | None:
    """The lock at ``path``, None when there is none; a damaged lock is one-paragraph ResolveError.

    Damaged means: not a regular file (a FIFO, a link to /dev/zero), over
    MAX_LOCK_BYTES, not UTF-8, not JSON (or nested too deep for the parser),
    not a loraforge lock, or a known field of the wrong type.
    """
    _refuse_shared(Path(path))
    text = _read_lock_text(Path(path))
    if text is None:
        return None
    document = parse_lock_text(text)
    if document is None:
        raise ResolveError(
            f"The lock file {path} is not a loraforge lock (not JSON with \"format\": \"{LOCK_FORMAT}\"). {_HINT}"
        )
    problem = _type_problem(document)
    if problem is not None:
        raise ResolveError(f"The lock file {path} is damaged: {problem}. {_HINT}")
    known = {"_comment", "format", "loraforge", "numeric_policy", "inputs", "targets"}
    return Lock(
        inputs=_mapping_of_dicts(document.get("inputs")),
        targets=_mapping_of_dicts(document.get("targets")),
        loraforge=str(document.get("loraforge", "")),
        numeric_policy={str(k): str(v) for k, v in (document.get("numeric_policy") or {}).items()},
        extra={k: v for k, v in document.items() if k not in known},
    )


def _refuse_shared(path: Path) -> None:
    """``recipe.yaml`` and ``recipe.yml`` side by side would both use ``recipe.lock``, each dropping the other's entries."""
    recipes = [candidate for candidate in (path.with_suffix(".yaml"), path.with_suffix(".yml")) if candidate.is_file()]
    if len(recipes) == 2:
        raise ResolveError(
            f"{recipes[0].name} and {recipes[1].name} in {path.parent} would share the lock file {path.name}, each "
            "overwriting the other's entries (a recipe's lock is its file name with .lock). Rename one of them, or "
            "delete the one you do not use."
        )


def _read_lock_text(path: Path) -> str | None:
    import os
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not block the open
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ResolveError(f"The lock file {path} cannot be read ({error.strerror}); check its permissions.") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ResolveError(
                f"The lock file {path} is not a regular file (a device, a pipe or a folder, perhaps through a "
                f"symbolic link); loraforge does not read it. Remove it and run `loraforge lock` on the recipe."
            )
        with os.fdopen(fd, "rb") as handle:
            fd = None
            data = handle.read(MAX_LOCK_BYTES + 1)
    finally:
        if fd is not None:
            os.close(fd)
    if len(data) > MAX_LOCK_BYTES:
        raise ResolveError(f"The lock file {path} is larger than {MAX_LOCK_BYTES >> 20} MiB, far more than any lock. {_HINT}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ResolveError(f"The lock file {path} is not UTF-8 text (byte {error.start}). {_HINT}") from None


# Types of the fields loraforge reads; another type would fail far from the file that caused it.
_TOP_FIELDS = {"loraforge": str, "numeric_policy": dict, "inputs": dict, "targets": dict}
_ENTRY_FIELDS = {
    "inputs": {"source": str, "sha256": str, "data_sha256": str, "size": int, "resolved": dict},
    "targets": {"action_key": str, "output": str, "sha256": str, "data_sha256": str, "size": int,
                "device_class": str, "numeric_environment": dict, "tolerance": dict},
}


def _type_problem(document: dict) -> str | None:
    for key, kind in _TOP_FIELDS.items():
        if key in document and not isinstance(document[key], kind):
            return f"\"{key}\" is {_json_type(document[key])}, not {_json_type(kind())}"
    for value in (document.get("numeric_policy") or {}).values():
        if not isinstance(value, str):
            return f"a \"numeric_policy\" value is {_json_type(value)}, not a string"
    for section, fields in _ENTRY_FIELDS.items():
        for name, entry in (document.get(section) or {}).items():
            if not isinstance(entry, dict):
                return f"{section}.{name} is {_json_type(entry)}, not an object"
            for key, kind in fields.items():
                value = entry.get(key)
                if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
                    return f"{section}.{name}.{key} is {_json_type(value)}, not {_json_type(kind())}"
    return None


def _json_type(value) -> str:
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number"}.get(type(value), "null")


def parse_lock_text(text: str) -> dict | None:
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser goes
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
