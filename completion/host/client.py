"""`exlsp serve`'s side of the model host: a worker whose model runs in the host.

`HostWorker` offers what the engine and the services use of `BackendWorker`
(`submit` -> a handle with `tokens()`, `done`, `cancel()`, `started`; `idle`;
`load`; `close`; `on_fatal`; `backend` with `tokenizer`, `info` and `name`).
Only the tokenizer (the `tokenizers` library) is loaded here.

When the host dies, the jobs in flight end at once as an outage (the server
answers empty), `on_notice` is called once, and the host is started again with
back-off; suggestions resume when it has loaded the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from exlsp.completion.backends.base import (
    Backend,
    BackendDied,
    BackendUnavailable,
    GenerationJob,
    ModelInfo,
    common_prefix_length,
)
from exlsp.completion.config import ModelConfig
from exlsp.completion.host import rendezvous
from exlsp.completion.host.wire import FrameError, encode, read_frame
from exlsp.completion.tokenizer import HfTokenizer, Tokenizer
from exlsp.completion.worker import GenerationHandle

log = logging.getLogger(__name__)

# Seconds between attempts to start a host again after it died.
BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
HOST_LOST = "the model host stopped; exlsp is starting it again"
# A job the host has not ended this long after its deadline ends here (a hung host).
OVERDUE_S = 1.0


class ModelHostLoadError(RuntimeError):
    """The host could not load the model; the message is for the user."""


class RemoteBackend:
    """The model in the host, as the server sees it: its tokenizer and description."""

    def __init__(self, name: str, tokenizer: Tokenizer, info: ModelInfo) -> None:
        self.name = name
        self.tokenizer = tokenizer
        self.info = info

    def start(self, job: GenerationJob) -> Any:
        raise RuntimeError("the model runs in the model host: submit jobs to its worker")

    def reset_cache(self) -> None:
        pass

    def close(self) -> None:
        pass


class RemoteHandle(GenerationHandle):
    started: float | None

    def __init__(self, job: GenerationJob, worker: HostWorker, rid: int) -> None:
        super().__init__(job, asyncio.get_running_loop())
        self._worker = worker
        self.rid = rid

    def cancel(self) -> None:
        if not self.job.cancel.is_set():
            self.job.cancel.set()
            self._worker._send({"op": "cancel", "id": self.rid})

    def end(self, message: dict[str, Any]) -> None:
        stats = self.job.stats
        for name, value in (message.get("stats") or {}).items():
            if hasattr(stats, name):
                setattr(stats, name, value)
        self._queued(message)
        error: BaseException | None = None
        kind = message.get("kind")
        if kind == "unavailable":
            error = BackendUnavailable(str(message.get("error")), float(message.get("retryIn", 0)))
        elif kind == "fatal":
            error = BackendDied(str(message.get("error")))
        elif kind is not None:
            error = RuntimeError(str(message.get("error")))
        self._finish(error)

    def _queued(self, message: dict[str, Any]) -> None:
        if self.started is None and "q" in message:
            self.started = self.submitted + float(message["q"])


class HostWorker:
    """A connection to the model host of `model`'s configuration (started on demand)."""

    def __init__(self, model: ModelConfig, name: str = "backend") -> None:
        self.model = model
        self.name = name
        self.session = f"{os.getpid()}-{secrets.token_hex(3)}"
        self.paths = rendezvous.HostPaths.for_model(model)
        self.backend: RemoteBackend | None = None
        self.on_fatal: Callable[[BaseException], object] | None = None
        # Called on the event loop with a message for the user (the host died).
        self.on_notice: Callable[[str], None] | None = None
        self.host_pid: int | None = None
        self.restarts = 0
        self._live: dict[int, RemoteHandle] = {}
        self._next_id = 0
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._reconnect: asyncio.Task[None] | None = None
        self._loaded: asyncio.Future[dict[str, Any]] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        # The last prompt sent on this connection, per kind (foreground, background):
        # a prompt is sent as what it keeps of it and its new tail.
        self._sent: dict[bool, list[int]] = {}

    # -- connecting ------------------------------------------------------------------

    async def load(self, factory: Callable[[], Backend] | None = None) -> RemoteBackend:
        """Connect (starting the host if none runs) and wait until it loaded the model.

        `factory` is ignored: the host loads the model from the configuration."""
        self._loop = asyncio.get_running_loop()
        try:
            welcome = await self._connect()
        except BaseException:
            self._drop_connection()
            raise
        info = ModelInfo(
            **{**welcome["info"], "architectures": tuple(welcome["info"]["architectures"])}
        )
        tokenizer = await asyncio.to_thread(HfTokenizer, Path(info.path))
        self.backend = RemoteBackend(str(welcome["name"]), tokenizer, info)
        return self.backend

    async def _connect(self) -> dict[str, Any]:
        """Open a connection and say hello; the host's `loaded` message."""
        self._drop_connection()
        reader, writer = await self._open()
        self._sent = {}
        loop = asyncio.get_running_loop()
        self._writer = writer
        self._loaded = loop.create_future()
        writer.write(
            encode(
                {
                    "op": "hello",
                    "session": self.session,
                    "pid": os.getpid(),
                    "token": rendezvous.read_token(self.paths),
                }
            )
        )
        self._reader_task = loop.create_task(self._read(reader, writer))
        message = await self._loaded
        if self._closed:
            raise ModelHostLoadError("closed")
        return message

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        path = str(self.paths.socket)
        try:
            return await asyncio.open_unix_connection(path)
        except OSError:
            pass
        try:
            started = await asyncio.to_thread(rendezvous.ensure_host, self.model, self.paths)
        except rendezvous.HostError as e:
            raise ModelHostLoadError(str(e)) from e
        if started:
            log.info("started the model host (log: %s)", self.paths.log)
        try:
            return await asyncio.open_unix_connection(path)
        except OSError as e:
            raise ModelHostLoadError(f"cannot reach the model host at {path}: {e}") from e

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reason: str | None = HOST_LOST
        try:
            while True:
                message = await read_frame(reader)
                if message is None:
                    break
                op = message.get("op")
                if op == "t":
                    handle = self._live.get(message["id"])
                    if handle is not None:
                        handle._queued(message)
                        handle._queue.put_nowait(message["t"])
                elif op == "end":
                    handle = self._live.pop(message["id"], None)
                    if handle is not None:
                        handle.end(message)
                elif op == "welcome":
                    self.host_pid = int(message["pid"])
                    if message["state"] == "ready":
                        self._answer_load(message)
                    elif message["state"] == "error":
                        self._answer_load(None, str(message.get("error")))
                elif op == "loaded":
                    self._answer_load(message)
                elif op == "loadFailed":
                    self._answer_load(None, str(message.get("error")))
                    reason = None  # the load error is reported once, by the service
                elif op == "fatal":
                    reason = None
                    if self.on_fatal is not None:
                        self.on_fatal(BackendDied(str(message.get("error"))))
                elif op == "bye":
                    reason = None  # stopped on purpose: started again by the next request
                elif op == "refused":
                    self._answer_load(None, f"the model host refused: {message.get('error')}")
                    reason = None
        except (FrameError, OSError) as e:
            log.warning("model host connection: %s", e)
        finally:
            if writer is self._writer:
                self._lost(reason)

    def _answer_load(self, message: dict[str, Any] | None, error: str = "") -> None:
        fut = self._loaded
        if fut is None or fut.done():
            return
        if message is None:
            fut.set_exception(ModelHostLoadError(error))
        else:
            fut.set_result(message)

    def _lost(self, reason: str | None) -> None:
        """The connection ended: fail what was in flight; restart if the host died."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
        self._answer_load(None, reason or "the model host closed the connection")
        live, self._live = self._live, {}
        for handle in live.values():
            handle.job.stats.stop_reason = "unavailable"
            handle._finish(BackendUnavailable(HOST_LOST))
        if self._closed or self.backend is None:
            return
        if reason is not None:
            log.error("%s (was pid %s)", reason, self.host_pid)
            if self.on_notice is not None:
                self.on_notice(reason)
            self._start_reconnect()

    def _start_reconnect(self) -> None:
        if self._reconnect is None or self._reconnect.done():
            self._reconnect = asyncio.get_running_loop().create_task(self._reconnect_loop())

    async def _reconnect_loop(self) -> None:
        for attempt in range(1_000_000):
            await asyncio.sleep(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])
            if self._closed:
                return
            try:
                await self._connect()
            except Exception as e:
                log.warning("the model host is not back yet: %s", e)
                continue
            self.restarts += 1
            log.info("the model host is back (pid %s)", self.host_pid)
            return

    def _drop_connection(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
        task, self._reader_task = self._reader_task, None
        if task is not None:
            task.cancel()

    # -- generation ------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        return not self._live

    def _send(self, message: dict[str, Any]) -> bool:
        writer = self._writer
        if writer is None or writer.is_closing():
            return False
        writer.write(encode(message))
        return True

    def submit(self, job: GenerationJob, background: bool = False) -> GenerationHandle:
        """Send `job` to the host; the latest of this server's requests wins there."""
        self._next_id += 1
        rid = self._next_id
        handle = RemoteHandle(job, self, rid)
        handle.background = background
        if background:
            job.slot = "background"
        # What this server ran before is cancelled here too, so that it ends at once.
        for stale in self._live.values():
            if not background or stale.background:
                stale.job.cancel.set()
        remaining = job.deadline - time.monotonic()
        prompt = list(job.prompt)
        before = self._sent.get(background, [])
        keep = common_prefix_length(before, prompt)
        sent = not self._closed and self._send(
            {
                "op": "submit",
                "id": rid,
                "keep": keep,
                "tail": prompt[keep:],
                "stopIds": sorted(job.stop_ids),
                "maxTokens": job.max_tokens,
                "deadlineIn": None if math.isinf(remaining) else remaining,
                "reuseCache": job.reuse_cache,
                "background": background,
            }
        )
        if sent:
            self._sent[background] = prompt
            if not math.isinf(remaining):
                asyncio.get_running_loop().call_later(
                    max(0.0, remaining) + OVERDUE_S, self._overdue, rid
                )
        else:
            job.stats.stop_reason = "unavailable"
            handle._finish(BackendUnavailable(HOST_LOST))
            if not self._closed and self.backend is not None:
                self._start_reconnect()
            return handle
        self._live[rid] = handle
        return handle

    def _overdue(self, rid: int) -> None:
        handle = self._live.pop(rid, None)
        if handle is not None:
            log.warning("the model host did not end a job by its deadline")
            handle.job.stats.stop_reason = "deadline"
            handle._finish(BackendUnavailable("the model host does not answer"))

    # -- the end ------------------------------------------------------------------------

    def close(self, wait: bool = True) -> None:
        """Disconnect (the host idles out on its own). Callable from any thread."""
        self._closed = True
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._close_on_loop()
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._close_on_loop)

    def _close_on_loop(self) -> None:
        if self._reconnect is not None:
            self._reconnect.cancel()
        self._answer_load(None, "closed")
        live, self._live = self._live, {}
        for handle in live.values():
            handle.job.stats.stop_reason = "cancelled"
            handle._finish(None)
        self._drop_connection()
