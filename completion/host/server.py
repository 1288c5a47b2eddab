"""The model host: one process that owns a model, its worker thread and KV caches,
served to every `exlsp serve` of the same user over a Unix socket.

Messages (`wire.py` frames), client to host:
  hello {session, pid, token, role?} -> welcome {pid, state, info, name, error}
                                   (role "embed": a connection of the index's embedder)
  submit {id, keep, tail, stopIds, maxTokens, deadlineIn, reuseCache, background}
                                   (the prompt: `keep` tokens of the previous one of its
                                   kind on this connection, then `tail`)
  cancel {id}
  embed {id, spec, texts, query}   -> embedded {id, shape, dtype, name, dim, maxLength,
                                   device, bytes} + the float32 matrix as a payload
                                   (`wire.py`), or embedded {id, error}; see embeddings.py
  stats                            -> stats {...} (also as a connection's first message)
  stop                             -> the host tells every client `bye` and exits
host to client:
  loaded {info, name} | loadFailed {error}   once the model is (or is not) loaded
  t {id, t: token, q?: queue seconds}         a generated token
  end {id, stats, q, error?, kind?}           a job's end ("unavailable", "fatal", "error")
  fatal {error}                               the model cannot serve again; the host exits
  bye                                         the host stops (`exlsp host stop`)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from exlsp.completion.backends.base import (
    Backend,
    BackendUnavailable,
    GenerationJob,
    is_fatal,
)
from exlsp.completion.config import ModelConfig
from exlsp.completion.host import rendezvous
from exlsp.completion.host.embeddings import HeldEmbedder, HostEmbeddings
from exlsp.completion.host.wire import FrameError, encode, read_frame
from exlsp.completion.worker import BackendWorker, GenerationHandle

log = logging.getLogger(__name__)


def process_rss(pid: int | None = None) -> int | None:
    """Resident memory of a process in bytes (Linux); None where unknown."""
    try:
        text = Path(f"/proc/{pid or 'self'}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None


@dataclasses.dataclass
class _Client:
    writer: asyncio.StreamWriter
    session: str
    pid: int
    role: str = "model"
    jobs: dict[int, GenerationHandle] = dataclasses.field(default_factory=dict)
    requests: int = 0
    # The last prompt of each kind (foreground, background): a submit carries
    # how much of it to keep and the new tail.
    prompts: dict[bool, list[int]] = dataclasses.field(default_factory=dict)

    def send(self, message: dict[str, Any], payload: bytes | None = None) -> None:
        if not self.writer.is_closing():
            self.writer.write(encode(message, payload))


class ModelHost:
    """Serves one model on `socket_path` until it idles out or is stopped."""

    def __init__(
        self,
        model: ModelConfig,
        socket_path: Path,
        token: str = "",
        idle_s: float | None = None,
        create: Callable[[ModelConfig], Backend] | None = None,
        create_embedder: Callable[[dict[str, Any]], HeldEmbedder] | None = None,
    ) -> None:
        self.model = model
        self.socket_path = socket_path
        self.token = token
        self.idle_s = model.hostIdleMinutes * 60.0 if idle_s is None else idle_s
        self._create = create
        self.worker = BackendWorker("host")
        self.embeddings = HostEmbeddings(lambda: not self.worker.idle, create_embedder)
        self.state = "loading"  # loading, ready, error
        self.error: str | None = None
        self.loads = 0
        self.load_ms: float | None = None
        self.started = time.time()
        self.requests = 0
        self.clients: list[_Client] = []
        self._server: asyncio.Server | None = None
        self._done: asyncio.Event | None = None
        self._idle: asyncio.TimerHandle | None = None

    # -- life -------------------------------------------------------------------

    async def serve(self) -> None:
        """Listen, load the model, and return once the host should exit."""
        loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        old = os.umask(0o177)  # the socket is 0600 from its first moment
        try:
            self._server = await asyncio.start_unix_server(
                self._connection, path=str(self.socket_path)
            )
        finally:
            os.umask(old)
        os.chmod(self.socket_path, 0o600)
        log.info("model host %d listening on %s", os.getpid(), self.socket_path)
        self._arm_idle()
        self.worker.on_fatal = lambda e: loop.call_soon_threadsafe(self._fatal, e)
        load = loop.create_task(self._load())
        try:
            await self._done.wait()
        finally:
            load.cancel()
            await self._shutdown()

    async def _load(self) -> None:
        create = self._create
        if create is None:
            from exlsp.completion.service import create_backend

            create = create_backend
        t0 = time.perf_counter()
        try:
            backend = await self.worker.load(lambda: create(self.model))
        except Exception as e:
            self.state, self.error = "error", str(e)
            log.error("the model could not be loaded: %s", e)
            # Every client hears it once; later servers start a host of their own
            # (the user may have freed the memory meanwhile).
            self._stop_listening()
            self._broadcast({"op": "loadFailed", "error": self.error})
            self._arm_idle()
            return
        if hasattr(backend, "max_slots"):
            backend.max_slots = max(1, self.model.hostSlots)
        self.loads += 1
        self.load_ms = (time.perf_counter() - t0) * 1000
        self.state = "ready"
        log.info("model loaded in %.0f ms", self.load_ms)
        self._broadcast({"op": "loaded", **self._model_message()})

    def _fatal(self, error: BaseException) -> None:
        log.error("the model cannot serve again: %s", error)
        self.state, self.error = "error", f"the model stopped: {error}"
        self._stop_listening()
        self._broadcast({"op": "fatal", "error": str(error)})
        self.stop()

    def stop(self) -> None:
        if self._done is not None:
            self._done.set()

    def _stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()

    async def _shutdown(self) -> None:
        self._stop_listening()
        for client in list(self.clients):
            client.send({"op": "bye"})
            with contextlib.suppress(Exception):
                await client.writer.drain()
            client.writer.close()
        self.embeddings.close()
        await asyncio.to_thread(self.worker.close)

    def _arm_idle(self, delay: float | None = None) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if self.clients and delay is None:
            return
        if delay is None and self.state == "error":
            delay = 0.5  # nothing to serve: leave the socket to a host that may load
        wait = self.idle_s if delay is None else delay
        self._idle = asyncio.get_running_loop().call_later(wait, self._idle_out)

    def _idle_out(self) -> None:
        if not self.clients or self.state == "error":
            log.info("no server connected: the model host exits")
            self.stop()

    # -- connections --------------------------------------------------------------

    def _model_message(self) -> dict[str, Any]:
        backend = self.worker.backend
        if backend is None:
            return {"info": None, "name": None}
        return {"info": dataclasses.asdict(backend.info), "name": backend.name}

    def _broadcast(self, message: dict[str, Any]) -> None:
        for client in self.clients:
            client.send(message)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        uid = rendezvous.peer_uid(sock)
        client: _Client | None = None
        try:
            if uid is not None and uid != os.getuid():
                log.warning("refused a connection from uid %d", uid)
                writer.write(encode({"op": "refused", "error": "another user's connection"}))
                return
            first = await read_frame(reader)
            if first is None:
                return
            if uid is None and (not self.token or first.get("token") != self.token):
                writer.write(encode({"op": "refused", "error": "wrong token"}))
                return
            if first.get("op") != "hello":
                await self._command(first, writer)
                return
            client = _Client(
                writer,
                str(first.get("session") or id(writer)),
                int(first.get("pid", 0)),
                str(first.get("role") or "model"),
            )
            self.clients.append(client)
            self._arm_idle()
            client.send(
                {
                    "op": "welcome",
                    "pid": os.getpid(),
                    "state": self.state,
                    "error": self.error,
                    **self._model_message(),
                }
            )
            while True:
                message = await read_frame(reader)
                if message is None:
                    break
                op = message.get("op")
                if op == "submit":
                    self._submit(client, message)
                elif op == "embed":
                    asyncio.get_running_loop().create_task(self._embed(client, message))
                elif op == "cancel":
                    handle = client.jobs.get(int(message.get("id", -1)))
                    if handle is not None:
                        handle.cancel()
                else:
                    await self._command(message, writer)
        except (FrameError, ConnectionError, ValueError, TypeError) as e:
            log.warning("dropped a connection: %s", e)
        finally:
            if client is not None:
                for handle in client.jobs.values():
                    handle.cancel()
                self.clients.remove(client)
                self._arm_idle()
            with contextlib.suppress(Exception):
                await writer.drain()
            writer.close()

    async def _command(self, message: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        op = message.get("op")
        if op == "stats":
            writer.write(encode({"op": "stats", **await self.stats()}))
        elif op == "stop":
            writer.write(encode({"op": "stopping", "pid": os.getpid()}))
            await writer.drain()
            self.stop()
        else:
            raise FrameError(f"unknown operation {op!r}")

    def _submit(self, client: _Client, message: dict[str, Any]) -> None:
        rid = int(message["id"])
        background = bool(message.get("background"))
        before = client.prompts.get(background, [])
        keep = int(message.get("keep", 0))
        if not 0 <= keep <= len(before):
            raise FrameError(f"keeps {keep} tokens of a prompt of {len(before)}")
        prompt = before[:keep] + [int(t) for t in message["tail"]]
        client.prompts[background] = prompt
        deadline_in = message.get("deadlineIn")
        job = GenerationJob(
            prompt=prompt,
            stop_ids=frozenset(int(t) for t in message.get("stopIds", ())),
            max_tokens=int(message["maxTokens"]),
            deadline=float("inf") if deadline_in is None else time.monotonic() + deadline_in,
            reuse_cache=bool(message.get("reuseCache", True)),
        )
        if self.state != "ready":
            client.send(
                {
                    "op": "end",
                    "id": rid,
                    "stats": {"stop_reason": "unavailable"},
                    "q": 0.0,
                    "error": f"model {self.state}",
                    "kind": "unavailable",
                }
            )
            return
        handle = self.worker.submit(job, background, session=client.session)
        client.jobs[rid] = handle
        client.requests += 1
        self.requests += 1
        asyncio.get_running_loop().create_task(self._stream(client, rid, handle))

    async def _embed(self, client: _Client, message: dict[str, Any]) -> None:
        rid = message.get("id")
        try:
            spec = dict(message["spec"])
            texts = [str(t) for t in message["texts"]]
            facts, vectors = await self.embeddings.embed(spec, texts, bool(message.get("query")))
        except Exception as e:  # the model is missing or broken: that client's error
            log.warning("embedding failed: %s", e)
            client.send({"op": "embedded", "id": rid, "error": f"{type(e).__name__}: {e}"})
            return
        client.requests += 1
        header = {"op": "embedded", "id": rid, "shape": list(vectors.shape), "dtype": "float32"}
        client.send({**header, **facts}, vectors.astype("<f4", copy=False).tobytes())

    async def _stream(self, client: _Client, rid: int, handle: GenerationHandle) -> None:
        error: BaseException | None = None
        first = True
        try:
            async for token in handle.tokens():
                message: dict[str, Any] = {"op": "t", "id": rid, "t": token}
                if first:
                    message["q"] = _queued(handle)
                    first = False
                client.send(message)
        except BaseException as e:
            error = e
        finally:
            client.jobs.pop(rid, None)
        end: dict[str, Any] = {
            "op": "end",
            "id": rid,
            "stats": dataclasses.asdict(handle.job.stats),
            "q": _queued(handle),
        }
        if error is not None:
            end["error"] = str(error)
            end["kind"] = (
                "unavailable"
                if isinstance(error, BackendUnavailable)
                else "fatal"
                if is_fatal(error)
                else "error"
            )
            if isinstance(error, BackendUnavailable):
                end["retryIn"] = error.retry_in
        client.send(end)

    # -- figures ----------------------------------------------------------------

    async def stats(self) -> dict[str, Any]:
        backend = self.worker.backend
        slots: dict[str, int] = {}
        slot_bytes = getattr(backend, "slot_bytes", None)
        if slot_bytes is not None and self.state == "ready":
            with contextlib.suppress(Exception):
                slots = await asyncio.wait_for(self.worker.call(slot_bytes), 5)
        vram = getattr(backend, "vram_bytes", None)
        if vram is None and backend is not None and backend.info.device.startswith("cuda"):
            vram = getattr(backend, "weight_bytes", None)
        return {
            "pid": os.getpid(),
            "socket": str(self.socket_path),
            "model": rendezvous.load_key(self.model),
            "state": self.state,
            "error": self.error,
            "loads": self.loads,
            "loadMs": self.load_ms,
            "requests": self.requests,
            "uptimeS": round(time.time() - self.started, 1),
            "rssBytes": process_rss(),
            "vramBytes": vram,
            "slots": slots,
            "sessions": [
                {"session": c.session, "pid": c.pid, "role": c.role, "requests": c.requests}
                for c in self.clients
            ],
            "embedders": self.embeddings.facts(),
            "embedRequests": self.embeddings.requests,
            "embeddedTexts": self.embeddings.texts,
            **self._model_message(),
        }


def _queued(handle: GenerationHandle) -> float:
    started = handle.started if handle.started is not None else time.perf_counter()
    return max(0.0, started - handle.submitted)


# -- the host process -------------------------------------------------------------


def _model_from_json(text: str) -> ModelConfig:
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    data = json.loads(text)
    return ModelConfig(**{k: v for k, v in data.items() if k in fields})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m exlsp.completion.host")
    p.add_argument("--socket", required=True, type=Path)
    p.add_argument("--model", required=True, help="the model settings, as JSON")
    p.add_argument("--detach", action="store_true", help="fork into a session of its own")
    args = p.parse_args(argv)
    model = _model_from_json(args.model)
    if args.detach:
        if os.fork():
            return 0
        os.setsid()
        if os.fork():  # not a session leader: it can never take a terminal
            os._exit(0)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s host[{os.getpid()}] %(levelname)s %(name)s: %(message)s",
    )
    socket_path: Path = args.socket
    token_path = socket_path.with_suffix(".token")
    token = secrets.token_hex(16)
    fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()  # a dead host's; the starting server holds the lock
    host = ModelHost(model, socket_path, token)
    try:
        asyncio.run(host.serve())
    finally:
        log.info("model host %d exits", os.getpid())
    return 0
