"""stdio transport: stdin read on the event loop, pygls' reader where stdin is a file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


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


@pytest.mark.parametrize("stdin_kind", ["pipe", "file"])
def test_a_session_over_stdin(stdin_kind: str, tmp_path: Path) -> None:
    data = b"".join(frame(m) for m in SESSION)
    if stdin_kind == "pipe":
        proc = subprocess.run(SERVER, input=data, capture_output=True, timeout=120)
    else:
        path = tmp_path / "session.bin"
        path.write_bytes(data)
        with path.open("rb") as stdin:
            proc = subprocess.run(SERVER, stdin=stdin, capture_output=True, timeout=120)
    got = responses(proc.stdout)
    assert "capabilities" in got[1]["result"]  # type: ignore[operator]
    assert got[2]["result"] is None
    assert proc.returncode == 0, proc.stderr.decode()  # `exit` after `shutdown`


def test_exit_without_shutdown_is_an_error_exit() -> None:
    data = frame(SESSION[0]) + frame(SESSION[2])
    proc = subprocess.run(SERVER, input=data, capture_output=True, timeout=120)
    assert "capabilities" in responses(proc.stdout)[1]["result"]  # type: ignore[operator]
    assert proc.returncode == 1


def test_eof_inside_a_message_ends_the_server(tmp_path: Path) -> None:
    data = frame(SESSION[0]) + b'Content-Length: 500\r\n\r\n{"jsonrpc": '
    proc = subprocess.run(SERVER, input=data, capture_output=True, timeout=120)
    assert "capabilities" in responses(proc.stdout)[1]["result"]  # type: ignore[operator]
