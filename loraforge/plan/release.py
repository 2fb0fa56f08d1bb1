"""Planning a `kind: release` target: which outputs go into the bundle folder, and its action key.

A release computes nothing: it links (or copies) the included targets'
outputs into a folder and writes manifest.json and README.md about them
(docs/releases.md). Its action key covers everything those files say:
the included outputs' sha256 (through ``context.input_hashes``), their
action keys (the bundled lock records them), the recipe text (copied into
the bundle), every input's source, location and hashes (listed in the
manifest), the release date and the numeric policies.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

from loraforge.errors import PlanError
from loraforge.formats.metadata import release_date
from loraforge.plan.action_key import action_key
from loraforge.plan.context import PlanContext
from loraforge.plan.target import PlannedTarget, Produces
from loraforge.release.manifest import MANIFEST_FORMAT, MANIFEST_NAME, README_NAME
from loraforge.resolve.hash_cache import cached_file_sha256
from loraforge.resolve.lock_sync import input_entry
from loraforge.resolve.lockfile import lock_path
from loraforge.resolve.secrets import redact_text, redact_url

# Buffers of the copy fallback and the hashing; nothing else is held in memory.
RELEASE_MEMORY_BYTES = 32 << 20
RESERVED_NAMES = (MANIFEST_NAME, README_NAME)


@dataclass(frozen=True)
class IncludedOutput:
    """One target whose output goes into the bundle."""

    target: str
    kind: str  # the recipe's `kind:`
    path: Path  # the built output
    report_path: Path | None  # the merge/extract JSON report written next to it, if that kind has one
    action_key: str | None
    sha256: str | None  # the output's sha256 when planned (None while unbuilt); checked again when bundling
    file_name: str  # its name inside the bundle (the output's own file name)


@dataclass(frozen=True, kw_only=True)
class ReleaseTarget(PlannedTarget):
    """A planned `kind: release` target: ``output`` is the bundle folder, ``identity_path`` its
    manifest.json (the file whose sha256 the lock records)."""

    kind: ClassVar[str] = "release"
    produces: ClassVar[Produces] = "bundle"

    included: tuple[IncludedOutput, ...]  # in `include` order
    inputs: tuple[str, ...]  # every input the included targets read, directly or through targets; sorted
    recipe_bytes: bytes  # the recipe file as read at plan time, copied into the bundle
    recipe_file: str  # its name in the bundle
    lock_file: str  # the bundled lock's name
    description: str | None
    date: str | None
    readme: bool
    memory_bytes: int = RELEASE_MEMORY_BYTES
    device: str = "cpu"  # no tensors: the device never matters

    @property
    def recipe_text(self) -> str:
        return self.recipe_bytes.decode("utf-8-sig")

    def intact(self) -> bool:
        """Every file the bundle's manifest lists is present with its size and sha256 (plan/status.py
        asks this once manifest.json itself matches the lock). Hashes come from the stat-keyed cache,
        so an untouched bundle is not re-read; a file deleted or edited by hand makes the release stale."""
        try:
            listed = json.loads(self.identity_path.read_text(encoding="utf-8")).get("files", [])
            return all(_listed_file_intact(self.output, entry) for entry in listed)
        except (OSError, ValueError, AttributeError, TypeError):
            return False


def _listed_file_intact(folder: Path, entry: dict) -> bool:
    path = folder / entry["file"]
    return path.is_file() and path.stat().st_size == entry["size"] and cached_file_sha256(path) == entry["sha256"]


def plan_release(context: PlanContext, name: str) -> ReleaseTarget:
    loaded = context.loaded
    recipe = loaded.recipe
    spec = recipe.targets[name]
    folder = context.output_path(name)
    included = tuple(_included(context, dep) for dep in recipe.dependencies(name))
    _check_file_names(context, name, included)
    _check_folder(context, name, folder)
    inputs = _inputs_read(context, [entry.target for entry in included])
    recipe_bytes = _recipe_bytes(loaded)
    description = spec.description if spec.description is not None else recipe.description
    date = release_date(recipe.date)
    sizes = sum(context.planned[entry.target].write_bytes for entry in included)
    key_extra = {
        "release_format": MANIFEST_FORMAT,
        "recipe_sha256": hashlib.sha256(recipe_bytes).hexdigest(),
        "recipe_file": loaded.path.name,
        "included": {e.target: [e.kind, e.action_key, e.file_name, e.report_path.name if e.report_path else None] for e in included},
        "inputs": {n: input_entry(context.inputs[n], None) for n in inputs},
        "description": description,
        "date": date,
        "numeric_policies": context.kinds.numeric_policies(),
    }
    hashes = context.input_hashes(name)
    if any(e.action_key is None for e in included):
        hashes = None  # a producer is waiting on its own producer: nothing is known yet
    return ReleaseTarget(
        name=name,
        output=folder,
        identity_path=folder / MANIFEST_NAME,
        included=included,
        inputs=inputs,
        recipe_bytes=recipe_bytes,
        recipe_file=loaded.path.name,
        lock_file=lock_path(loaded.path).name,
        description=description,
        date=date,
        readme=spec.readme,
        dependencies=tuple(entry.target for entry in included),
        action_key=action_key(loaded, name, "release", hashes, MANIFEST_FORMAT, key_extra),
        read_bytes=sizes,
        write_bytes=sizes,
    )


def _included(context: PlanContext, target: str) -> IncludedOutput:
    planned = context.planned[target]
    report = planned.report_path
    return IncludedOutput(
        target=target,
        kind=context.loaded.recipe.targets[target].kind,
        path=Path(planned.output),
        report_path=Path(report) if report is not None else None,
        action_key=planned.action_key,
        sha256=context.built[target].sha256 if target in context.built else None,
        file_name=Path(planned.output).name,
    )


def _inputs_read(context: PlanContext, targets: list[str]) -> tuple[str, ...]:
    """Inputs read by ``targets`` and by the targets they read, transitively."""
    recipe = context.loaded.recipe
    seen, found, stack = set(), set(), list(targets)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        for dep in recipe.dependencies(name):
            (found.add(dep) if dep in recipe.inputs else stack.append(dep))
    return tuple(sorted(found))


def _recipe_bytes(loaded) -> bytes:
    try:
        data = loaded.path.read_bytes()
    except OSError as error:
        raise PlanError(f"{loaded.display_name}: the recipe file cannot be read again to copy it into the release "
                        f"({error.strerror}); check that it still exists and is readable.") from None
    secret = sorted({spec.source for spec in loaded.recipe.inputs.values() if redact_url(spec.source) != spec.source})
    if not secret:
        return data  # the bundle's copy is the recipe exactly as read
    text = redact_text(data.decode("utf-8-sig"), secret)
    if text is None:
        raise PlanError(
            f"{loaded.display_name}: a source URL carries credentials ({redact_url(secret[0])}) written in a form "
            "loraforge cannot find in the recipe text to leave out of the release's copy of the recipe (YAML escapes "
            "or a line break inside the URL); write each such URL on one line, in plain quotes."
        )
    return text.encode("utf-8")  # credentials REDACTED: a release is made to be shared (resolve/secrets.py)


# --- checks ----------------------------------------------------------------------


def _field(loaded, name: str) -> tuple:
    return ("targets", name, "output") if loaded.recipe.targets[name].output else ("targets", name)


def _check_file_names(context: PlanContext, name: str, included: tuple[IncludedOutput, ...]) -> None:
    """Bundle files are named after the outputs, so two outputs with one file name cannot share a bundle."""
    loaded = context.loaded
    # the recipe is copied under its own name (its lock ends in .lock, never a reserved name); compared casefolded,
    # as readme.md and README.md are one file on case-insensitive filesystems
    own = loaded.path.name
    reserved = next((r for r in RESERVED_NAMES if r.casefold() == own.casefold()), None)
    if reserved is not None:
        raise loaded.error(
            _field(loaded, name),
            f"release '{name}' would copy the recipe file {own} into the bundle under its own name, which is the "
            f"bundle's own {reserved} (loraforge writes it); one would overwrite the other",
            f"rename the recipe file, e.g. to recipe.yaml (its lock follows: recipe.lock); {' and '.join(RESERVED_NAMES)} "
            "are reserved in a bundle",
        )
    owner: dict[str, str] = {loaded.path.name: "the recipe", lock_path(loaded.path).name: "the lock"}
    owner.update({reserved: "loraforge" for reserved in RESERVED_NAMES})
    for entry in included:
        names = [entry.file_name] + ([entry.report_path.name] if entry.report_path else [])
        for file_name in names:
            if file_name in owner:
                raise loaded.error(
                    _field(loaded, entry.target),
                    f"release '{name}' would hold two files named {file_name!r} (target '{entry.target}' and "
                    f"{owner[file_name]}); a bundle is one flat folder.",
                    f"give target '{entry.target}' an output with another file name",
                )
            owner[file_name] = f"target '{entry.target}'"


def _check_folder(context: PlanContext, name: str, folder: Path) -> None:
    """The folder is replaced as a whole on every build, so it must hold nothing but the bundle."""
    loaded = context.loaded
    written = loaded.recipe.default_output(name)
    hint = "write a folder of its own for the release, e.g. output: dist/<release name>"
    root = loaded.root.resolve() if context.output_dir is None else Path(context.output_dir)
    if folder == root or folder in root.parents:
        raise loaded.error(_field(loaded, name), f"the release folder {written!r} is the recipe's own folder", hint)
    for other in loaded.recipe.targets:
        path = context.output_path(other)
        if other != name and (path == folder or folder in path.parents or path in folder.parents):
            raise loaded.error(
                _field(loaded, name),
                f"the release folder {written!r} overlaps the output of target '{other}' "
                f"({loaded.recipe.default_output(other)!r}); building the release replaces the whole folder and "
                "would delete it",
                hint,
            )
    for input_name, resolved in context.inputs.items():
        if resolved.path is not None and folder in Path(resolved.path).parents:
            raise loaded.error(
                _field(loaded, name),
                f"input '{input_name}' ({resolved.source}) lies inside the release folder {written!r}; building "
                "the release replaces the whole folder and would delete it",
                hint,
            )
