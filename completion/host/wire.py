"""The host's framing: one JSON object per frame, after its length (4 bytes, big-endian).

A frame whose object has `"bytes": n` is followed by n raw bytes (its payload:
an embedding matrix is sent as its float32 buffer, not as a JSON list; 384
floats are 1.5 kB raw against ~7 kB of JSON text, and need no parsing).

msgpack is not among the dependencies, and JSON is cheap at this size: an
in-line keystroke's submit (a prompt sent as the tokens kept of the previous one
plus its tail) is ~140 bytes and its end ~220, each encoded and decoded in ~9 us;
a whole 1200-token prompt (after a reconnect, or a prompt that changed at its
start) is ~7 kB and ~150 us. The whole round trip through the host is measured by
`benchmarks/latency.py` (the `host-instant` variant against `instant`).
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from typing import Any

_LENGTH = struct.Struct(">I")
# A prompt of 32k token ids is about 200 kB of JSON: far below this.
MAX_FRAME = 64 * 1024 * 1024


class FrameError(ValueError):
    """The peer sent something that is not a frame of this protocol."""


def encode(message: dict[str, Any], payload: bytes | None = None) -> bytes:
    if payload is not None:
        message = {**message, "bytes": len(payload)}
    body = json.dumps(message, separators=(",", ":")).encode("utf-8")
    head = _LENGTH.pack(len(body)) + body
    return head if payload is None else head + payload


def _payload_size(message: dict[str, Any]) -> int:
    size = message.get("bytes", 0)
    if not isinstance(size, int) or not 0 <= size <= MAX_FRAME:
        raise FrameError(f"a payload of {size!r} bytes")
    return size


def _decode(body: bytes) -> dict[str, Any]:
    try:
        message = json.loads(body)
    except ValueError as e:
        raise FrameError(f"not JSON: {e}") from None
    if not isinstance(message, dict):
        raise FrameError("a frame is a JSON object")
    return message


async def read_frame(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next message (its payload, if any, under "payload"); None at the end of the stream."""
    try:
        head = await reader.readexactly(_LENGTH.size)
    except asyncio.IncompleteReadError:
        return None
    (size,) = _LENGTH.unpack(head)
    if size > MAX_FRAME:
        raise FrameError(f"frame of {size} bytes")
    try:
        message = _decode(await reader.readexactly(size))
        extra = _payload_size(message)
        if extra:
            message["payload"] = await reader.readexactly(extra)
    except asyncio.IncompleteReadError:
        return None
    return message


def send_sync(sock: socket.socket, message: dict[str, Any], payload: bytes | None = None) -> None:
    sock.sendall(encode(message, payload))


def recv_sync(sock: socket.socket) -> dict[str, Any] | None:
    """The next message from a blocking socket (its payload under "payload"); None at
    the end of the stream."""
    head = _recv_exactly(sock, _LENGTH.size)
    if head is None:
        return None
    (size,) = _LENGTH.unpack(head)
    if size > MAX_FRAME:
        raise FrameError(f"frame of {size} bytes")
    body = _recv_exactly(sock, size)
    if body is None:
        return None
    message = _decode(body)
    extra = _payload_size(message)
    if extra:
        payload = _recv_exactly(sock, extra)
        if payload is None:
            return None
        message["payload"] = payload
    return message


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    parts = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            return None
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)
