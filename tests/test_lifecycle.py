"""`exlsp serve` from start to exit, driven with raw JSON-RPC bytes over stdio.

Raw bytes, not an LSP client, so that each test controls the timing: `shutdown`
while `initialized` still waits on the client, during the model load, in the
same write as `exit`; and messages a well-behaved client never sends.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

SERVER = [sys.executable, "-m", "exlsp.server", "serve"]
INSTANT = {"model": {"backend": "instant"}, "index": {"enabled": False}}


def frame(message: dict[str, Any]) -> bytes:
    body = json.dumps(message).encode()
    return b"Content-Length: %d\r\n\r\n%s" % (len(body), body)


class RawSession:
    """One `exlsp serve` process; what it writes is read on a thread into a queue."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [*SERVER, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
        )
        self.messages: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        self._next_id = 100
        self._stderr: str | None = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        out = self.proc.stdout
        assert out is not None
        while True:
            length = 0
            while line := out.readline():
                if not line.strip():
                    break
                name, _, value = line.strip().partition(b": ")
                if name == b"Content-Length":
                    length = int(value)
            if not line:
                self.messages.put(None)
                return
            self.messages.put(json.loads(out.read(length)))

    def write(self, *messages: dict[str, Any] | bytes) -> None:
        """All of `messages` in one write."""
        assert self.proc.stdin is not None
        data = b"".join(m if isinstance(m, bytes) else frame(m) for m in messages)
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def wait_for(self, wanted: Callable[[dict[str, Any]], bool], timeout: float = 120) -> Any:
        limit = time.monotonic() + timeout
        while (left := limit - time.monotonic()) > 0:
            try:
                message = self.messages.get(timeout=left)
            except queue.Empty:
                break
            if message is None:
                raise AssertionError(f"the server closed stdout; stderr: {self.stderr()}")
            self.seen.append(message)
            if wanted(message):
                return message
        raise AssertionError(f"no such message within {timeout} s; got {self.seen}")

    def answer(self, msg_id: Any, timeout: float = 120) -> dict[str, Any]:
        return dict(self.wait_for(lambda m: m.get("id") == msg_id and "method" not in m, timeout))

    def request(self, method: str, params: Any = None) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": self._next_id, "method": method}
        if params is not None:
            message["params"] = params
        self.write(message)
        return self.answer(self._next_id)

    def initialize(self, options: dict[str, Any], **params: Any) -> dict[str, Any]:
        capabilities = params.pop("capabilities", {})
        self.write(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "initialize",
                "params": {
                    "capabilities": capabilities,
                    "initializationOptions": options,
                    **params,
                },
            }
        )
        return self.answer(1)

    def wait_ready(self) -> dict[str, Any]:
        limit = time.monotonic() + 180
        while time.monotonic() < limit:
            stats = self.request("exlsp/stats", {})["result"]
            if stats["state"] in ("ready", "error"):
                return dict(stats)
            time.sleep(0.1)
        raise AssertionError("the model did not load")

    def exit_code(self) -> int:
        with_exit = self.proc.poll() is None
        if with_exit:
            self.write({"jsonrpc": "2.0", "method": "exit"})
        return self.proc.wait(timeout=60)

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        if self._stderr is None:
            assert self.proc.stderr is not None
            self._stderr = self.proc.stderr.read().decode(errors="replace")
        return self._stderr

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def session() -> Any:
    opened: list[RawSession] = []

    def start(*args: str, env: dict[str, str] | None = None) -> RawSession:
        opened.append(RawSession(*args, env=env))
        return opened[-1]

    yield start
    for s in opened:
        s.close()


SHUTDOWN = {"jsonrpc": "2.0", "id": 2, "method": "shutdown"}
EXIT = {"jsonrpc": "2.0", "method": "exit"}
INITIALIZED = {"jsonrpc": "2.0", "method": "initialized", "params": {}}


def assert_clean_exit(s: RawSession) -> None:
    code = s.exit_code()
    err = s.stderr()
    assert code == 0, err
    assert "Traceback" not in err, err


def test_shutdown_while_initialized_still_waits_on_the_client(session: Any) -> None:
    """pygls cancelled the in-flight handlers while iterating over their dict, and
    the cancel callback deleted from it: -32603 "dictionary changed size"."""
    s = session()
    s.initialize(INSTANT, capabilities={"workspace": {"configuration": True}})
    s.write(INITIALIZED)
    # The `initialized` handler now waits for this answer, which never comes.
    s.wait_for(lambda m: m.get("method") == "workspace/configuration")
    s.write(SHUTDOWN)
    answer = s.answer(2)
    assert "error" not in answer and answer["result"] is None, answer
    assert_clean_exit(s)


def test_shutdown_and_exit_in_one_write(session: Any) -> None:
    """As Helix quits and restarts: `exit` arrives while `shutdown` still runs."""
    s = session()
    s.initialize(INSTANT)
    s.write(INITIALIZED)
    s.write(SHUTDOWN, EXIT)
    answer = s.answer(2)
    assert "error" not in answer and answer["result"] is None, answer
    assert_clean_exit(s)


def test_shutdown_when_idle(session: Any) -> None:
    s = session()
    s.initialize(INSTANT)
    s.write(INITIALIZED)
    assert s.wait_ready()["state"] == "ready"
    s.write(SHUTDOWN)
    assert s.answer(2)["result"] is None
    assert_clean_exit(s)


def test_shutdown_during_the_model_load_is_answered_at_once(session: Any) -> None:
    """The load never ends here (the model server accepts and stays silent): the
    answer must not wait for it. VS Code kills a server that has not answered
    `shutdown` within 2 s; the old code answered only after a 5 s thread join."""
    silent = socket.create_server(("127.0.0.1", 0))
    port = silent.getsockname()[1]
    try:
        s = session()
        options = {
            "model": {
                "backend": "openai",
                "baseUrl": f"http://127.0.0.1:{port}/v1",
                "readTimeoutMs": 120_000,
            },
            "index": {"enabled": False},
        }
        s.initialize(options)
        s.write(INITIALIZED)
        s.wait_for(
            lambda m: m.get("method") == "exlsp/status" and m["params"]["state"] == "loading"
        )
        time.sleep(0.5)  # into the load: the backend's GET /models is waiting
        sent = time.monotonic()
        s.write(SHUTDOWN)
        answer = s.answer(2, timeout=30)
        waited = time.monotonic() - sent
        assert answer["result"] is None, answer
        assert waited < 2.0, f"shutdown answered after {waited:.1f} s"
        statuses = [m["params"]["state"] for m in s.seen if m.get("method") == "exlsp/status"]
        assert statuses == ["loading"], statuses  # the load had not ended
        assert_clean_exit(s)
    finally:
        silent.close()


def test_requests_after_shutdown_are_refused(session: Any) -> None:
    s = session()
    s.initialize(INSTANT)
    s.write(SHUTDOWN)
    assert s.answer(2)["result"] is None
    answer = s.request("exlsp/stats", {})
    assert answer["error"]["code"] == -32600, answer
    assert_clean_exit(s)


def test_a_second_initialize_is_refused_and_changes_nothing(session: Any) -> None:
    s = session()
    first = s.initialize(INSTANT, capabilities={"general": {"positionEncodings": ["utf-8"]}})
    assert first["result"]["capabilities"]["positionEncoding"] == "utf-8"
    again = s.request(
        "initialize",
        {
            "capabilities": {"general": {"positionEncodings": ["utf-16"]}},
            "rootUri": "file:///elsewhere",
            "initializationOptions": {"completion": {"enabled": False}},
        },
    )
    assert again.get("error", {}).get("code") == -32600, again
    s.write(INITIALIZED)
    assert s.wait_ready()["state"] == "ready"
    uri = "file:///w/a.py"
    s.write(
        {
            "jsonrpc": "2.0",
            "method": "textDocument/didOpen",
            "params": {
                "textDocument": {
                    "uri": uri,
                    "languageId": "python",
                    "version": 1,
                    "text": "é = 1\n",
                }
            },
        }
    )
    # 'é' is two UTF-8 units and one UTF-16 unit: character 2 is after it only in UTF-8.
    s.request(
        "textDocument/inlineCompletion",
        {
            "textDocument": {"uri": uri},
            "position": {"line": 0, "character": 2},
            "context": {"triggerKind": 1},
        },
    )
    stats = s.request("exlsp/stats", {})["result"]
    assert stats["lastRequest"] == {"line": 0, "character": 1}, stats
    s.write(SHUTDOWN)
    assert s.answer(2)["result"] is None
    assert_clean_exit(s)


def test_a_message_nested_too_deep_is_a_parse_error(session: Any) -> None:
    s = session()
    s.initialize(INSTANT)
    deep = b"[" * 6000 + b"]" * 6000
    s.write(b"Content-Length: %d\r\n\r\n%s" % (len(deep), deep))
    answer = s.wait_for(lambda m: "error" in m and "method" not in m, timeout=30)
    assert answer["id"] is None and answer["error"]["code"] == -32700, answer
    not_a_message = b"[1, 2]"
    s.write(b"Content-Length: %d\r\n\r\n%s" % (len(not_a_message), not_a_message))
    answer = s.wait_for(lambda m: "error" in m and "method" not in m, timeout=30)
    assert answer["id"] is None and answer["error"]["code"] == -32600, answer
    # The server goes on.
    assert s.request("exlsp/stats", {})["result"]["state"] in ("idle", "loading", "ready")
    s.write(SHUTDOWN)
    assert s.answer(2)["result"] is None
    assert s.exit_code() == 0


def test_exit_after_shutdown_with_the_file_reader(tmp_path: Path) -> None:
    """stdin that is a file (pygls' reader): `shutdown` and `exit` back to back."""
    path = tmp_path / "session.bin"
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"capabilities": {}}}
    path.write_bytes(frame(init) + frame(SHUTDOWN) + frame(EXIT))
    with path.open("rb") as stdin:
        proc = subprocess.run(SERVER, stdin=stdin, capture_output=True, timeout=120)
    assert b'"id": 2, "jsonrpc": "2.0", "result": null' in proc.stdout, proc.stdout
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"Traceback" not in proc.stderr


# -- logs ---------------------------------------------------------------------------


def serve_until_ready(s: RawSession, options: dict[str, Any]) -> list[dict[str, Any]]:
    """A session up to the loaded model and back down; the client's log messages."""
    s.initialize(options)
    s.write(INITIALIZED)
    assert s.wait_ready()["state"] == "ready"
    s.write(SHUTDOWN)
    s.answer(2)
    assert_clean_exit(s)
    return [m["params"] for m in s.seen if m.get("method") == "window/logMessage"]


def test_info_lines_go_to_the_client_and_the_log_file_not_to_stderr(
    session: Any, tmp_path: Path
) -> None:
    """Editors file stderr as errors (VS Code: `[error] ... INFO`)."""
    log_file = tmp_path / "logs" / "exlsp.log"
    log_file.parent.mkdir()
    s = session()
    logged = serve_until_ready(s, {**INSTANT, "logging": {"file": str(log_file)}})
    assert any(p["type"] == 3 and "model ready" in p["message"] for p in logged), logged
    err = s.stderr()
    assert " INFO " not in err, err
    assert "model ready" in log_file.read_text(encoding="utf-8")


def test_the_command_line_log_file_takes_precedence(session: Any, tmp_path: Path) -> None:
    given, configured = tmp_path / "given.log", tmp_path / "configured.log"
    s = session("--log-file", str(given))
    serve_until_ready(s, {**INSTANT, "logging": {"file": str(configured)}})
    assert "model ready" in given.read_text(encoding="utf-8")
    assert not configured.exists()
    assert " INFO " not in s.stderr()
