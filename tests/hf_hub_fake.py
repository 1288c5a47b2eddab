"""A fake of the Hugging Face hub's HTTP API on 127.0.0.1, for `exlsp pull` tests.

Serves what `huggingface_hub` asks for a download (`HF_ENDPOINT` points at it):

- `GET /api/models/{repo}/revision/{rev}`: the model info (commit sha, file list);
- `GET /api/models/{repo}/tree/{rev}`: the file tree (path, size, oid);
- `HEAD`/`GET /{repo}/resolve/{rev}/{file}`: ETag, `X-Repo-Commit`, length, the
  bytes (with `Range`);

with the hub's `X-Error-Code` headers for an unknown repository or revision.
`drop_once` names a file whose first download is cut off halfway (the
connection closes after half the bytes) to exercise resume.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse


@dataclass
class FakeRepo:
    # revision (branch) -> {path: bytes}
    revisions: dict[str, dict[str, bytes]]

    def commit(self, revision: str) -> str | None:
        if revision in self.revisions:
            return hashlib.sha1(f"{id(self)}{revision}".encode()).hexdigest()
        for rev in self.revisions:  # a commit sha names its revision too
            if self.commit(rev) == revision:
                return revision
        return None

    def files(self, revision: str) -> dict[str, bytes]:
        for rev, files in self.revisions.items():
            if revision in (rev, self.commit(rev)):
                return files
        return {}


def folder_files(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo] = field(default_factory=dict)
    drop_once: set[str] = field(default_factory=set)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                hub.handle(self, head=True)

            def do_GET(self) -> None:
                hub.handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    # -- requests ----------------------------------------------------------------------

    def _send(
        self,
        h: BaseHTTPRequestHandler,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        head: bool = False,
    ) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _json(self, h: BaseHTTPRequestHandler, data: Any) -> None:
        self._send(h, 200, json.dumps(data).encode(), {"Content-Type": "application/json"})

    def _error(self, h: BaseHTTPRequestHandler, code: str, head: bool = False) -> None:
        body = json.dumps({"error": code}).encode()
        self._send(h, 404, body, {"X-Error-Code": code, "X-Error-Message": code}, head=head)

    def handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlparse(h.path).path)
        self.requests.append(
            ("HEAD" if head else "GET", path, {k.lower(): v for k, v in h.headers.items()})
        )
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)(/.*)?", path)
        if m:
            repo, kind, rev = m.group(1), m.group(2), m.group(3)
            fake = self.repos.get(repo)
            if fake is None:
                return self._error(h, "RepoNotFound")
            commit = fake.commit(rev)
            if commit is None:
                return self._error(h, "RevisionNotFound")
            files = fake.files(rev)
            if kind == "revision":
                return self._json(
                    h,
                    {
                        "id": repo,
                        "modelId": repo,
                        "sha": commit,
                        "private": False,
                        "siblings": [{"rfilename": f} for f in sorted(files)],
                    },
                )
            return self._json(
                h,
                [
                    {
                        "type": "file",
                        "path": f,
                        "size": len(data),
                        "oid": hashlib.sha1(data).hexdigest(),
                    }
                    for f, data in sorted(files.items())
                ],
            )
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            repo, rev, name = m.groups()
            fake = self.repos.get(repo)
            if fake is None:
                return self._error(h, "RepoNotFound", head)
            commit = fake.commit(rev)
            if commit is None:
                return self._error(h, "RevisionNotFound", head)
            files = fake.files(rev)
            if name not in files:
                return self._error(h, "EntryNotFound", head)
            return self._file(h, files[name], name, commit, head)
        self._send(h, 404, b"not found")

    def _file(
        self, h: BaseHTTPRequestHandler, data: bytes, name: str, commit: str, head: bool
    ) -> None:
        etag = hashlib.sha256(data).hexdigest()
        headers = {"ETag": f'"{etag}"', "X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
        start = 0
        rng = h.headers.get("Range")
        if rng and not head:
            rm = re.fullmatch(r"bytes=(\d+)-", rng.strip())
            start = int(rm.group(1)) if rm else 0
        body = data[start:]
        if head:
            return self._send(h, 200, data, headers, head=True)
        if name in self.drop_once:
            # Promise the whole file, send half, hang up.
            self.drop_once.discard(name)
            h.send_response(200)
            for k, v in headers.items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            h.close_connection = True
            return
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            return self._send(h, 206, body, headers)
        self._send(h, 200, body, headers)
