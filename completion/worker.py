"""The one thread that owns a backend (and with it the GPU).

The event loop never calls the model: it submits a `GenerationJob` and reads
the tokens back through an asyncio queue. Latest wins: submitting a job
cancels the one running and any waiting, and a cancelled job stops between two
decode steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol, TypeVar

from exlsp.completion.backends.base import (
    Backend,
    BackendUnavailable,
    GenerationJob,
    is_fatal,
)
from exlsp.completion.decode import decode

log = logging.getLogger(__name__)

T = TypeVar("T")
_DONE = object()


class GenerationHandle:
    """The event loop's side of one job: its tokens as they come, then its end."""

    def __init__(self, job: GenerationJob, loop: asyncio.AbstractEventLoop) -> None:
        self.job = job
        self._loop = loop
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self.done = loop.create_future()
        self.submitted = time.perf_counter()
        self.background = False
        self.session: str | None = None
        self.started: float | None = None

    # Called on the worker thread.
    def _put(self, item: Any) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def _finish(self, error: BaseException | None) -> None:
        def finish() -> None:
            self._queue.put_nowait(_DONE)
            if not self.done.done():
                if error is None:
                    self.done.set_result(self.job.stats)
                else:
                    self.done.set_exception(error)
                    self.done.exception()  # mark retrieved: callers read it via tokens()

        self._loop.call_soon_threadsafe(finish)

    def cancel(self) -> None:
        self.job.cancel.set()

    async def tokens(self) -> AsyncIterator[int]:
        """Generated tokens until the job ends; raises the backend's error, if any."""
        while True:
            item = await self._queue.get()
            if item is _DONE:
                break
            yield item
        await self.done


class ModelWorker(Protocol):
    """What the engine and the services use of a worker: `BackendWorker` in this
    process, or `completion.host.client.HostWorker` for a model in a model host."""

    # Called with a fatal generation error (`is_fatal`): the model cannot serve again.
    on_fatal: Callable[[BaseException], object] | None

    @property
    def backend(self) -> Backend | None: ...

    @property
    def idle(self) -> bool: ...

    def submit(self, job: GenerationJob, background: bool = False) -> GenerationHandle: ...

    async def load(self, factory: Callable[[], Backend]) -> Backend: ...

    def close(self, wait: bool = True) -> None: ...


class BackendWorker:
    def __init__(self, name: str = "backend") -> None:
        self._jobs: queue.Queue[tuple[Callable[[], Any], asyncio.Future[Any] | None] | None] = (
            queue.Queue()
        )
        self._thread = threading.Thread(target=self._run, name=f"exlsp-{name}", daemon=True)
        self._live: list[GenerationHandle] = []  # submitted and not finished, in order
        self._lock = threading.Lock()
        self.backend: Backend | None = None
        self._closed = False
        # Called on the worker thread with a fatal generation error (`is_fatal`).
        self.on_fatal: Callable[[BaseException], object] | None = None
        self._thread.start()

    # -- generic calls -------------------------------------------------------

    async def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the worker thread (model load, cache reset...)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._jobs.put((fn, fut))
        return await fut

    async def load(self, factory: Callable[[], Backend]) -> Backend:
        def load() -> Backend:
            backend = factory()
            if self._closed:  # abandoned by close(wait=False) while it loaded
                backend.close()
                raise RuntimeError("the model load was abandoned")
            return backend

        backend = await self.call(load)
        self.backend = backend
        return backend

    # -- generation ------------------------------------------------------------

    @property
    def idle(self) -> bool:
        """No job runs or waits."""
        with self._lock:
            return not self._live

    def submit(
        self, job: GenerationJob, background: bool = False, session: str | None = None
    ) -> GenerationHandle:
        """Queue `job`; the latest request wins.

        A foreground job (a completion) cancels every job that runs or waits.
        A background job (hover, code action) cancels only older background
        jobs and waits behind foreground ones, which in turn preempt it.

        With several editors on one model (the model host), each passes its
        `session`: the latest request wins within a session, a completion still
        preempts every session's background work, and each session's jobs use
        KV cache slots of their own ("<session>/main", "<session>/background").
        """
        handle = GenerationHandle(job, asyncio.get_running_loop())
        handle.background = background
        handle.session = session
        if background:
            job.slot = "background"
        if session is not None:
            job.slot = f"{session}/{job.slot}"
        with self._lock:
            if self._closed:
                # The thread is gone or going (a fallback replaced the model while this
                # request was being built): nothing will run the job; it ends at once.
                job.stats.stop_reason = "cancelled"
                handle._finish(None)
                return handle
            for stale in self._live:
                if stale.session == session:
                    if not background or stale.background:
                        stale.cancel()
                elif not background and stale.background:
                    stale.cancel()
            self._live.append(handle)
            # Under the lock: a job is queued before `close`'s end marker, never after.
            self._jobs.put((lambda: self._generate(handle), None))
        return handle

    def _generate(self, handle: GenerationHandle) -> None:
        job = handle.job
        error: BaseException | None = None
        try:
            backend = self.backend
            if backend is None:
                raise RuntimeError("no model loaded")
            handle.started = time.perf_counter()
            for token in decode(backend, job):
                handle._put(token)
        except BackendUnavailable as e:
            error = e  # an expected outage: the backend logged it, once
        except BaseException as e:
            log.exception("generation failed")
            error = e
            if is_fatal(e) and self.on_fatal is not None:
                self.on_fatal(e)
        finally:
            with self._lock:
                self._live.remove(handle)
            handle._finish(error)

    # -- thread ---------------------------------------------------------------

    def _run(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                break
            fn, fut = item
            if fut is None:
                fn()
                continue
            try:
                value = fn()
            except BaseException as e:
                _answer(fut, _set_exception, e)
            else:
                _answer(fut, _set_result, value)

    def close(self, wait: bool = True) -> None:
        """Stop the thread once its current call ends; `wait=False` does not wait for
        that (a model load can take seconds: it finishes, and is closed, on its own)."""
        with self._lock:
            self._closed = True
            for h in self._live:
                h.cancel()
            backend = self.backend
            if backend is not None:
                self._jobs.put((backend.close, None))
            self._jobs.put(None)
        if wait:
            self._thread.join(timeout=5)


def _answer(fut: asyncio.Future[Any], setter: Callable[..., None], value: Any) -> None:
    # The loop is gone when a call was abandoned and the program ended meanwhile.
    with contextlib.suppress(RuntimeError):
        fut.get_loop().call_soon_threadsafe(setter, fut, value)


def _set_result(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
