"""The Hugging Face Hub side of a publish, through huggingface_hub's own API.

- :meth:`Hub.state`: what the branch holds now (its head commit, and every
  file's size, LFS sha256 or git blob id, from the Hub's tree listing);
- :func:`changes`: which bundle files differ from that (an LFS file by its
  sha256, a regular one by its git blob id), and which files an earlier
  loraforge publish put there that this bundle no longer has;
- :meth:`Hub.commit`: ``create_repo(exist_ok=True)``, the branch if it is new,
  then one ``create_commit`` with ``parent_commit`` = the head read before,
  so a branch that moved meanwhile is refused instead of overwritten. The
  library uploads large files through the Hub's large-file path (Xet, or
  LFS) before the commit; the commit itself is atomic on the Hub.
- :meth:`Hub.check_commit`: the files at the new commit must have the
  manifest's sha256 (the Hub computed them from what it received).

The token is the one huggingface_hub finds (``HF_TOKEN``, the cached login);
it is never printed, logged or recorded. ``HF_ENDPOINT`` selects another hub.
Every huggingface_hub or network exception becomes one :class:`PublishError`
paragraph that says what the remote holds afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loraforge import __version__
from loraforge.errors import PublishError
from loraforge.publish.bundle import Bundle, LocalFile
from loraforge.recipe.destination import DEFAULT_BRANCH, HubDestination
from loraforge.release.manifest import MANIFEST_FORMAT, MANIFEST_NAME
from loraforge.resolve.sources.hf import _is_transport_error, hf_endpoint

TOKEN_HINT = "Create a token with write access at https://huggingface.co/settings/tokens and set HF_TOKEN, or run `hf auth login`."


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    blob_id: str  # git object id (of the LFS pointer for LFS files)
    sha256: str | None  # LFS files: the content's sha256


@dataclass(frozen=True)
class RemoteState:
    exists: bool
    private: bool | None
    branch_exists: bool
    head: str | None  # the branch's commit; for a new branch, the commit it will start from (main's)
    files: dict[str, RemoteFile] = field(default_factory=dict)


@dataclass(frozen=True)
class Changes:
    upload: tuple[LocalFile, ...]
    unchanged: tuple[LocalFile, ...]
    delete: tuple[str, ...]  # files an earlier loraforge publish put there that this bundle no longer has

    @property
    def empty(self) -> bool:
        return not self.upload and not self.delete

    @property
    def upload_bytes(self) -> int:
        return sum(f.size for f in self.upload)


def token_present() -> bool:
    from huggingface_hub import get_token

    return bool(get_token())


class Hub:
    def __init__(self, destination: HubDestination):
        from huggingface_hub import HfApi

        from loraforge.resolve.sources.auth import token_allowed

        self.destination = destination
        self.endpoint = hf_endpoint()
        if not token_allowed(self.endpoint, self.endpoint):
            raise PublishError(f"HF_ENDPOINT is {self.endpoint}: plain http to a host other than this machine would "
                               "send the Hugging Face token in the clear, so loraforge does not publish there. Use an "
                               "https endpoint (or unset HF_ENDPOINT for huggingface.co).")
        self.api = HfApi(endpoint=self.endpoint, library_name="loraforge", library_version=__version__)

    @property
    def repo(self) -> str:
        return self.destination.repo

    @property
    def branch(self) -> str:
        return self.destination.revision

    def web_url(self, commit: str | None = None) -> str:
        base = f"{self.endpoint}/{self.repo}"
        return f"{base}/commit/{commit}" if commit else f"{base}/tree/{self.branch}"

    # --- reading ---------------------------------------------------------------------

    def state(self) -> RemoteState:
        from huggingface_hub import errors as hub

        with hub_errors(self, "reading the repository"):
            try:
                info = self.api.repo_info(self.repo, revision=self.branch)
                branch_exists = True
            except hub.RevisionNotFoundError:
                info = self.api.repo_info(self.repo, revision=DEFAULT_BRANCH)
                branch_exists = False
            except hub.RepositoryNotFoundError:
                return RemoteState(exists=False, private=None, branch_exists=False, head=None)
            head = info.sha
            files = {}
            for entry in self.api.list_repo_tree(self.repo, revision=head, recursive=True):
                if hasattr(entry, "blob_id"):  # a RepoFile, not a folder
                    lfs = getattr(entry, "lfs", None)
                    files[entry.path] = RemoteFile(entry.path, entry.size, entry.blob_id, lfs.sha256 if lfs else None)
        return RemoteState(True, bool(info.private), branch_exists, head, files)

    def previous_manifest(self, state: RemoteState) -> dict | None:
        """The loraforge manifest.json at the head, if the repository has one (for files to delete)."""
        import json

        if MANIFEST_NAME not in state.files:
            return None
        with hub_errors(self, "reading the published manifest.json"):
            path = self.api.hf_hub_download(self.repo, MANIFEST_NAME, revision=state.head)
        try:
            with open(path, encoding="utf-8") as handle:
                manifest = json.load(handle)
        except (OSError, ValueError):
            return None
        return manifest if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT else None

    # --- writing ---------------------------------------------------------------------

    def ensure_repository(self, private: bool) -> None:
        with hub_errors(self, "creating the repository"):
            self.api.create_repo(self.repo, repo_type="model", private=private or None, exist_ok=True)

    def ensure_branch(self, state: RemoteState) -> None:
        if state.branch_exists:
            return
        with hub_errors(self, f"creating the branch {self.branch}"):
            self.api.create_branch(self.repo, branch=self.branch, revision=state.head, exist_ok=True)

    def commit(self, bundle: Bundle, changes: Changes, state: RemoteState, message: str, description: str) -> str:
        """One commit on the branch with the changed files; returns its id."""
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        operations = [CommitOperationAdd(path_in_repo=f.name, path_or_fileobj=str(f.path)) for f in changes.upload]
        operations += [CommitOperationDelete(path_in_repo=name) for name in changes.delete]
        with hub_errors(self, "uploading the files and committing", parent=state.head):
            info = self.api.create_commit(
                self.repo, operations, commit_message=message, commit_description=description,
                revision=self.branch, parent_commit=state.head,
            )
        return info.oid

    def check_commit(self, bundle: Bundle, commit: str) -> list[str]:
        """Each bundle file as the Hub holds it at ``commit``: the differences (none when published intact)."""
        with hub_errors(self, "checking the new commit"):
            files = {e.path: e for e in self.api.list_repo_tree(self.repo, revision=commit, recursive=True)
                     if hasattr(e, "blob_id")}
        problems = []
        for local in bundle.files:
            remote = files.get(local.name)
            if remote is None:
                problems.append(f"{local.name} is missing")
            elif not same_file(local, RemoteFile(remote.path, remote.size, remote.blob_id, remote.lfs.sha256 if remote.lfs else None)):
                problems.append(f"{local.name} differs from the manifest")
        return problems

    def head_now(self) -> str | None:
        """The branch's head, read again (after a failure); None when it cannot be read."""
        try:
            return self.api.repo_info(self.repo, revision=self.branch).sha
        except Exception:  # noqa: BLE001 - only a best-effort statement in an error message
            return None


def same_file(local: LocalFile, remote: RemoteFile) -> bool:
    if remote.size != local.size:
        return False
    if remote.sha256 is not None:
        return remote.sha256 == local.sha256
    return remote.blob_id == local.git_blob_id()


def changes(bundle: Bundle, state: RemoteState, previous_manifest: dict | None) -> Changes:
    upload, unchanged = [], []
    for local in bundle.files:
        remote = state.files.get(local.name)
        (unchanged if remote is not None and same_file(local, remote) else upload).append(local)
    names = {f.name for f in bundle.files}
    delete = []
    if previous_manifest is not None:
        listed = [entry.get("file") for entry in previous_manifest.get("files") or [] if isinstance(entry, dict)]
        delete = sorted({n for n in listed if isinstance(n, str) and n not in names and n in state.files})
    return Changes(tuple(upload), tuple(unchanged), tuple(delete))


# --- errors ------------------------------------------------------------------------------


class hub_errors:
    """huggingface_hub and network exceptions as one PublishError paragraph.

    ``parent`` is the head the commit was based on: after a failure the head
    is read again, so the message says for certain whether the branch is as
    it was (the Hub's commits are atomic: all files or none).
    """

    def __init__(self, hub: Hub, stage: str, parent: str | None = None):
        self.hub, self.stage, self.parent = hub, stage, parent

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if error is None or isinstance(error, PublishError) or not isinstance(error, Exception):
            return False
        message = describe_hub_error(self.hub, self.stage, error)
        if message is None:
            return False
        if self.parent is not None or self.stage.startswith("uploading"):
            message += " " + self._remote_now()
        raise PublishError(message) from None

    def _remote_now(self) -> str:
        where = f"{self.hub.repo}@{self.hub.branch}"
        head = self.hub.head_now()
        if head is not None and head == self.parent:
            return (f"Nothing was published: {where} is still at commit {head[:12]}, as before (a Hub commit is all "
                    "files or none). Run the same command again; files the Hub already received are not sent twice.")
        if head is None:
            return (f"Nothing is reported as published. A Hub commit is all files or none, so {where} either has the "
                    "whole new commit or is as it was; run the same command again: it compares the remote files "
                    "first and makes no second commit when they are already there.")
        return (f"{where} is now at commit {head[:12]} (it was {str(self.parent)[:12]}): the commit may have gone "
                "through before the connection failed. Run the same command again: it compares the remote files "
                "first, makes no second commit when they are already there, and records the commit in the lock.")


def describe_hub_error(hub: Hub, stage: str, error: BaseException) -> str | None:
    from huggingface_hub import errors as hf

    repo, where = hub.repo, f"{hub.repo}@{hub.branch}"
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, hf.RevisionNotFoundError):
        return f"While {stage}: {where}: the branch {hub.branch} does not exist on {hub.endpoint}."
    if isinstance(error, (hf.RepositoryNotFoundError, hf.GatedRepoError)) and status != 403:
        return (f"While {stage}: the model repository {repo} does not exist on {hub.endpoint} or the token cannot see "
                f"it (a private repository of an organization you are not a member of looks the same). Check the "
                f"name after hf:// and the token's permissions. {TOKEN_HINT}")
    if isinstance(error, hf.HfHubHTTPError) and status is not None:
        server = _server_message(error)
        if status == 401:
            return (f"While {stage}: the Hub refused the token (HTTP 401): it is missing, invalid, expired or "
                    f"revoked{server}. {TOKEN_HINT}")
        if status == 403:
            return (f"While {stage}: the token has no write permission on {repo} (HTTP 403{server}). Use a token "
                    f"with the write role (or a fine-grained token that may write to {repo.split('/')[0]}'s "
                    "repositories), or ask an admin of that namespace for write access.")
        if status == 412:
            return (f"While {stage}: {where} received another commit since loraforge read it (HTTP 412), so this "
                    "commit was refused rather than overwriting it. Run the same command again.")
        return f"While {stage}: the Hub at {hub.endpoint} answered HTTP {status}{server}."
    if _is_transport_error(error) or isinstance(error, (OSError, ValueError)):
        detail = str(error).splitlines()[0] if str(error) else ""
        return (f"While {stage}: the connection to {hub.endpoint} failed ({type(error).__name__}"
                f"{': ' + detail[:200] if detail else ''}). Check the network.")
    return None


def _server_message(error) -> str:
    message = (getattr(error, "server_message", None) or "").strip().splitlines()
    return f": {message[0][:200]}" if message else ""
