"""A real HTTP server on 127.0.0.1 for download tests (no mocks of the HTTP layer).

Routes map a path (query ignored) to a :class:`Blob` (a file, with optional
misbehaviour: dropped connections, ignored Range, delays, a required token),
a :class:`Redirect`, a bare status code, or a JSON-able value. Every request
is logged with its Range header and the body bytes actually sent, so tests
can assert what a resumed download fetched. ``add_hf_file`` and
``add_civitai_version`` lay out Hugging-Face- and Civitai-shaped endpoints.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


@dataclass
class Blob:
    data: bytes
    etag: str | None = None  # strong validator; default: quoted sha256
    drop_after: int | None = None  # close the connection after this many body bytes ...
    drops: int = 0  # ... on this many GET responses
    ignore_range: bool = False  # always answer 200 with the whole file
    delay: float = 0.0  # seconds to wait before the headers
    chunk_delay: float = 0.0  # seconds between body chunks of 64 KiB
    require_token: str | None = None  # answer 401 unless "Authorization: Bearer <token>"
    headers: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.etag is None:
            self.etag = '"' + hashlib.sha256(self.data).hexdigest() + '"'


@dataclass
class Redirect:
    location: str
    status: int = 302


@dataclass(frozen=True)
class Logged:
    method: str
    path: str
    range: str | None
    authorization: str | None
    status: int
    body_bytes: int


_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


class LocalServer:
    def __init__(self):
        self.routes: dict[str, object] = {}
        self.tokens: dict[str, str] = {}  # path -> Bearer token it requires
        self.log: list[Logged] = []
        self._lock = threading.Lock()
        handler = _make_handler(self)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base + path

    def start(self) -> "LocalServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def requests(self, path: str, method: str = "GET") -> list[Logged]:
        with self._lock:
            return [r for r in self.log if r.path == path and r.method == method]

    def record(self, entry: Logged) -> None:
        with self._lock:
            self.log.append(entry)

    # --- hub-shaped layouts ----------------------------------------------------

    def add_hf_file(self, repo: str, revision: str, commit: str, path: str, data: bytes, lfs_sha256: str | None = None) -> None:
        """``/{repo}/resolve/{revision}/{path}`` as the Hub serves an LFS file (sha256 as its etag)."""
        sha = lfs_sha256 or hashlib.sha256(data).hexdigest()
        headers = {"X-Repo-Commit": commit, "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data))}
        for rev in (revision, commit):
            self.routes[f"/{repo}/resolve/{rev}/{path}"] = Blob(data, etag=f'"{sha}"', headers=headers)

    def add_civitai_version(self, version: int, model: int, files: list[tuple[int, str, bytes, bool]], token: str | None = None) -> None:
        """``/api/v1/model-versions/{version}`` and the download routes of its files.

        ``files`` are (file id, name, bytes, primary). Downloads redirect to a
        signed-looking storage URL, as Civitai does.
        """
        listed = []
        for file_id, name, data, primary in files:
            sha = hashlib.sha256(data).hexdigest()
            download = f"/api/download/models/{version}" if primary else f"/api/download/files/{file_id}"
            storage = f"/storage/{sha}"
            # "localhost": another origin than 127.0.0.1, like Civitai's storage host.
            storage_host = self.base.replace("127.0.0.1", "localhost")
            self.routes[download] = Redirect(f"{storage_host}{storage}?X-Amz-Signature=signed{file_id}&X-Amz-Expires=3600", 307)
            self.routes[storage] = Blob(data)
            if token is not None:
                self.tokens[download] = token
            listed.append({
                "id": file_id, "name": name, "primary": primary, "sizeKB": len(data) / 1024,
                "hashes": {"SHA256": sha.upper(), "AutoV2": sha[:10].upper()},
                "downloadUrl": self.base + download,
            })
        api = f"/api/v1/model-versions/{version}"
        self.routes[api] = {"id": version, "modelId": model, "files": listed}
        self.routes[f"/api/v1/models/{model}"] = {"id": model, "modelVersions": [{"id": version}]}
        if token is not None:
            self.tokens[api] = token


def _make_handler(server: LocalServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output clean
            pass

        def do_HEAD(self):
            self._serve(head=True)

        def do_GET(self):
            self._serve(head=False)

        def _serve(self, head: bool):
            path = urlsplit(self.path).path
            route = server.routes.get(path)
            auth = self.headers.get("Authorization")
            wanted = server.tokens.get(path)
            if isinstance(route, Blob) and route.require_token:
                wanted = route.require_token
            if wanted is not None and auth != f"Bearer {wanted}":
                return self._status(path, head, 401, auth)
            if route is None:
                return self._status(path, head, 404, auth)
            if isinstance(route, int):
                return self._status(path, head, route, auth)
            if isinstance(route, Redirect):
                server.record(Logged(self.command, path, self.headers.get("Range"), auth, route.status, 0))
                self.send_response(route.status)
                self.send_header("Location", route.location)
                self.send_header("Content-Length", "0")
                return self.end_headers()
            if isinstance(route, Blob):
                return self._blob(path, route, head, auth)
            body = json.dumps(route).encode()
            self._send(path, head, 200, body, {"Content-Type": "application/json"}, auth)

        def _status(self, path, head, code, auth):
            self._send(path, head, code, f"status {code}".encode(), {"Content-Type": "text/plain"}, auth)

        def _send(self, path, head, code, body, headers, auth):
            # Logged before anything goes out: the client may act on the answer before we return.
            server.record(Logged(self.command, path, self.headers.get("Range"), auth, code, 0 if head else len(body)))
            self.send_response(code)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _blob(self, path, blob: Blob, head: bool, auth):
            if blob.delay:
                time.sleep(blob.delay)
            data, start, status = blob.data, 0, 200
            requested = self.headers.get("Range")
            if_range = self.headers.get("If-Range")
            match = _RANGE.fullmatch(requested or "")
            if match and not blob.ignore_range and (if_range is None or if_range == blob.etag):
                start = int(match[1])
                if start >= len(data):
                    server.record(Logged(self.command, path, requested, auth, 416, 0))
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                status = 206
            body = data[start:]
            limit = 0 if head else len(body)
            dropping = not head and blob.drops > 0 and blob.drop_after is not None
            if dropping:
                blob.drops -= 1
                limit = min(limit, blob.drop_after)
            server.record(Logged(self.command, path, requested, auth, status, limit))
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("ETag", blob.etag)
            self.send_header("Accept-Ranges", "none" if blob.ignore_range else "bytes")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            for key, value in blob.headers.items():
                self.send_header(key, value)
            self.end_headers()
            if head:
                return
            sent = 0
            try:
                while sent < limit:
                    piece = body[sent: min(limit, sent + 65536)]
                    self.wfile.write(piece)
                    sent += len(piece)
                    if blob.chunk_delay:
                        self.wfile.flush()
                        time.sleep(blob.chunk_delay)
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                pass
            if dropping:
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    return Handler
