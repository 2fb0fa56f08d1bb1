"""A small Hugging Face Hub on 127.0.0.1 for publishing tests: real HTTP, real huggingface_hub client.

It keeps model repositories as git would: branches pointing at commits, each
commit a full tree of files, regular files stored by content (git blob ids)
and large files in an LFS store by sha256. It serves the endpoints
huggingface_hub calls to create a repository and commit to it (the LFS path:
tests set ``HF_HUB_DISABLE_XET=1``, since Xet storage is a separate service)
and to read it back:

* ``POST /api/repos/create``; ``POST /api/models/{repo}/branch/{branch}``
* ``GET /api/models/{repo}[/revision/{rev}]`` (repo_info), ``GET /api/models/{repo}/tree/{rev}`` (list_repo_tree)
* ``POST /api/validate-yaml``; ``POST /api/models/{repo}/preupload/{rev}``
* ``POST /{repo}.git/info/lfs/objects/batch``, ``PUT /lfs/upload/{oid}``, ``POST /lfs/verify``
* ``POST /api/models/{repo}/commit/{rev}`` (ndjson; atomic: all operations or none; honours parentCommit)
* ``HEAD/GET /{repo}/resolve/{rev}/{path}`` (hf_hub_download)

Tokens are ``Authorization: Bearer <token>`` mapped to a user and a role
(``read`` or ``write``) by :meth:`FakeHub.add_token`. Every request is
logged (method, path, status, whether it carried a token; never the token)
and faults can be queued per method and path: an HTTP status, or ``"drop"``
(the connection is closed without an answer, as a network failure would).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub's: larger files always go to LFS
LFS_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".gguf")  # its default .gitattributes
GITATTRIBUTES = b"".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n".encode() for suffix in LFS_SUFFIXES)


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class StoredFile:
    size: int
    data: bytes | None = None  # regular file
    lfs_sha256: str | None = None  # LFS file: content in FakeHub.lfs

    @property
    def oid(self) -> str:
        if self.lfs_sha256 is None:
            return git_blob_id(self.data)
        return git_blob_id(lfs_pointer(self.lfs_sha256, self.size))


@dataclass
class Commit:
    oid: str
    parent: str | None
    summary: str
    description: str
    files: dict[str, StoredFile]


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    status: int
    authorized: bool  # carried a token (the token itself is never logged)


_REPO = r"(?P<repo>[^/]+/[^/]+)"


class FakeHub:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.commits: dict[str, Commit] = {}
        self.lfs: dict[str, bytes] = {}
        self.tokens: dict[str, tuple[str, str]] = {}  # token -> (user, role)
        self.log: list[Request] = []
        self.faults: list[tuple[str, re.Pattern, object]] = []
        self.validated_yaml: list[str] = []
        self._lock = threading.RLock()
        self._counter = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # --- lifecycle and setup -------------------------------------------------------

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "FakeHub":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_token(self, token: str, user: str, role: str = "write") -> None:
        self.tokens[token] = (user, role)

    def fail(self, method: str, path_pattern: str, action, times: int = 1) -> None:
        """Answer the next ``times`` requests matching with ``action``: an HTTP status or "drop"."""
        for _ in range(times):
            self.faults.append((method, re.compile(path_pattern), action))

    def create_repo(self, repo_id: str, private: bool = False, files: dict[str, bytes] | None = None) -> str:
        """A repository as the Hub creates one (a first commit with .gitattributes), plus ``files``."""
        with self._lock:
            self.repos[repo_id] = Repo(repo_id, private)
            tree = {".gitattributes": StoredFile(len(GITATTRIBUTES), data=GITATTRIBUTES)}
            for path, data in (files or {}).items():
                tree[path] = self._store(path, data)
            oid = self._commit(None, "initial commit", "", tree)
            self.repos[repo_id].branches["main"] = oid
            return oid

    # --- reading state (for assertions) --------------------------------------------

    def head(self, repo_id: str, branch: str = "main") -> str:
        return self.repos[repo_id].branches[branch]

    def files_at(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        commit = self.commits[self._resolve(self.repos[repo_id], revision)]
        return {path: self._content(stored) for path, stored in commit.files.items()}

    def commit_count(self, repo_id: str, branch: str = "main") -> int:
        count, oid = 0, self.repos[repo_id].branches[branch]
        while oid is not None:
            count, oid = count + 1, self.commits[oid].parent
        return count

    def requests(self, method: str | None = None, pattern: str = "") -> list[Request]:
        with self._lock:
            return [r for r in self.log if (method is None or r.method == method) and re.search(pattern, r.path)]

    # --- internals ---------------------------------------------------------------

    def _store(self, path: str, data: bytes) -> StoredFile:
        if path.endswith(LFS_SUFFIXES) or len(data) > LFS_THRESHOLD:
            sha = hashlib.sha256(data).hexdigest()
            self.lfs[sha] = data
            return StoredFile(len(data), lfs_sha256=sha)
        return StoredFile(len(data), data=data)

    def _content(self, stored: StoredFile) -> bytes:
        return stored.data if stored.lfs_sha256 is None else self.lfs[stored.lfs_sha256]

    def _commit(self, parent: str | None, summary: str, description: str, files: dict[str, StoredFile]) -> str:
        self._counter += 1
        oid = hashlib.sha1(f"{self._counter}:{parent}:{summary}".encode()).hexdigest()
        self.commits[oid] = Commit(oid, parent, summary, description, dict(files))
        return oid

    def _resolve(self, repo: Repo, revision: str) -> str | None:
        revision = unquote(revision)
        if revision in repo.branches:
            return repo.branches[revision]
        return revision if revision in self.commits else None


class _Answer(Exception):
    def __init__(self, status: int, body=None, error_code: str | None = None, headers: dict | None = None):
        self.status, self.body, self.error_code, self.headers = status, body, error_code, headers or {}


def _make_handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            self._dispatch()

        def do_HEAD(self):
            self._dispatch()

        def do_POST(self):
            self._dispatch()

        def do_PUT(self):
            self._dispatch()

        # --- plumbing ------------------------------------------------------------

        def _dispatch(self):
            split = urlsplit(self.path)
            path, query = unquote(split.path), parse_qs(split.query)
            body = self._body()
            for index, (method, pattern, action) in enumerate(list(hub.faults)):
                if method == self.command and pattern.search(path):
                    with hub._lock:
                        hub.faults.pop(index)
                    if action == "drop":
                        self._log(path, 0)
                        self.close_connection = True
                        try:
                            self.connection.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                        return
                    return self._answer(path, _Answer(int(action), {"error": f"injected HTTP {action}"}))
            try:
                with hub._lock:
                    result = self._route(path, query, body)
            except _Answer as answer:
                return self._answer(path, answer)
            self._answer(path, result if isinstance(result, _Answer) else _Answer(200, result))

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                data = b""
                while True:
                    size = int(self.rfile.readline().strip().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        return data
                    data += self.rfile.read(size)
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _log(self, path: str, status: int):
            with hub._lock:
                hub.log.append(Request(self.command, path, status, bool(self.headers.get("Authorization"))))

        def _answer(self, path: str, answer: _Answer):
            self._log(path, answer.status)
            body = answer.body
            if isinstance(body, bytes):
                payload, kind = body, "application/octet-stream"
            else:
                payload, kind = json.dumps(body if body is not None else {}).encode(), "application/json"
            self.send_response(answer.status)
            self.send_header("Content-Type", kind)
            if answer.error_code:
                self.send_header("X-Error-Code", answer.error_code)
            for key, value in answer.headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        # --- auth ------------------------------------------------------------------

        def _user(self) -> tuple[str, str] | None:
            header = self.headers.get("Authorization") or ""
            token = header[len("Bearer "):] if header.startswith("Bearer ") else None
            if token is None:
                return None
            if token not in hub.tokens:
                raise _Answer(401, {"error": "Invalid credentials in Authorization header"})
            return hub.tokens[token]

        def _can_write(self, namespace: str) -> None:
            user = self._user()
            if user is None:
                raise _Answer(401, {"error": "You must be authenticated to do this"})
            name, role = user
            if role != "write" or namespace not in (name, "acme"):  # the test user is a member of acme
                raise _Answer(403, {"error": "You don't have the rights to write to this repository"})

        def _repo(self, repo_id: str, writing: bool = False) -> Repo:
            repo = hub.repos.get(repo_id)
            if repo is None or (repo.private and self._user() is None):
                raise _Answer(404, {"error": "Repository not found"}, "RepoNotFound")
            if writing:
                self._can_write(repo_id.split("/")[0])
            return repo

        def _revision(self, repo: Repo, revision: str) -> str:
            oid = hub._resolve(repo, revision)
            if oid is None:
                raise _Answer(404, {"error": f"Invalid rev id: {revision}"}, "RevisionNotFound")
            return oid

        # --- routes ----------------------------------------------------------------

        def _route(self, path: str, query: dict, body: bytes):
            method = self.command
            if method == "POST" and path == "/api/repos/create":
                return self._create_repo(json.loads(body))
            if method == "POST" and path == "/api/validate-yaml":
                return self._validate_yaml(json.loads(body))
            if method == "PUT" and (m := re.fullmatch(r"/lfs/upload/(?P<oid>[0-9a-f]{64})", path)):
                return self._lfs_put(m["oid"], body)
            if method == "POST" and path == "/lfs/verify":
                request = json.loads(body)
                if request.get("oid") not in hub.lfs:
                    raise _Answer(404, {"error": "object not found"})
                return {}
            if method == "POST" and (m := re.fullmatch(rf"/{_REPO}\.git/info/lfs/objects/batch", path)):
                return self._lfs_batch(m["repo"], json.loads(body))
            if m := re.fullmatch(rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?", path):
                if method == "GET":
                    return self._info(m["repo"], m["rev"] or "main")
            if method == "GET" and (m := re.fullmatch(rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?", path)):
                return self._tree(m["repo"], m["rev"], m["sub"] or "", query)
            if method == "POST" and (m := re.fullmatch(rf"/api/models/{_REPO}/preupload/(?P<rev>.+)", path)):
                return self._preupload(m["repo"], m["rev"], json.loads(body))
            if method == "POST" and (m := re.fullmatch(rf"/api/models/{_REPO}/commit/(?P<rev>.+)", path)):
                return self._commit(m["repo"], m["rev"], body)
            if method == "POST" and (m := re.fullmatch(rf"/api/models/{_REPO}/branch/(?P<branch>.+)", path)):
                return self._branch(m["repo"], m["branch"], json.loads(body or b"{}"))
            if method in ("GET", "HEAD") and (m := re.fullmatch(rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path)):
                return self._resolve_file(m["repo"], m["rev"], m["file"])
            raise _Answer(404, {"error": f"no route {method} {path}"})

        def _create_repo(self, request: dict):
            repo_id = f"{request.get('organization')}/{request['name']}"
            self._can_write(request.get("organization"))
            kind = request.get("type") or "model"
            if kind != "model":
                raise _Answer(400, {"error": "this test hub holds model repositories only"})
            if repo_id in hub.repos:
                raise _Answer(409, {"error": "You already created this model repo", "url": f"{hub.base}/{repo_id}"})
            hub.create_repo(repo_id, private=request.get("visibility") == "private" or bool(request.get("private")))
            return {"url": f"{hub.base}/{repo_id}", "name": repo_id}

        def _validate_yaml(self, request: dict):
            content = request.get("content", "")
            hub.validated_yaml.append(content)
            match = re.match(r"---\n(.*?)\n---\n", content, re.S)
            if match is None:
                return {"errors": [], "warnings": [{"message": "empty or missing yaml metadata in repo card"}]}
            try:
                data = yaml.safe_load(match[1])
            except yaml.YAMLError as error:
                raise _Answer(400, {"error": f"Invalid YAML in README.md: {error}"})
            if not isinstance(data, dict):
                raise _Answer(400, {"error": "README.md metadata must be a mapping"})
            return {"errors": [], "warnings": []}

        def _info(self, repo_id: str, revision: str):
            repo = self._repo(repo_id)
            oid = self._revision(repo, revision)
            files = hub.commits[oid].files
            return {"id": repo_id, "modelId": repo_id, "sha": oid, "private": repo.private,
                    "siblings": [{"rfilename": p} for p in sorted(files)]}

        def _tree(self, repo_id: str, revision: str, sub: str, query: dict):
            repo = self._repo(repo_id)
            files = hub.commits[self._revision(repo, revision)].files
            recursive = (query.get("recursive") or ["false"])[0].lower() == "true"
            prefix = sub.strip("/") + "/" if sub else ""
            entries, folders = [], set()
            for path in sorted(files):
                if not path.startswith(prefix):
                    continue
                rest = path[len(prefix):]
                if "/" in rest and not recursive:
                    folders.add(prefix + rest.split("/", 1)[0])
                    continue
                stored = files[path]
                entry = {"type": "file", "path": path, "size": stored.size, "oid": stored.oid}
                if stored.lfs_sha256 is not None:
                    pointer = lfs_pointer(stored.lfs_sha256, stored.size)
                    entry["lfs"] = {"oid": stored.lfs_sha256, "size": stored.size, "pointerSize": len(pointer)}
                entries.append(entry)
            entries += [{"type": "directory", "path": folder, "oid": "0" * 40} for folder in sorted(folders)]
            return entries

        def _preupload(self, repo_id: str, revision: str, request: dict):
            repo = self._repo(repo_id, writing=True)
            files = hub.commits[self._revision(repo, revision)].files
            answer = []
            for item in request["files"]:
                path, size = item["path"], item["size"]
                lfs = path.endswith(LFS_SUFFIXES) or size > LFS_THRESHOLD
                stored = files.get(path)
                oid = None
                if stored is not None:
                    oid = stored.lfs_sha256 if lfs and stored.lfs_sha256 else (git_blob_id(stored.data) if stored.data is not None else None)
                answer.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
            return {"files": answer}

        def _lfs_batch(self, repo_id: str, request: dict):
            self._repo(repo_id, writing=True)
            objects = []
            for item in request["objects"]:
                oid, size = item["oid"], item["size"]
                entry = {"oid": oid, "size": size, "authenticated": True}
                if oid not in hub.lfs:
                    entry["actions"] = {
                        "upload": {"href": f"{hub.base}/lfs/upload/{oid}"},
                        "verify": {"href": f"{hub.base}/lfs/verify"},
                    }
                objects.append(entry)
            return {"transfer": "basic", "objects": objects}

        def _lfs_put(self, oid: str, body: bytes):
            if hashlib.sha256(body).hexdigest() != oid:
                raise _Answer(400, {"error": "sha256 of the uploaded content does not match the object id"})
            hub.lfs[oid] = body
            return {}

        def _commit(self, repo_id: str, revision: str, body: bytes):
            repo = self._repo(repo_id, writing=True)
            branch = unquote(revision)
            if branch not in repo.branches:
                raise _Answer(404, {"error": f"Invalid rev id: {branch}"}, "RevisionNotFound")
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            header = lines[0]["value"] if lines and lines[0].get("key") == "header" else {}
            head = repo.branches[branch]
            parent = header.get("parentCommit")
            if parent is not None and parent != head:
                raise _Answer(412, {"error": "A commit has happened since. Please refresh and try again."})
            files = dict(hub.commits[head].files)
            for line in lines[1:]:  # applied to a copy: an error leaves the branch as it was
                key, value = line["key"], line["value"]
                if key == "file":
                    files[value["path"]] = hub._store(value["path"], base64.b64decode(value["content"]))
                elif key == "lfsFile":
                    if value["oid"] not in hub.lfs:
                        raise _Answer(422, {"error": f"LFS object {value['oid']} was never uploaded"})
                    files[value["path"]] = StoredFile(len(hub.lfs[value["oid"]]), lfs_sha256=value["oid"])
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        raise _Answer(404, {"error": f"file {value['path']} does not exist"}, "EntryNotFound")
                else:
                    raise _Answer(400, {"error": f"unknown operation {key}"})
            oid = hub._commit(head, header.get("summary", ""), header.get("description", ""), files)
            repo.branches[branch] = oid
            return {"commitUrl": f"{hub.base}/{repo_id}/commit/{oid}", "commitOid": oid, "success": True}

        def _branch(self, repo_id: str, branch: str, request: dict):
            repo = self._repo(repo_id, writing=True)
            if branch in repo.branches:
                raise _Answer(409, {"error": "Reference already exists"})
            repo.branches[branch] = self._revision(repo, request.get("startingPoint") or "main")
            return {}

        def _resolve_file(self, repo_id: str, revision: str, file: str):
            repo = self._repo(repo_id)
            oid = self._revision(repo, revision)
            stored = hub.commits[oid].files.get(file)
            if stored is None:
                raise _Answer(404, {"error": "Entry not found"}, "EntryNotFound", {"X-Repo-Commit": oid})
            headers = {"X-Repo-Commit": oid, "Accept-Ranges": "none"}
            if stored.lfs_sha256 is not None:
                headers.update({"ETag": f'"{stored.lfs_sha256}"', "X-Linked-Etag": f'"{stored.lfs_sha256}"',
                                "X-Linked-Size": str(stored.size)})
            else:
                headers["ETag"] = f'"{stored.oid}"'
            return _Answer(200, hub._content(stored), headers=headers)

    return Handler
