"""Recipe inputs -> local files with verified sha256s (the planner's only way to get inputs).

For each input, in name order:

1. a local path / ``file://`` is used in place and hashed (hash cache);
2. a remote source is looked up in the store by the sha256 it must have:
   the recipe's ``sha256:``, else the lock's (when the lock's source equals
   the recipe's), else the one a previous fetch of the same source recorded;
3. otherwise the source resolves its location (``pinned`` from the lock
   where there is one: hf commit, Civitai file) and fetches it into the
   store, verified against the expected sha256 before it enters.

``offline`` stops before any network access and lists every input still
missing; ``locked`` refuses anything that differs from the lock (a changed
file, a new or edited source, another loraforge version or numeric
policy). ``refresh`` (the ``lock`` command) re-resolves remote sources
instead of trusting the lock, and ``download=False`` records what a source
describes (sha256, size) without downloading it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping

from loraforge import __version__
from loraforge.errors import LoraforgeError, ResolveError
from loraforge.recipe.loader import LoadedRecipe
from loraforge.recipe.sources import parse_source
from loraforge.resolve.local import ResolvedInput, locate_input, verified_local
from loraforge.resolve.lockfile import Lock, lock_path, read_lock
from loraforge.resolve.progress import FetchProgress, NoProgress
from loraforge.resolve.secrets import redact_url
from loraforge.resolve.sources import REMOTE_SOURCES, Resolution
from loraforge.resolve.store import Blob, Store, source_key

LOCAL_SCHEMES = ("path", "file")


@dataclass(frozen=True)
class ResolveOptions:
    offline: bool = False
    locked: bool = False
    refresh: bool = False
    download: bool = True
    progress: FetchProgress = field(default_factory=NoProgress)
    # This loraforge's numeric policies (the target kinds' registry): --locked refuses a lock with others.
    numeric_policies: Mapping[str, str] | None = None


class _Missing(Exception):
    """An input that --offline cannot provide (collected, reported together)."""


def resolve_inputs(loaded: LoadedRecipe, names: Iterable[str], options: ResolveOptions | None = None) -> dict[str, ResolvedInput]:
    options = options or ResolveOptions()
    lock = load_lock_for(loaded, options)
    store = Store()
    resolved: dict[str, ResolvedInput] = {}
    missing: list[tuple] = []
    for name in sorted(names):
        try:
            resolved[name] = _resolve_one(loaded, name, lock, store, options)
        except _Missing as gap:
            missing.append((("inputs", name, "source"), str(gap), ""))
        except LoraforgeError as error:
            raise loaded.error(("inputs", name, "source"), str(error)) from None
    if missing:
        hint = (
            "run `loraforge fetch` on this recipe while online (it fills the store under "
            "$LORAFORGE_CACHE), then build with --offline"
        )
        missing[-1] = (*missing[-1][:2], hint)
        raise loaded.errors(missing)
    return resolved


def load_lock_for(loaded: LoadedRecipe, options: ResolveOptions) -> Lock | None:
    path = lock_path(loaded.path)
    lock = read_lock(path)
    if not options.locked:
        return lock
    if lock is None:
        raise ResolveError(
            f"--locked: there is no lock file {path} for {loaded.display_name or loaded.path}. "
            "Run `loraforge lock` (or a build without --locked) to create it, and commit it with the recipe."
        )
    if lock.loraforge != __version__:
        raise ResolveError(
            f"--locked: {path} was written by loraforge {lock.loraforge}, this is {__version__}; outputs could "
            "differ. Use that version, or rebuild without --locked to update the lock."
        )
    policies = options.numeric_policies
    if policies is not None and lock.numeric_policy != dict(policies):
        raise ResolveError(
            f"--locked: the numeric policy in {path} ({lock.numeric_policy}) is not this loraforge's "
            f"({dict(policies)}); outputs could differ. Rebuild without --locked to update the lock."
        )
    return lock


def _resolve_one(loaded: LoadedRecipe, name: str, lock: Lock | None, store: Store, options: ResolveOptions) -> ResolvedInput:
    spec = loaded.recipe.inputs[name]
    ref = parse_source(spec.source)
    entry = _lock_entry(name, spec, lock, options)
    locked_sha = entry.get("sha256") if entry else None
    if ref.scheme in LOCAL_SCHEMES:
        result = verified_local(locate_input(name, spec.source, spec.sha256, loaded.root))
        if options.locked and result.sha256 != locked_sha:
            raise ResolveError(
                f"--locked: input '{name}' ({result.path}) changed since the lock: the lock has sha256 "
                f"{locked_sha}, the file has {result.sha256}. Restore the locked file, or build without "
                "--locked to accept the new file and update the lock."
            )
        return result
    return _resolve_remote(name, spec, ref, entry, locked_sha, store, options)


def _lock_entry(name: str, spec, lock: Lock | None, options: ResolveOptions) -> dict | None:
    entry = lock.inputs.get(name) if lock else None
    if entry is not None and entry.get("source") not in (spec.source, redact_url(spec.source)):
        if options.locked:
            raise ResolveError(
                f"--locked: input '{name}' has source '{spec.source}' in the recipe but '{entry.get('source')}' "
                "in the lock. Run `loraforge lock` to re-pin it, or restore the recipe."
            )
        entry = None  # the recipe changed the source: the old pin says nothing about it
    if options.locked and entry is None:
        raise ResolveError(f"--locked: input '{name}' is not in the lock file. Run `loraforge lock` to add it.")
    if options.locked and spec.sha256 and entry.get("sha256") != spec.sha256:
        raise ResolveError(
            f"--locked: input '{name}' pins sha256 {spec.sha256} in the recipe but the lock has "
            f"{entry.get('sha256')}. Run `loraforge lock` after checking which is right."
        )
    return entry


def _resolve_remote(name, spec, ref, entry, locked_sha, store: Store, options: ResolveOptions) -> ResolvedInput:
    trust_pins = not options.refresh
    expected = spec.sha256 or (locked_sha if trust_pins else None)
    pinned = entry.get("resolved") if entry and trust_pins else None
    remembered = store.read_ref(spec.source) if trust_pins else None
    if expected is None and remembered is not None:
        blob = store.get(remembered["sha256"])
        if blob is not None:  # fetched before, no pin anywhere: the last fetch is what we have
            return _from_blob(name, spec, blob, remembered.get("resolved") or {}, "store")
    location = pinned
    if location is None and remembered is not None and remembered.get("sha256") == expected:
        location = remembered.get("resolved")
    blob = store.get(expected) if expected else None
    if blob is not None and (location or options.offline):
        return _from_blob(name, spec, blob, location or {}, "store")
    if options.offline:
        raise _Missing(f"input '{name}' ({spec.source}) is not in the store and --offline forbids downloading it")
    source = REMOTE_SOURCES[ref.scheme]
    resolution = source.resolve(name, ref, pinned)
    if resolution.sha256 and expected and resolution.sha256 != expected:
        raise ResolveError(
            f"Input '{name}': the source now reports sha256 {resolution.sha256}, but {expected} is pinned "
            "(recipe `sha256:` or lock). The file at the source changed; check it, then update the pin "
            "(`loraforge lock` re-pins what the recipe does not)."
        )
    expected = expected or resolution.sha256
    blob = blob or (store.get(expected) if expected else None)
    if blob is not None:
        _remember(store, spec.source, resolution, blob.sha256, resolution.location)
        return _from_blob(name, spec, blob, resolution.location, "store")
    if not options.download and expected:
        return ResolvedInput(name, redact_url(spec.source), None, resolution.size, spec.sha256, sha256=expected,
                             location=dict(resolution.location), origin="remote")
    size = entry.get("size") if entry and trust_pins and entry.get("sha256") == expected else None
    if isinstance(size, int) and size > 0:
        resolution = replace(resolution, max_bytes=size)  # never download more than the pinned file holds
    return _fetch(name, spec, source, resolution, expected, store, options)


def _fetch(name, spec, source, resolution: Resolution, expected, store: Store, options: ResolveOptions) -> ResolvedInput:
    try:
        return _fetch_locked(name, spec, source, resolution, expected, store, options)
    except OSError as error:  # the store's folders: read-only, full, not a folder
        where = f" ({error.filename})" if getattr(error, "filename", None) else ""
        raise ResolveError(
            f"Input '{name}': cannot write to the download store {store.root}{where}: {error.strerror or error}. "
            "Nothing was stored. Make $LORAFORGE_CACHE a writable folder with free space (or point it at "
            "another one), then run the command again."
        ) from None


def _fetch_locked(name, spec, source, resolution: Resolution, expected, store: Store, options: ResolveOptions) -> ResolvedInput:
    with store.locked(source_key(resolution.download_key)):
        # Another process may have fetched it while we waited for the lock.
        blob = store.get(expected) if expected else None
        if blob is None and expected is None and not options.refresh:
            previous = store.read_ref(resolution.download_key)
            blob = store.get(previous["sha256"]) if previous else None
        if blob is not None:
            _remember(store, spec.source, resolution, blob.sha256, resolution.location)
            return _from_blob(name, spec, blob, resolution.location, "store")
        fetched = source.fetch(name, resolution, store, expected, options.progress)
        _remember(store, spec.source, resolution, fetched.blob.sha256, fetched.location)
    return _from_blob(name, spec, fetched.blob, fetched.location, "downloaded")


def _remember(store: Store, source: str, resolution: Resolution, sha256: str, location) -> None:
    record = {"sha256": sha256, "resolved": dict(location)}
    store.write_ref(source, {**record, "kind": "source"})  # the source as a recipe writes it
    store.write_ref(resolution.download_key, {**record, "kind": "download"})  # what was downloaded


def _from_blob(name: str, spec, blob: Blob, location, origin: str) -> ResolvedInput:
    return ResolvedInput(
        name, redact_url(spec.source), blob.path, blob.size, spec.sha256,  # recorded (lock, release): no secrets
        sha256=blob.sha256, data_sha256=blob.data_sha256, location=dict(location), origin=origin,
    )
