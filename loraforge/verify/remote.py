"""`loraforge verify --remote hf://ORG/REPO[@REVISION]`: is what the Hub holds the release this recipe's lock records?

The lock records the release's manifest.json by sha256 (its target entry),
and the manifest lists every file of the bundle with its size and sha256 and
every output with the sha256 the build wrote. So the published copy is the
recipe's build when:

1. the remote manifest.json has the sha256 the lock records for the release;
2. every file the manifest lists is on the remote with that size and sha256;
3. every output the manifest lists has the sha256 of the lock's entry for
   that target (a bundle made from this very build, not an older one).

Files are downloaded at one commit (the revision given, resolved once by
resolve/sources/hf.py, so a branch moving meanwhile cannot mix two commits)
and hashed here; nothing is written outside huggingface_hub's own cache.
Files on the remote that the manifest does not list are reported, not
failed (a .gitattributes, say). ``loraforge verify RECIPE`` proves the lock
is what the recipe builds; this proves the Hub holds what the lock records.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from loraforge.errors import ResolveError
from loraforge.formats.hashing import file_sha256
from loraforge.recipe.destination import HUB_ADDRESS
from loraforge.recipe.loader import load_recipe
from loraforge.recipe.sources import SourceRef
from loraforge.resolve.lockfile import lock_path, read_lock
from loraforge.resolve.sources.hf import HfSource, hf_endpoint, hub_token

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class FileVerdict:
    file: str
    ok: bool
    reason: str  # "identical", or what differs


@dataclass
class RemoteReport:
    recipe: Path
    remote: str  # hf://org/repo@commit
    release: str
    files: list[FileVerdict] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)  # remote files the manifest does not list

    @property
    def ok(self) -> bool:
        return bool(self.files) and all(f.ok for f in self.files)

    def to_json(self) -> dict:
        return {
            "recipe": str(self.recipe), "remote": self.remote, "release": self.release, "ok": self.ok,
            "files": [{"file": f.file, "ok": f.ok, "reason": f.reason} for f in self.files],
            "unlisted": list(self.unlisted),
        }

    def lines(self) -> list[str]:
        lines = [f"{'identical' if f.ok else 'DIFFERS':<10} {f.file}" + ("" if f.ok else f"  ({f.reason})") for f in self.files]
        lines += [f"note: {name} is on the remote but not in the manifest" for name in self.unlisted]
        verdict = "OK" if self.ok else "FAILED"
        bad = sum(not f.ok for f in self.files)
        lines.append(f"{verdict}: {self.remote} holds release '{self.release}' as the lock records it" if self.ok
                     else f"{verdict}: {bad} of {len(self.files)} files of release '{self.release}' at {self.remote} "
                          "are not what the lock records")
        return lines


def verify_remote(recipe: str | Path, remote: str, release: str | None = None) -> RemoteReport:
    loaded = load_recipe(recipe)
    repo, revision = _parse_remote(remote)
    name = _release_name(loaded, release)
    lock = read_lock(lock_path(loaded.path))
    entry = (lock.targets.get(name) if lock else None) or {}
    if "sha256" not in entry:
        raise ResolveError(
            f"{lock_path(loaded.path)} records no build of release '{name}', so there is nothing to compare "
            f"{remote} with. Build it (`loraforge build {loaded.path} {name}`) or use the lock it was published from."
        )
    commit = _commit(repo, revision)
    report = RemoteReport(loaded.path, f"hf://{repo}@{commit}", name)
    manifest_path, manifest_sha = _download(repo, commit, MANIFEST)
    if manifest_path is None or manifest_sha != entry["sha256"]:
        found = "is missing" if manifest_path is None else f"has sha256 {manifest_sha}"
        report.files.append(FileVerdict(MANIFEST, False, f"{found}; the lock records {entry['sha256']}"))
        return report
    report.files.append(FileVerdict(MANIFEST, True, "identical"))
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    outputs = {o["file"]: o for o in manifest.get("outputs", [])}
    for listed in manifest.get("files", []):
        report.files.append(_file_verdict(repo, commit, listed, outputs.get(listed["file"]), lock.targets))
    listed_names = {MANIFEST, *(f["file"] for f in manifest.get("files", []))}
    report.unlisted = sorted(set(_remote_files(repo, commit)) - listed_names)
    return report


def _parse_remote(remote: str) -> tuple[str, str]:
    match = HUB_ADDRESS.fullmatch(remote.strip())
    if match is None:
        raise ResolveError(
            f"--remote {remote!r} is not a Hub model repository address: write hf://ORG/REPO@REVISION, where "
            "REVISION is the published commit (the lock's `published` section records it) or a branch."
        )
    return match["repo"], match["revision"] or "main"


def _release_name(loaded, release: str | None) -> str:
    releases = [n for n, t in loaded.recipe.targets.items() if t.produces == "bundle"]
    if release is not None:
        if release not in releases:
            raise ResolveError(
                f"{loaded.path}: '{release}' is not a release target; the recipe's releases: {', '.join(releases) or '(none)'}."
            )
        return release
    if len(releases) == 1:
        return releases[0]
    raise ResolveError(
        f"{loaded.path} has {'no release target' if not releases else 'several release targets'} ({', '.join(releases) or '-'}): "
        "name the one that was published, e.g. `loraforge verify RECIPE RELEASE --remote hf://ORG/REPO@COMMIT`."
    )


def _commit(repo: str, revision: str) -> str:
    """The commit ``revision`` is now, through the resolver (one paragraph on a missing repo or revision)."""
    ref = SourceRef(raw=f"hf://{repo}@{revision}/{MANIFEST}", scheme="hf", repo=repo, revision=revision, path=MANIFEST)
    try:
        return HfSource().resolve("remote", ref, None).location["commit"]
    except ResolveError as error:
        raise ResolveError(f"--remote hf://{repo}@{revision}: {error}") from None


def _download(repo: str, commit: str, path: str) -> tuple[Path | None, str | None]:
    """(local copy, sha256) of ``path`` at ``commit``; (None, None) when the remote has no such file."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        local = Path(hf_hub_download(repo, path, revision=commit, endpoint=hf_endpoint(), token=hub_token()))
    except EntryNotFoundError:
        return None, None
    except Exception as error:  # noqa: BLE001  (one paragraph whatever the transport says)
        raise ResolveError(
            f"--remote hf://{repo}@{commit}: downloading {path} failed ({type(error).__name__}: {error}). "
            "Check the network and HF_ENDPOINT / HF_TOKEN, then run verify again."
        ) from None
    return local, file_sha256(local)


def _file_verdict(repo: str, commit: str, listed: dict, output: dict | None, locked: dict) -> FileVerdict:
    name = listed["file"]
    local, sha = _download(repo, commit, name)
    if local is None:
        return FileVerdict(name, False, "missing on the remote")
    size = local.stat().st_size
    if sha != listed["sha256"] or size != listed["size"]:
        return FileVerdict(name, False, f"sha256 {sha} ({size:,} bytes); the manifest lists {listed['sha256']} ({listed['size']:,} bytes)")
    if output is not None:
        entry = locked.get(output["target"]) or {}
        if entry.get("sha256") != sha:
            return FileVerdict(name, False, f"output of target '{output['target']}' has sha256 {sha}; the lock records "
                                            f"{entry.get('sha256') or 'no build of it'}")
    return FileVerdict(name, True, "identical")


def _remote_files(repo: str, commit: str) -> list[str]:
    from huggingface_hub import HfApi

    try:
        return HfApi(endpoint=hf_endpoint(), token=hub_token()).list_repo_files(repo, revision=commit)
    except Exception:  # noqa: BLE001  (the listing only adds notes)
        return []
