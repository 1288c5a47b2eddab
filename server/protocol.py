"""pygls 2.1 with its private lifecycle, dispatch and transport methods overridden.

Everything here replaces a private method of pygls 2.1 (`pygls.protocol` and
`pygls.lsp.server`); pyproject.toml pins pygls to 2.1.x for that reason. Each
override names the pygls behaviour it changes, and tests/test_protocol.py holds a
test that fails without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import re
import sys
import threading
import time
import types as pytypes
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO, ClassVar, cast

from lsprotocol import types
from pygls.exceptions import (
    JsonRpcException,
    JsonRpcInvalidParams,
    JsonRpcInvalidRequest,
    JsonRpcParseError,
)
from pygls.io_ import StdinAsyncReader, StdoutWriter
from pygls.lsp.server import LanguageServer
from pygls.protocol import LanguageServerProtocol
from pygls.protocol.json_rpc import RPCNotification, RPCRequest, RPCResponse
from pygls.protocol.language_server import lsp_method

log = logging.getLogger(__name__)

_CONTENT_LENGTH = re.compile(rb"^Content-Length: (\d+)\r\n$")
# How long a received `exit` may wait, after the input ended, for a `shutdown` still
# running (VS Code kills a server that has not exited 2 s after `exit`).
EXIT_WAIT_S = 5.0


class ExlspProtocol(LanguageServerProtocol):
    """pygls' protocol with these changes.

    - Open documents live in `ExlspServer.documents` (LSP-conformant lines,
      incremental edits by line); pygls' own copy is not kept.
    - A request whose params do not deserialize is answered with -32602
      instead of being dropped.
    - The lifecycle as the spec has it: a second `initialize` and every request
      after `shutdown` are refused with -32600, and an `exit` that arrives while
      `shutdown` still runs (Helix sends both in one write) waits for its answer,
      also when the input ends right after it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._initialize_seen = False
        # The `shutdown` request's future, from its arrival: from then on only `exit` is served.
        self._shutdown_request: Any = None
        self._exiting = False  # `exit` arrived (it may wait for the `shutdown` answer)

    # pygls 2.1 keeps its own copy of each document (updated at every didChange) and
    # hands the handler over through a generator; here the handler is called plainly
    # and `ExlspServer.documents` is the one copy.
    @lsp_method(types.TEXT_DOCUMENT_DID_OPEN)
    def lsp_text_document__did_open(self, params: types.DidOpenTextDocumentParams) -> Any:
        if (handler := self.fm.features.get(types.TEXT_DOCUMENT_DID_OPEN)) is not None:
            handler(params)

    @lsp_method(types.TEXT_DOCUMENT_DID_CHANGE)
    def lsp_text_document__did_change(self, params: types.DidChangeTextDocumentParams) -> Any:
        if (handler := self.fm.features.get(types.TEXT_DOCUMENT_DID_CHANGE)) is not None:
            handler(params)

    @lsp_method(types.TEXT_DOCUMENT_DID_CLOSE)
    def lsp_text_document__did_close(self, params: types.DidCloseTextDocumentParams) -> Any:
        if (handler := self.fm.features.get(types.TEXT_DOCUMENT_DID_CLOSE)) is not None:
            handler(params)

    def _execute_handler(
        self,
        msg_id: Any,
        handler: Any,
        callback: Any,
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
    ) -> None:
        """pygls' handler call, with the handler's future dropped once it is done.

        pygls files the future of every handler that is a coroutine, a generator or
        a thread function under its message id, and drops it only when a request is
        answered: notifications (ids made up per call) would pile up one future per
        keystroke, for the life of the server.
        """

        def done(future: Any) -> None:
            if self._request_futures.get(msg_id) is future:
                del self._request_futures[msg_id]
            callback(future)

        super()._execute_handler(msg_id, handler, done, args, kwargs)

    # pygls tells requests, notifications and responses apart with isinstance checks
    # against runtime protocols, which cost tens of microseconds each on Python 3.11,
    # three times per message on every keystroke. The answer depends only on the
    # message's class (attrs classes: every field is always set), so it is kept.
    _kinds: ClassVar[dict[type, str]] = {}

    @classmethod
    def _kind(cls, message: Any) -> str:
        kind = cls._kinds.get(type(message))
        if kind is None:
            if isinstance(message, RPCRequest):
                kind = "request"
            elif isinstance(message, RPCNotification):
                kind = "notification"
            elif isinstance(message, RPCResponse):
                kind = "response"
            else:
                kind = "error"
            if len(cls._kinds) < 512:
                cls._kinds[type(message)] = kind
        return kind

    def handle_message(self, message: Any) -> None:
        """pygls' dispatch (same order, same checks), with the message kind cached."""
        if message.jsonrpc != self.VERSION:
            log.warning('Unknown message "%s"', message)
            return
        kind = self._kind(message)
        method = getattr(message, "method", "")
        if self._shutdown_request is not None and method != types.EXIT:
            # Responses to what shutdown cancelled, and notifications, are dropped.
            if kind == "request":
                self._refuse(message.id, f"{method}: the server is shutting down")
            return
        if kind == "request" and method == types.INITIALIZE:
            if self._initialize_seen:
                self._refuse(message.id, "initialize: the server is already initialized")
                return
            self._initialize_seen = True
        elif kind == "request" and not self._initialize_seen:
            # Before `initialize` nothing is answered but an error (the spec's -32002):
            # `exlsp/stats`, say, shows the last prompt, which is the user's code.
            error = JsonRpcException(f"{method}: not initialized", code=-32002)
            self._send_response(message.id, None, error.to_response_error())
            return
        ctx = contextvars.copy_context()
        if kind == "request":
            ctx.run(self._handle_request, message.id, message.method, message.params)
        elif kind == "notification":
            ctx.run(self._handle_notification, message.method, message.params)
        elif kind == "response":
            ctx.run(self._handle_response, message.id, message.result)
        else:
            ctx.run(self._handle_response, message.id, None, message.error)

    def _refuse(self, msg_id: Any, message: str) -> None:
        self._send_response(msg_id, None, JsonRpcInvalidRequest(message).to_response_error())

    def send_error_without_id(self, error: JsonRpcException) -> None:
        """Answer a body whose id cannot be known (not JSON, not a message): id null."""
        body = {"code": error.code, "message": error.message}
        self._send_data({"jsonrpc": self.VERSION, "id": None, "error": body})

    @lsp_method(types.SHUTDOWN)
    def lsp_shutdown(self, *args: Any) -> Any:
        """pygls' shutdown, with the other in-flight work cancelled first, over a copy.

        Cancelling a concurrent future runs its done-callbacks at once, and
        `_execute_handler`'s callback deletes the entry: pygls' loop over the dict
        itself failed ("dictionary changed size during iteration"). Cancelling
        first also keeps a still-running `initialized` from starting a model
        after the shutdown handler stopped it.
        """
        current = self.msg_id
        own = self._request_futures.get(current) if current is not None else None
        self._shutdown_request = own or _done_future()
        for msg_id, future in list(self._request_futures.items()):
            if msg_id != current and not future.done():
                future.cancel()
        if (user_handler := self.fm.features.get(types.SHUTDOWN)) is not None:
            yield user_handler, args, None
        self._shutdown = True
        return None

    @lsp_method(types.EXIT)
    def lsp_exit(self, *args: Any) -> Any:
        """pygls' exit, after the answer to a `shutdown` that is still running."""
        self._exiting = True
        pending = self._shutdown_request
        if pending is not None and not pending.done():
            yield _wait_for, (pending,), None
        yield from super().lsp_exit(*args)

    async def finish_exit(self, timeout: float = EXIT_WAIT_S) -> None:
        """The input ended: an `exit` received before its end still ends the process.

        Editors close the pipe right after writing `exit`, often in the same write
        as `shutdown`. The loop's end would cancel a `shutdown` still running (its
        answer became -32800 and the exit code 1): wait, at most `timeout`, for
        `exit` to end the process (SystemExit, with 0 after the answer)."""
        limit = time.monotonic() + timeout
        while self._exiting and time.monotonic() < limit:
            await asyncio.sleep(0.01)

    def _handle_cancel_notification(self, msg_id: Any) -> None:
        # Editors cancel the previous inline request at every keystroke, often after
        # it was answered: an unknown id is the normal case, not worth a warning.
        if msg_id in self._request_futures:
            super()._handle_cancel_notification(msg_id)

    def structure_message(self, data: dict[str, Any]) -> Any:
        try:
            return super().structure_message(data)
        except Exception:
            if isinstance(data, dict) and "id" in data and "method" in data:
                error = JsonRpcInvalidParams(f"invalid params for {data.get('method')}")
                self._send_response(data["id"], None, error.to_response_error())
            # handle_message ignores a message whose jsonrpc is not "2.0".
            return pytypes.SimpleNamespace(jsonrpc="invalid")


def _done_future() -> Any:
    future: Future[None] = Future()
    future.set_result(None)
    return future


async def _wait_for(future: Any) -> None:
    # The request's callbacks (which send its answer) run before this wakes up.
    with contextlib.suppress(BaseException):
        await asyncio.wrap_future(future)


class _UnjoinedExecutor(ThreadPoolExecutor):
    """The event loop's executor, whose shutdown does not wait for its threads."""

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        super().shutdown(wait=False, cancel_futures=True)


class PipeReader:
    """stdin as an asyncio stream: what pygls' message loop reads from."""

    def __init__(self, stream: asyncio.StreamReader) -> None:
        self._stream = stream

    @classmethod
    async def open(cls, pipe: BinaryIO) -> PipeReader:
        loop = asyncio.get_running_loop()
        stream = asyncio.StreamReader(limit=1 << 20)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stream), pipe)
        return cls(stream)

    async def readline(self) -> bytes:
        try:
            return await self._stream.readline()
        except ValueError:  # a header line over the limit: not LSP; end like EOF
            return b""

    async def readexactly(self, n: int) -> bytes:
        try:
            return await self._stream.readexactly(n)
        except asyncio.IncompleteReadError:  # EOF inside a body: the client is gone
            return b""


class ProtocolServer(LanguageServer):
    """pygls' LanguageServer with its transports replaced (stdio read on the event
    loop, one TCP client at a time, a body that is not JSON-RPC answered)."""

    exit_code = 0
    _stop_event: threading.Event

    def start_io(self, stdin: BinaryIO | None = None, stdout: BinaryIO | None = None) -> None:
        """Serve LSP on stdio, reading stdin on the event loop.

        pygls reads stdin through its thread pool, one hand-off per header line and
        one per body: three thread round trips per message, on every keystroke. A
        pipe read by the event loop needs none. Where stdin is not a pipe (a file,
        say), pygls' own reader is used.
        """
        stdin = stdin or sys.stdin.buffer
        stop = self._stop_event = threading.Event()
        self.protocol.set_writer(StdoutWriter(stdout or sys.stdout.buffer))

        async def serve() -> None:
            # After `exit`, asyncio.run would join the default executor's threads:
            # an `import transformers` still running from `initialized` held the
            # exit for seconds. Nothing left there matters once `shutdown` was answered.
            asyncio.get_running_loop().set_default_executor(_UnjoinedExecutor())
            reader: Any
            try:
                reader = await PipeReader.open(stdin)
            except (ValueError, OSError):
                reader = StdinAsyncReader(stdin, self.thread_pool)
            await self.read_messages(reader, stop)
            await cast(ExlspProtocol, self.protocol).finish_exit()

        try:
            asyncio.run(serve())
        except BrokenPipeError:
            log.error("the connection to the client is lost; shutting down")
        except SystemExit as e:  # the client's `exit`: 0 after `shutdown`, 1 without
            self.exit_code = e.code if isinstance(e.code, int) else 1
        except KeyboardInterrupt:
            pass
        finally:
            self.shutdown()

    async def read_messages(self, reader: Any, stop: threading.Event) -> None:
        """pygls' message loop (`run_async`), with a body that is not a JSON-RPC
        message answered as the spec says (-32700 or -32600, id null) instead of
        dropped: JSON nested thousands deep fails with RecursionError, not ValueError."""
        protocol = cast(ExlspProtocol, self.protocol)
        length = 0
        while not stop.is_set():
            header = await reader.readline()
            if not header:
                break
            if not length and (match := _CONTENT_LENGTH.fullmatch(header)):
                length = int(match.group(1))
            if not (length and not header.strip()):
                continue
            body = await reader.readexactly(length)
            length = 0
            if not body:
                break
            try:
                message = json.loads(body, object_hook=protocol.structure_message)
            except (ValueError, RecursionError) as e:
                log.warning("a message that is not JSON was answered -32700: %s", e)
                protocol.send_error_without_id(JsonRpcParseError(f"not JSON: {e}"))
                continue
            if not hasattr(message, "jsonrpc"):  # a list, a number, an object without it
                log.warning("a message that is not JSON-RPC was answered -32600")
                protocol.send_error_without_id(JsonRpcInvalidRequest("not a JSON-RPC message"))
                continue
            try:
                protocol.handle_message(message)
            except Exception as exc:
                log.exception("Unable to handle message")
                self.report_server_error(exc, JsonRpcException)

    def start_tcp(self, host: str, port: int) -> None:
        """Serve LSP over TCP to one client at a time.

        pygls hands every connection the same protocol (its writer replaced by the
        newest), so a second client would read the first one's answers and could
        change its settings. A connection made while a client is served is closed at
        once; the server ends when its client leaves, as over stdio.
        """
        self._stop_event = stop = threading.Event()
        busy = False
        listener: asyncio.Server | None = None

        async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal busy
            peer = writer.get_extra_info("peername")
            if busy:
                log.warning("refused a second connection from %s: one client per server", peer)
                writer.close()
                return
            busy = True
            log.info("client connected from %s", peer)
            self.protocol.set_writer(writer)
            try:
                await self.read_messages(reader, stop)
                await cast(ExlspProtocol, self.protocol).finish_exit()
            except SystemExit as e:  # the client's `exit`: 0 after `shutdown`, 1 without
                self.exit_code = e.code if isinstance(e.code, int) else 1
            if listener is not None:
                listener.close()

        async def serve() -> None:
            nonlocal listener
            listener = await asyncio.start_server(connection, host, port)
            log.info("listening on %s:%s", host, port)
            async with listener:
                with contextlib.suppress(asyncio.CancelledError):
                    await listener.serve_forever()

        try:
            asyncio.run(serve())
        except KeyboardInterrupt:
            pass
        finally:
            self.shutdown()
