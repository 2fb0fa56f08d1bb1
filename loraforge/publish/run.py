"""Publishing a built bundle: compare with the remote, commit what differs, check, record.

Idempotent: the remote files' sha256 (LFS) or git blob ids (regular files)
from the Hub's tree listing are compared with the bundle first; when every
file is already there, no commit is made and the commit that holds them is
recorded. Nothing is reported as published unless the Hub's new commit holds
every bundle file with the manifest's hashes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loraforge import __version__
from loraforge.errors import PublishError
from loraforge.publish.bundle import Bundle
from loraforge.publish.hub import TOKEN_HINT, Changes, Hub, RemoteState, changes, token_present
from loraforge.publish.record import record_publication
from loraforge.recipe.destination import HubDestination


@dataclass(frozen=True)
class PublishResult:
    release: str
    destination: HubDestination
    url: str  # the repository (or commit) page
    changes: Changes
    commit: str | None  # the commit that holds the bundle (None: dry run against a repository not created yet)
    committed: bool  # a new commit was made
    created: bool  # the repository was created
    dry_run: bool
    lock: Path | None  # the lock the publication was recorded in


def publish_bundle(
    bundle: Bundle,
    destination: HubDestination,
    *,
    recipe_path: Path,
    recipe_name: str,
    private: bool = False,
    message: str | None = None,
    dry_run: bool = False,
) -> PublishResult:
    if not dry_run and not token_present():
        raise PublishError(f"No Hugging Face token found, so nothing can be uploaded to {destination.repo}. {TOKEN_HINT} "
                           "(The token is read by huggingface_hub and never printed or recorded by loraforge.)")
    hub = Hub(destination)
    state = hub.state()
    _check_visibility(destination, state, private)
    diff = _changes(hub, bundle, state)
    if dry_run:
        return PublishResult(bundle.release, destination, hub.web_url(), diff, state.head if state.branch_exists else None,
                             False, False, True, None)
    created = False
    if not state.exists:
        hub.ensure_repository(private)
        created = True
        state = hub.state()
        diff = _changes(hub, bundle, state)
    hub.ensure_branch(state)
    if diff.empty:
        commit, committed = state.head, False  # already there: no second commit
    else:
        commit = hub.commit(bundle, diff, state, message or _message(bundle), _description(bundle, recipe_name))
        committed = True
    problems = hub.check_commit(bundle, commit)
    if problems:
        raise PublishError(
            f"Commit {commit} on {destination.repo}@{destination.revision} does not hold the bundle as built: "
            f"{'; '.join(problems[:5])}. A bundle file changed while it was uploaded. The lock does not record this "
            "commit; rebuild (loraforge build) and publish again, which commits the right files on top of it."
        )
    lock = record_publication(recipe_path, bundle.release, destination, commit, bundle.manifest_sha256, hub.endpoint)
    return PublishResult(bundle.release, destination, hub.web_url(commit if committed else None), diff, commit,
                         committed, created, False, lock)


def _changes(hub: Hub, bundle: Bundle, state: RemoteState) -> Changes:
    diff = changes(bundle, state, None)
    if state.exists and any(f.name == "manifest.json" for f in diff.upload):
        diff = changes(bundle, state, hub.previous_manifest(state))  # files of the earlier release to delete
    return diff


def _check_visibility(destination: HubDestination, state: RemoteState, private: bool) -> None:
    if private and state.exists and state.private is False:
        raise PublishError(
            f"{destination.repo} exists and is public, but the release is to be published privately (--private or "
            "`publish: {private: true}`). Nothing was uploaded. Make the repository private in its settings on the "
            "Hub, publish to another repository, or drop the private setting."
        )


def _message(bundle: Bundle) -> str:
    return f"Publish {bundle.release} with loraforge {__version__}"


def _description(bundle: Bundle, recipe_name: str) -> str:
    return (f"Release `{bundle.release}` of recipe `{recipe_name}`, built by loraforge {__version__}. "
            f"manifest.json (sha256 {bundle.manifest_sha256}) lists every file's sha256; the recipe and its lock "
            "in this commit rebuild them byte for byte.")
