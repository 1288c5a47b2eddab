"""A scripted OpenAI-compatible completions server on loopback, for the backend's unit tests.

It speaks the wire protocol (``GET /v1/models``, ``POST /v1/completions`` with
server-sent events, ``POST /tokenize``) and replays a script per request, so
that tests can produce every failure a real server shows: refused keys, 5xx,
malformed or truncated streams, silence, and clients that hang up. It records
what it received and when a client closed the stream early. The real server
is tested in `test_openai_llama_server.py`.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# A script step: ("text", str), ("finish", reason), ("usage", dict), ("timings", dict),
# ("raw", line), ("sleep", seconds), ("done",), ("close",) (drop the connection).
Step = tuple[Any, ...]
Script = Callable[[dict[str, Any]], list[Step]]


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class FakeOpenAIServer:
    script: Script = lambda body: [("text", "pass"), ("finish", "stop"), ("done",)]
    models: list[str] = field(default_factory=lambda: ["fake-coder"])
    owned_by: str = "fake"  # /models' "owned_by": which server this pretends to be
    status: int = 200  # answer every request with this status when not 200
    error_body: str = '{"error": {"message": "scripted failure"}}'
    tokenize: Callable[[str], list[int]] | None = None
    step_s: float = 0.0
    requests: list[Received] = field(default_factory=list)
    disconnects: int = 0
    finished: int = 0
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def completions(self) -> list[Received]:
        return [r for r in self.requests if r.path.endswith("/completions")]

    def start(self, tls: ssl.SSLContext | None = None) -> str:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _json(self, status: int, payload: Any) -> None:
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _record(self, body: dict[str, Any]) -> None:
                fake.requests.append(Received(self.path, dict(self.headers.items()), body))

            def do_GET(self) -> None:
                self._record({})
                if fake.status != 200:
                    self._json(fake.status, fake.error_body.encode())
                elif self.path.endswith("/models"):
                    self._json(
                        200,
                        {
                            "object": "list",
                            "data": [{"id": m, "owned_by": fake.owned_by} for m in fake.models],
                        },
                    )
                else:
                    self._json(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                self._record(body)
                if self.path == "/tokenize":
                    if fake.tokenize is None:
                        self._json(404, {"error": {"message": "no tokenizer"}})
                    else:
                        self._json(200, {"tokens": fake.tokenize(body.get("content", ""))})
                    return
                if fake.status != 200:
                    self._json(fake.status, fake.error_body.encode())
                    return
                if not self.path.endswith("/completions"):
                    self._json(404, {"error": {"message": "not found"}})
                    return
                self._stream(fake.script(body))

            def _send_chunk(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            def _stream(self, steps: list[Step]) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    for step in steps:
                        kind = step[0]
                        if kind == "sleep":
                            time.sleep(step[1])
                            continue
                        if kind == "close":
                            self.close_connection = True
                            return
                        if kind == "done":
                            line = "data: [DONE]"
                        elif kind == "raw":
                            line = step[1]
                        else:
                            line = "data: " + json.dumps(_event(kind, step[1]))
                        self._send_chunk((line + "\n\n").encode())
                        if fake.step_s:
                            time.sleep(fake.step_s)
                    self._send_chunk(b"")
                    fake.finished += 1
                except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                    fake.disconnects += 1
                    self.close_connection = True

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()
        scheme = "https" if tls else "http"
        return f"{scheme}://127.0.0.1:{self._server.server_address[1]}/v1"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def _event(kind: str, value: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"object": "text_completion", "model": "fake-coder"}
    if kind == "text":
        base["choices"] = [{"index": 0, "text": value, "finish_reason": None}]
    elif kind == "finish":
        base["choices"] = [{"index": 0, "text": "", "finish_reason": value}]
    elif kind == "usage":
        base["choices"] = []
        base["usage"] = value
    elif kind == "timings":
        base["choices"] = []
        base["timings"] = value
    elif kind == "error":
        return {"error": {"message": value}}
    return base


def streamed(text: str, pieces: int = 3, finish: str = "stop") -> list[Step]:
    """`text` in `pieces` chunks, a finish reason and the end marker."""
    size = max(1, -(-len(text) // pieces))
    steps: list[Step] = [("text", text[i : i + size]) for i in range(0, len(text), size)]
    return [*steps, ("finish", finish), ("done",)]
