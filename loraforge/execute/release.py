"""Assembling a release bundle folder (docs/releases.md).

The bundle is built in a temporary sibling folder and swapped in only when
complete, so the folder under its final name is always a whole bundle: the
previous one until the swap, the new one after it. Any failure or interrupt
before the swap removes the temporary folder and leaves the previous bundle
as it was. The text of manifest.json and README.md comes from
loraforge.release (pure); this module only places files and hashes them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from loraforge import __version__
from loraforge.atomic import aside_name, fsync_folder, make_temp_folder, remove_stale
from loraforge.errors import BuildError, FormatError
from loraforge.plan.release import IncludedOutput, ReleaseTarget
from loraforge.release.card import model_card
from loraforge.release.contents import BundledFile, BundledOutput, InputRecord, ReleaseContents
from loraforge.release.manifest import MANIFEST_FORMAT, MANIFEST_NAME, README_NAME, manifest_text
from loraforge.resolve.hash_cache import cached_file_hashes
from loraforge.resolve.lock_sync import input_entry
from loraforge.resolve.lockfile import Lock

COPY_CHUNK = 8 << 20


@dataclass(frozen=True)
class WrittenManifest:
    """The file the lock records for a release (the runner protocol's ``written``)."""

    path: Path
    size: int
    sha256: str
    data_sha256: None = None  # not a safetensors file


@dataclass(frozen=True)
class ReleaseResult:
    target: str
    written: WrittenManifest
    folder: Path
    files: tuple[BundledFile, ...]  # every file of the bundle but manifest.json
    linked: int  # outputs placed as hard links
    copied: int  # outputs copied (another filesystem)

    def summary_lines(self) -> list[str]:
        return [
            f"bundle {self.folder}: {len(self.files) + 1} files; outputs {self.linked} hard-linked, {self.copied} copied",
            f"{MANIFEST_NAME} (its size and sha256 follow) lists every file's sha256",
        ]


def run_release(plan, target: ReleaseTarget, device=None, on_progress=lambda nbytes: None, *, lock: Lock | None = None) -> ReleaseResult:
    """Build the bundle folder ``target.output``; the torch device is unused (nothing is computed).
    ``lock`` is the build's lock as it stands (execute/state.py), whose entries the bundled lock reuses."""
    folder = target.output
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(folder.parent)  # bundles and temp folders of killed runs
    _check_replaceable(folder)
    temp = make_temp_folder(folder)  # unique and unpredictable (loraforge/atomic.py)
    try:
        outputs, linked = _place_outputs(target, temp, on_progress)
        recipe_file = _write_file(temp, target.recipe_file, target.recipe_bytes)
        lock_file = _write_file(temp, target.lock_file, _bundle_lock(plan, target, outputs, lock).to_text().encode())
        contents = ReleaseContents(
            name=target.name,
            recipe=plan.loaded.recipe,
            recipe_text=target.recipe_text,
            recipe_file=recipe_file,
            lock_file=lock_file,
            outputs=outputs,
            inputs=tuple(_input_record(plan, name) for name in target.inputs),
            description=target.description,
            date=target.date,
            version=__version__,
            numeric_policy=plan.kinds.numeric_policies(),
        )
        readme = _write_file(temp, README_NAME, model_card(contents).encode()) if target.readme else None
        manifest = _write_file(temp, MANIFEST_NAME, manifest_text(contents, readme).encode())
        with contextlib.suppress(OSError):  # not every platform can open a folder
            fsync_folder(temp)
        _swap_in(temp, folder)
    finally:
        _remove_tree(temp)  # gone already after a successful swap
    files = tuple(sorted(_bundle_files(outputs, recipe_file, lock_file, readme), key=lambda f: f.name))
    written = WrittenManifest(folder / MANIFEST_NAME, manifest.size, manifest.sha256)
    return ReleaseResult(target.name, written, folder, files, linked, len(outputs) - linked)


# --- placing files -----------------------------------------------------------------


def _place_outputs(target: ReleaseTarget, temp: Path, on_progress) -> tuple[tuple[BundledOutput, ...], int]:
    outputs, linked = [], 0
    for entry in target.included:
        file, was_linked = _place_output(entry, temp / entry.file_name, on_progress)
        linked += was_linked
        report = _place_report(entry, temp) if entry.report_path is not None else None
        architecture = _modelspec_architecture(temp / entry.file_name)
        outputs.append(BundledOutput(entry.target, entry.kind, file, entry.action_key, report, architecture))
    return tuple(outputs), linked


def _modelspec_architecture(path: Path) -> str | None:
    """The output's ModelSpec architecture (its family and whether it is a LoRA), for the card's Hub metadata."""
    from loraforge.formats.safetensors_reader import open_safetensors

    try:
        with open_safetensors(path) as reader:
            value = reader.metadata.get("modelspec.architecture")
    except (OSError, FormatError):
        return None
    return value if isinstance(value, str) and value else None


def _place_output(entry: IncludedOutput, destination: Path, on_progress) -> tuple[BundledFile, bool]:
    source = entry.path
    if not source.is_file():
        raise BuildError(f"The output of target '{entry.target}' ({source}) is missing, so release cannot bundle it; "
                         f"build the recipe again (loraforge build), which rebuilds it first.")
    sha256, data_sha256 = cached_file_hashes(source)
    if entry.sha256 is not None and sha256 != entry.sha256:
        raise BuildError(f"The output of target '{entry.target}' ({source}) changed after it was planned; "
                         "something else wrote it during the build. Run the build again.")
    # Outputs are multi-GB checkpoints: a hard link bundles one without copying a byte or
    # using disk space. Our writers replace files by rename and never write in place, so a
    # later rebuild of the output leaves the bundle's link with the old, matching bytes.
    # Links need one filesystem (and one that supports them); otherwise copy and check.
    try:
        os.link(source, destination)
        linked = True
        on_progress(source.stat().st_size)
    except OSError:
        copied = _copy(source, destination, on_progress)
        if copied != sha256:
            raise BuildError(f"The copy of {source} into the release has sha256 {copied}, not {sha256}; the file "
                             "changed while it was copied or the disk is failing. Run the build again.") from None
        linked = False
    return BundledFile(entry.file_name, destination.stat().st_size, sha256, data_sha256), linked


def _copy(source: Path, destination: Path, on_progress) -> str:
    """Copy chunk by chunk, hashing as it goes; returns the copy's sha256."""
    digest = hashlib.sha256()
    with open(source, "rb") as reader, open(destination, "wb") as writer:
        while chunk := reader.read(COPY_CHUNK):
            writer.write(chunk)
            digest.update(chunk)
            on_progress(len(chunk))
        writer.flush()
        os.fsync(writer.fileno())
    return digest.hexdigest()


def _place_report(entry: IncludedOutput, temp: Path) -> BundledFile:
    try:
        data = entry.report_path.read_bytes()
    except OSError:
        raise BuildError(f"The report {entry.report_path} of target '{entry.target}' is missing, so the release "
                         f"would lack it; rebuild that target: loraforge build --force RECIPE {entry.target}") from None
    return _write_file(temp, entry.report_path.name, data)


def _write_file(folder: Path, name: str, data: bytes) -> BundledFile:
    with open(folder / name, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return BundledFile(name, len(data), hashlib.sha256(data).hexdigest())


def _bundle_files(outputs, recipe_file, lock_file, readme) -> list[BundledFile]:
    files = [o.file for o in outputs] + [o.report for o in outputs if o.report is not None] + [recipe_file, lock_file]
    return files + ([readme] if readme is not None else [])


# --- the bundle's lock and input records ---------------------------------------------


def _bundle_lock(plan, target: ReleaseTarget, outputs: tuple[BundledOutput, ...], lock: Lock | None) -> Lock:
    """The recipe's lock cut down to the bundled targets and the inputs they read.

    A target's entry comes from the build's lock (``lock``) when it records exactly the
    bundled file (the build writes each entry as the target finishes, with
    what verify adds to it); otherwise the basic entry is made here. Input
    entries are made from this build's resolution alone, never merged with
    older ones, so the bytes do not depend on the lock's history. Output
    paths are the recipe's relative ones, never where this build wrote.
    """
    loaded = plan.loaded
    entries = {}
    for entry, output in zip(target.included, outputs):
        recorded = lock.targets.get(entry.target) if lock else None
        if not recorded or recorded.get("sha256") != output.file.sha256 or recorded.get("action_key") != entry.action_key:
            recorded = {
                "action_key": entry.action_key,
                "output": Path(os.path.normpath(loaded.recipe.default_output(entry.target))).as_posix(),
                "size": output.file.size,
                "sha256": output.file.sha256,
            }
            if output.file.data_sha256 is not None:
                recorded["data_sha256"] = output.file.data_sha256
        entries[entry.target] = dict(recorded)
    return Lock(
        inputs={name: input_entry(plan.inputs[name], None) for name in target.inputs},
        targets=dict(sorted(entries.items())),
        loraforge=__version__,
        numeric_policy=plan.kinds.numeric_policies(),
    )


def _input_record(plan, name: str) -> InputRecord:
    entry = input_entry(plan.inputs[name], None)
    return InputRecord(name, entry["source"], entry["resolved"], entry.get("size"), entry["sha256"], entry.get("data_sha256"))


# --- replacing the folder -------------------------------------------------------------


def _check_replaceable(folder: Path) -> None:
    """Only a loraforge bundle (or an empty folder) may be replaced: never a user's own files."""
    if not folder.exists() and not folder.is_symlink():
        return
    hint = "Move it away or choose another `output:` folder for the release."
    if folder.is_symlink() or not folder.is_dir():
        raise BuildError(f"The release folder {folder} exists and is not a folder. {hint}")
    if not any(folder.iterdir()):
        return
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise BuildError(f"The release folder {folder} already holds files but no loraforge {MANIFEST_NAME}; a "
                         f"release build replaces the whole folder, so it refuses to delete them. {hint}")


def _swap_in(temp: Path, folder: Path) -> None:
    """Rename the old bundle away, the new one in, then delete the old one.

    Between the two renames the final name is briefly absent, never half
    written. If anything (an error, Ctrl-C, SIGTERM) stops it before the
    second rename, the old bundle is put back; once past it, the old one is
    deleted even if a signal arrives meanwhile.
    """
    old = aside_name(folder)  # unpredictable: a link planted at a guessable name is never renamed onto
    try:
        if folder.exists():
            os.rename(folder, old)
        os.rename(temp, folder)
    finally:
        # Judged from the file system, not from flags: a signal can land between a rename and the next line.
        if temp.exists():
            if old.exists() and not folder.exists():
                os.rename(old, folder)
        else:
            _remove_tree(old)


def _remove_tree(path: Path) -> None:
    """Delete a folder completely, finishing even when Ctrl-C/SIGTERM interrupts; re-raise it after."""
    interrupt = None
    while True:
        try:
            shutil.rmtree(path, ignore_errors=True)
            break
        except KeyboardInterrupt as caught:
            interrupt = caught
    if interrupt is not None:
        raise interrupt
