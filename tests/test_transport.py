"""stdio transport: stdin read on the event loop, pygls' reader where stdin is a file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import IO, Any


def frame(message: dict[str, object]) -> bytes:
    body = json.dumps(message).encode()
    return b"Content-Length: %d\r\n\r\n%s" % (len(body), body)


SESSION = [
    {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"capabilities": {}}},
    {"jsonrpc": "2.0", "id": 2, "method": "shutdown"},
    {"jsonrpc": "2.0", "method": "exit"},
]
SERVER = [sys.executable, "-m", "exlsp.server", "serve"]


def responses(stdout: bytes) -> dict[int, dict[str, object]]:
    out: dict[int, dict[str, object]] = {}
    rest = stdout
    while rest:
        header, _, rest = rest.partition(b"\r\n\r\n")
        fields = dict(line.split(b": ", 1) for line in header.split(b"\r\n"))
        length = int(fields[b"Content-Length"])
        message = json.loads(rest[:length])
        rest = rest[length:]
        if "id" in message and "method" not in message:
            out[message["id"]] = message
    return out


def read_message(stream: IO[bytes]) -> dict[str, Any]:
    length = 0
    while line := stream.readline().strip():
        name, _, value = line.partition(b": ")
        if name == b"Content-Length":
            length = int(value)
    message: dict[str, Any] = json.loads(stream.read(length))
    return message


def test_a_session_over_a_pipe() -> None:
    """As editors do it: `exit` once `shutdown` has been answered."""
    proc = subprocess.Popen(
        SERVER, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(frame(SESSION[0]) + frame(SESSION[1]))
    proc.stdin.flush()
    got: dict[int, dict[str, Any]] = {}
    while 2 not in got:
        message = read_message(proc.stdout)
        if "id" in message and "method" not in message:
            got[message["id"]] = message
    assert "capabilities" in got[1]["result"]
    assert got[2]["result"] is None
    proc.stdin.write(frame(SESSION[2]))
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0  # `exit` after `shutdown`


def test_a_session_from_a_file(tmp_path: Path) -> None:
    """stdin that is not a pipe: pygls' reader; the end of the file ends the server."""
    path = tmp_path / "session.bin"
    path.write_bytes(frame(SESSION[0]) + frame(SESSION[1]))
    with path.open("rb") as stdin:
        proc = subprocess.run(SERVER, stdin=stdin, capture_output=True, timeout=120)
    got = responses(proc.stdout)
    assert "capabilities" in got[1]["result"]  # type: ignore[operator]
    assert got[2]["result"] is None
    assert proc.returncode == 0, proc.stderr.decode()


def test_exit_without_shutdown_is_an_error_exit() -> None:
    data = frame(SESSION[0]) + frame(SESSION[2])
    proc = subprocess.run(SERVER, input=data, capture_output=True, timeout=120)
    assert "capabilities" in responses(proc.stdout)[1]["result"]  # type: ignore[operator]
    assert proc.returncode == 1


def test_eof_inside_a_message_ends_the_server(tmp_path: Path) -> None:
    data = frame(SESSION[0]) + b'Content-Length: 500\r\n\r\n{"jsonrpc": '
    proc = subprocess.run(SERVER, input=data, capture_output=True, timeout=120)
    assert "capabilities" in responses(proc.stdout)[1]["result"]  # type: ignore[operator]


def test_a_model_reload_lets_the_frozen_old_model_be_collected() -> None:
    """After a load the server freezes the heap (gc.freeze) so full collections skip
    the model; a reload must unfreeze it, or the old model's reference cycles (and
    the memory they hold) would never be collected."""
    import asyncio
    import gc
    import weakref

    from exlsp.server.lsp import build_server

    server = build_server()
    server.config.model.backend = "instant"

    async def run() -> weakref.ref[Any]:
        server.start_model()
        await server.wait_ready()
        first = server.service
        assert first is not None and first.state == "ready" and first.backend is not None
        backend = first.backend
        backend.itself = backend  # type: ignore[attr-defined]  # a reference cycle
        gone = weakref.ref(backend)
        del backend, first
        server.start_model()  # a reload, as after a configuration change
        await server.wait_ready()
        assert server.service is not None and server.service.state == "ready"
        await server.service.aclose()
        return gone

    try:
        gone = asyncio.run(run())
        gc.collect()
        assert gone() is None
    finally:
        gc.unfreeze()
