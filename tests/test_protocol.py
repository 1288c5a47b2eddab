"""server/protocol.py: each override of pygls 2.1, driven in-process.

Each test names the pygls behaviour that the override replaces, and fails with
pygls' own method instead. Covered elsewhere, end to end: `lsp_exit` (an `exit`
in the same write as `shutdown`: test_lifecycle.py's
test_shutdown_and_exit_in_one_write), `start_io` (test_transport.py),
`start_tcp`'s one client (test_workspace_boundary.py). `_kind` only saves time
per message (nothing to assert).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from exlsp.server.lsp import ExlspServer, build_server
from exlsp.server.protocol import ExlspProtocol

URI = "file:///w/a.py"


def frame(message: dict[str, Any] | list[Any] | str) -> bytes:
    body = (message if isinstance(message, str) else json.dumps(message)).encode()
    return b"Content-Length: %d\r\n\r\n%s" % (len(body), body)


def parse(data: bytes) -> Iterator[dict[str, Any]]:
    rest = data
    while rest:
        header, _, rest = rest.partition(b"\r\n\r\n")
        fields = dict(line.split(b": ", 1) for line in header.split(b"\r\n"))
        length = int(fields[b"Content-Length"])
        yield json.loads(rest[:length])
        rest = rest[length:]


class Harness:
    """A server whose protocol is fed messages directly; what it writes is kept."""

    def __init__(self) -> None:
        self.server: ExlspServer = build_server()
        self.protocol: ExlspProtocol = self.server.protocol  # type: ignore[assignment]
        self.written: list[bytes] = []
        harness = self

        class Writer:
            def write(self, data: bytes) -> None:
                harness.written.append(data)

            def close(self) -> None:
                pass

        self.protocol.set_writer(Writer())

    def send(self, message: dict[str, Any]) -> None:
        self.protocol.handle_message(
            json.loads(json.dumps(message), object_hook=self.protocol.structure_message)
        )

    def messages(self) -> list[dict[str, Any]]:
        return [m for data in self.written for m in parse(data)]

    def answer(self, msg_id: Any) -> dict[str, Any]:
        found = [m for m in self.messages() if m.get("id") == msg_id and "method" not in m]
        assert len(found) == 1, self.messages()
        return found[0]

    async def settle(self, rounds: int = 20) -> None:
        for _ in range(rounds):
            await asyncio.sleep(0)

    async def initialize(self) -> None:
        self.send(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "initialize",
                "params": {
                    "capabilities": {},
                    "initializationOptions": {"index": {"enabled": False}},
                },
            }
        )
        await self.settle()
        assert "result" in self.answer(1)


def request(msg_id: int, method: str, params: Any = None) -> dict[str, Any]:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": msg_id, "method": method}
    if params is not None:
        message["params"] = params
    return message


def did_open(text: str = "x = 1\n") -> dict[str, Any]:
    item = {"uri": URI, "languageId": "python", "version": 1, "text": text}
    return {"jsonrpc": "2.0", "method": "textDocument/didOpen", "params": {"textDocument": item}}


def test_open_documents_are_kept_once() -> None:
    """pygls' didOpen/didChange/didClose also keep a copy of every document in its
    workspace (a second full copy, updated at each keystroke)."""
    h = Harness()

    async def run() -> None:
        await h.initialize()
        h.send(did_open())
        point = {"line": 0, "character": 5}
        h.send(
            {
                "jsonrpc": "2.0",
                "method": "textDocument/didChange",
                "params": {
                    "textDocument": {"uri": URI, "version": 2},
                    "contentChanges": [{"range": {"start": point, "end": point}, "text": "2"}],
                },
            }
        )
        await h.settle()

    asyncio.run(run())
    doc = h.server.documents.get(URI)
    assert doc is not None and doc.text == "x = 12\n"
    assert h.server.workspace.text_documents == {}


def test_handled_notifications_leave_no_futures_behind() -> None:
    """pygls files a future for each notification handled through a generator or a
    coroutine and never drops it: one per keystroke, for the life of the server."""
    h = Harness()
    messages: list[dict[str, Any]] = [did_open()]
    for i in range(40):
        point = {"line": 0, "character": 5 + i}
        messages.append(
            {
                "jsonrpc": "2.0",
                "method": "textDocument/didChange",
                "params": {
                    "textDocument": {"uri": URI, "version": i + 2},
                    "contentChanges": [{"range": {"start": point, "end": point}, "text": "2"}],
                },
            }
        )
    # A builtin notification that pygls runs as a generator, and an unknown one.
    messages.append({"jsonrpc": "2.0", "method": "$/setTrace", "params": {"value": "off"}})
    messages.append({"jsonrpc": "2.0", "method": "exlsp/nothing", "params": {}})

    async def run() -> None:
        await h.initialize()
        for message in messages:
            h.send(message)
            await asyncio.sleep(0)

    asyncio.run(run())
    doc = h.server.documents.get(URI)
    assert doc is not None and doc.text == "x = 1" + "2" * 40 + "\n"
    assert h.protocol._request_futures == {}


def test_requests_before_initialize_are_refused() -> None:
    """pygls serves any request before `initialize`; the spec answers -32002."""
    h = Harness()

    async def run() -> None:
        h.send(request(7, "exlsp/stats", {}))
        await h.settle()

    asyncio.run(run())
    assert h.answer(7)["error"]["code"] == -32002


def test_a_second_initialize_is_refused() -> None:
    """pygls runs a second `initialize` again (new capabilities, new settings)."""
    h = Harness()

    async def run() -> None:
        await h.initialize()
        h.send(request(2, "initialize", {"capabilities": {}}))
        await h.settle()

    asyncio.run(run())
    assert h.answer(2)["error"]["code"] == -32600


def test_requests_after_shutdown_are_refused() -> None:
    """pygls keeps serving requests after `shutdown`; the spec refuses them (-32600)."""
    h = Harness()

    async def run() -> None:
        await h.initialize()
        h.send(request(2, "shutdown"))
        await h.settle()
        h.send(request(3, "exlsp/stats", {}))
        await h.settle()

    asyncio.run(run())
    assert h.answer(2)["result"] is None
    assert h.answer(3)["error"]["code"] == -32600


def test_shutdown_cancels_waiting_requests_and_is_answered() -> None:
    """pygls' shutdown cancels in-flight requests while iterating the futures' dict
    itself; a cancelled thread request's done-callback removes its entry at once
    ("dictionary changed size during iteration"), and shutdown answered an error."""
    h = Harness()
    h.server._thread_pool = ThreadPoolExecutor(max_workers=1)  # type: ignore[assignment]
    release = threading.Event()

    @h.server.thread()
    @h.server.feature("exlsp/test/block")
    def block(ls: ExlspServer, params: Any) -> str:
        release.wait(10)
        return "done"

    async def run() -> None:
        await h.initialize()
        h.send(request(2, "exlsp/test/block", {}))  # runs, holding the only thread
        h.send(request(3, "exlsp/test/block", {}))  # waits for the thread
        await h.settle()
        h.send(request(4, "shutdown"))
        await h.settle()
        release.set()
        await asyncio.sleep(0.2)
        await h.settle()

    try:
        asyncio.run(run())
    finally:
        release.set()
    assert h.answer(4) == {"jsonrpc": "2.0", "id": 4, "result": None}
    assert 3 not in h.protocol._request_futures


def test_invalid_params_are_answered() -> None:
    """pygls logs a request whose params do not deserialize and never answers it."""
    h = Harness()

    async def run() -> None:
        await h.initialize()
        h.send(request(5, "textDocument/hover", {"textDocument": 3}))
        await h.settle()

    asyncio.run(run())
    assert h.answer(5)["error"]["code"] == -32602


def test_cancelling_an_answered_request_is_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    """pygls warns on every `$/cancelRequest` for an id it no longer has; editors
    cancel the previous inline request at each keystroke, mostly after its answer."""
    h = Harness()

    async def run() -> None:
        await h.initialize()
        h.send({"jsonrpc": "2.0", "method": "$/cancelRequest", "params": {"id": 999}})
        await h.settle()

    with caplog.at_level(logging.INFO):
        asyncio.run(run())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_a_body_that_is_not_json_rpc_is_answered() -> None:
    """pygls' message loop drops a body that is not JSON (or not a JSON-RPC object)
    with a log line; the spec answers -32700 / -32600 with id null."""
    h = Harness()
    data = frame("{not json") + frame([1, 2]) + frame("[" * 5000 + "]" * 5000)

    async def run() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(data + frame(request(1, "initialize", {"capabilities": {}})))
        reader.feed_eof()
        await h.server.read_messages(reader, threading.Event())
        await h.settle()

    asyncio.run(run())
    errors = [(m["id"], m["error"]["code"]) for m in h.messages() if "error" in m]
    assert errors == [(None, -32700), (None, -32600), (None, -32700)]
    assert "result" in h.answer(1)  # and the server reads on


def test_exit_then_end_of_input_still_answers_a_running_shutdown() -> None:
    """Editors close the pipe right after `exit`: the loop's end once cancelled a
    `shutdown` still running (answer -32800, exit code 1)."""
    import os

    server = build_server()

    async def slow_shutdown(params: Any) -> None:
        await asyncio.sleep(0.3)  # stopping the model and the index takes a while

    server.protocol.fm.features["shutdown"] = slow_shutdown
    stdin_r, stdin_w = os.pipe()
    stdout_r, stdout_w = os.pipe()
    init = {"processId": None, "rootUri": None, "capabilities": {}}
    messages = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": init},
        {"jsonrpc": "2.0", "id": 2, "method": "shutdown"},
        {"jsonrpc": "2.0", "method": "exit"},
    ]
    os.write(stdin_w, b"".join(frame(m) for m in messages))
    os.close(stdin_w)  # the input ends right after `exit`
    with open(stdin_r, "rb", buffering=0) as stdin, open(stdout_w, "wb") as stdout:
        server.start_io(stdin, stdout)
    with open(stdout_r, "rb") as out:
        answers = {m.get("id"): m for m in parse(out.read())}
    assert answers[2].get("result", "missing") is None, answers[2]
    assert server.exit_code == 0
