"""`exlsp serve`'s side of the index's embedding model when the model host holds it.

`HostEmbedder` has what `exlsp.index.embed.Embedder` asks for (`name`, `dim`,
`embed`, `embed_query`) and imports neither torch nor sentence-transformers:
the name and size come from the model's files (read by the caller), the vectors
from the host of the completion model's configuration (`embeddings.py`), the
same host the server's `HostWorker` uses, started here when none runs.

Its calls block: `embed` runs on the index worker thread and `embed_query` on
the query thread, each over a connection of its own (a query does not wait
behind a batch). When the host dies, a call starts it again (under the
rendezvous lock, so a `HostWorker` restarting it at the same moment ends with
the same host) and tries again, a few times within seconds (`RETRY_S`); a call
that still fails raises, which the index treats as a failed embedding step
(lexical retrieval meanwhile; the backlog resumes with the next file change).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from exlsp.completion.config import ModelConfig
from exlsp.completion.host import rendezvous
from exlsp.completion.host.wire import FrameError, recv_sync, send_sync

log = logging.getLogger(__name__)

# A reply to one request (the first one loads the embedding model in the host).
REPLY_TIMEOUT_S = 300.0
# Waits before each try of a request: a host that was just killed may still accept
# a connection while its process is torn down, and reset it.
RETRY_S = (0.0, 0.2, 1.0, 3.0)


class EmbedderUnavailable(RuntimeError):
    """The model host could not embed; the message is for the log."""


class _Connection:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()


class HostEmbedder:
    def __init__(
        self,
        model: ModelConfig,
        name: str,
        path: Path | str,
        dim: int,
        device: str = "auto",
        batch_size: int = 32,
    ) -> None:
        self.model = model
        self.paths = rendezvous.HostPaths.for_model(model)
        self.spec = {
            "name": name,
            "path": str(path),
            "device": device,
            "batchSize": max(1, batch_size),
        }
        self._name = name
        self._dim = dim
        self._batch = _Connection()
        self._query = _Connection()
        self._next_id = 0
        self._id_lock = threading.Lock()
        # What the host said of the model (after the first reply).
        self.max_length: int | None = None
        self.device: str | None = None
        self.host_pid: int | None = None
        self.restarts = 0  # hosts this embedder started after one it used had gone

    @property
    def name(self) -> str:
        return self._name

    @property
    def dim(self) -> int:
        return self._dim

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self._dim), dtype=np.float32)
        return self._call(self._batch, list(texts), query=False)

    def embed_query(self, text: str) -> np.ndarray:
        return self._call(self._query, [text], query=True).reshape(self._dim)

    def close(self) -> None:
        for conn in (self._batch, self._query):
            with conn.lock:
                conn.close()

    # -- the connection ------------------------------------------------------------

    def _call(self, conn: _Connection, texts: list[str], query: bool) -> np.ndarray:
        with self._id_lock:
            self._next_id += 1
            rid = self._next_id
        request = {"op": "embed", "id": rid, "spec": self.spec, "texts": texts, "query": query}
        with conn.lock:
            for attempt, wait in enumerate(RETRY_S, 1):
                time.sleep(wait)
                try:
                    sock = conn.sock or self._open(conn)
                    send_sync(sock, request)
                    reply = self._reply(sock, rid)
                    break
                except (OSError, FrameError, EmbedderUnavailable, rendezvous.HostError) as e:
                    conn.close()
                    if attempt == len(RETRY_S):
                        raise EmbedderUnavailable(f"the model host cannot embed: {e}") from e
                    log.warning("the model host connection for embeddings ended (%s): again", e)
        if "error" in reply:
            raise RuntimeError(f"the model host could not embed: {reply['error']}")
        return self._vectors(reply, len(texts))

    def _open(self, conn: _Connection) -> socket.socket:
        try:
            sock = self._connect()
        except OSError:
            started = rendezvous.ensure_host(self.model, self.paths)
            if started and self.host_pid is not None:
                self.restarts += 1
            sock = self._connect()
        try:
            send_sync(
                sock,
                {
                    "op": "hello",
                    "session": f"{os.getpid()}-embed",
                    "pid": os.getpid(),
                    "token": rendezvous.read_token(self.paths),
                    "role": "embed",
                },
            )
            while True:
                message = recv_sync(sock)
                if message is None:
                    raise EmbedderUnavailable("the model host closed the connection")
                op = message.get("op")
                if op == "refused":
                    raise EmbedderUnavailable(f"the model host refused: {message.get('error')}")
                if op == "welcome":
                    if message.get("state") == "error":
                        raise EmbedderUnavailable(str(message.get("error")))
                    self.host_pid = int(message["pid"])
                    break
        except BaseException:
            sock.close()
            raise
        conn.sock = sock
        return sock

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(REPLY_TIMEOUT_S)
            sock.connect(str(self.paths.socket))
        except BaseException:
            sock.close()
            raise
        return sock

    @staticmethod
    def _reply(sock: socket.socket, rid: int) -> dict[str, Any]:
        while True:
            message = recv_sync(sock)
            if message is None:
                raise EmbedderUnavailable("the model host closed the connection")
            op = message.get("op")
            if op == "embedded" and message.get("id") == rid:
                return message
            if op in ("bye", "fatal"):
                raise EmbedderUnavailable(f"the model host stopped ({op})")
            # Anything else (`loaded`, a broadcast) is not for this connection's caller.

    def _vectors(self, reply: dict[str, Any], n: int) -> np.ndarray:
        shape = reply.get("shape")
        if reply.get("dtype") != "float32" or shape != [n, self._dim]:
            raise ValueError(
                f"the model host sent {reply.get('dtype')} {shape}, "
                f"expected float32 {[n, self._dim]}"
            )
        self.max_length = reply.get("maxLength")
        self.device = reply.get("device")
        payload = reply.get("payload", b"")
        vectors = np.frombuffer(payload, dtype="<f4").astype(np.float32)
        return vectors.reshape(n, self._dim)
