"""The exlsp language server: state shared by the features, and the factory."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import json
import logging
import os
import re
import sys
import threading
import time
import types as pytypes
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
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
from pygls.uris import to_fs_path

from exlsp.completion.assist import Assistant, AssistService
from exlsp.completion.service import CompletionService
from exlsp.completion.types import CompletionResult, DocumentView, Trigger
from exlsp.server.config import LOG_FORMAT, Config, level_number
from exlsp.server.documents import DocumentStore, PositionError

log = logging.getLogger(__name__)

try:
    __version__ = metadata.version("exlsp")
except metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

_CONTENT_LENGTH = re.compile(rb"^Content-Length: (\d+)\r\n$")

ENCODINGS = {
    types.PositionEncodingKind.Utf8: "utf-8",
    types.PositionEncodingKind.Utf16: "utf-16",
    types.PositionEncodingKind.Utf32: "utf-32",
}


class ExlspProtocol(LanguageServerProtocol):
    """pygls' protocol with these changes.

    - Open documents live in `ExlspServer.documents` (LSP-conformant lines,
      incremental edits by line); pygls' own copy is not kept.
    - A request whose params do not deserialize is answered with -32602
      instead of being dropped.
    - The lifecycle as the spec has it: a second `initialize` and every request
      after `shutdown` are refused with -32600, and an `exit` that arrives while
      `shutdown` still runs (Helix sends both in one write) waits for its answer.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._initialize_seen = False
        # The `shutdown` request's future, from its arrival: from then on only `exit` is served.
        self._shutdown_request: Any = None

    # Plain calls, not pygls' generator hand-off: a didChange comes with every keystroke.
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
        pending = self._shutdown_request
        if pending is not None and not pending.done():
            yield _wait_for, (pending,), None
        yield from super().lsp_exit(*args)

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
    from concurrent.futures import Future

    future: Future[None] = Future()
    future.set_result(None)
    return future


async def _wait_for(future: Any) -> None:
    # The request's callbacks (which send its answer) run before this wakes up.
    with contextlib.suppress(BaseException):
        await asyncio.wrap_future(future)


class ClientLogHandler(logging.Handler):
    """Forwards log records to the client as `window/logMessage`."""

    _TYPES: ClassVar[dict[int, types.MessageType]] = {
        logging.ERROR: types.MessageType.Error,
        logging.WARNING: types.MessageType.Warning,
        logging.INFO: types.MessageType.Info,
    }

    def __init__(self, server: ExlspServer) -> None:
        super().__init__()
        self.server = server

    def emit(self, record: logging.LogRecord) -> None:
        loop = self.server.event_loop
        if not self.server.initialized or loop is None or loop.is_closed():
            return
        if threading.get_ident() != self.server.loop_thread:
            # Records from the backend or index threads: send from the event loop.
            loop.call_soon_threadsafe(self.emit, record)
            return
        kind = self._TYPES.get(record.levelno, types.MessageType.Log)
        if record.levelno >= logging.ERROR:
            kind = types.MessageType.Error
        with contextlib.suppress(Exception):  # the transport may be gone at exit
            self.server.window_log_message(
                types.LogMessageParams(type=kind, message=self.format(record))
            )


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


class ExlspServer(LanguageServer):
    def __init__(self) -> None:
        super().__init__("exlsp", __version__, protocol_cls=ExlspProtocol)
        self.documents = DocumentStore()
        self.config = Config()
        self.service: CompletionService | None = None
        self.assist: AssistService | None = None  # the model behind hover and code actions
        self.context_source: Any = None  # the index's retriever, when indexing
        self.index: Any = None  # exlsp.index.service.WorkspaceIndex
        self.index_changed = False
        self.initialized = False
        self.event_loop: asyncio.AbstractEventLoop | None = None
        self.loop_thread: int | None = None
        self._load_task: asyncio.Task[None] | None = None
        self._shown: set[str] = set()
        self._backend_problem: str | None = None
        self.last_latency_ms: float | None = None
        self._prompt_paths: dict[tuple[str, str | None], str] = {}
        self.exit_code = 0
        self.client_log = ClientLogHandler(self)
        self.log_file: logging.FileHandler | None = None  # from `logging.file`
        self.log_file_from_command_line = False
        self.client_log.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    # -- transport ----------------------------------------------------------------

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

    # -- positions and documents ------------------------------------------------

    @property
    def encoding(self) -> str:
        try:
            kind = self.workspace.position_encoding
        except Exception:
            return "utf-16"
        if kind is None:
            return "utf-16"
        return ENCODINGS.get(types.PositionEncodingKind(kind), "utf-16")

    def document_view(self, uri: str, position: types.Position) -> DocumentView:
        doc = self.documents.get(uri)
        if doc is None:
            raise JsonRpcInvalidParams(f"unknown document {uri}; open it first")
        try:
            line, character = doc.char_position(position.line, position.character, self.encoding)
        except PositionError as e:
            raise JsonRpcInvalidParams(str(e)) from None
        return DocumentView(
            uri=uri,
            lines=doc.lines,
            line=line,
            character=character,
            language=doc.language,
            path=self.prompt_path(uri),
            version=doc.version,
        )

    def _root_uri(self) -> str | None:
        try:
            folders = self.workspace.folders
            root_uri = self.workspace.root_uri
        except Exception:
            return None
        return next(iter(folders.values())).uri if folders else root_uri

    def workspace_root(self) -> Path | None:
        """The first workspace folder (or the root URI) as a local directory, resolved.

        None where there is none, and where it is the file system's root or the home
        directory itself: the index never walks those."""
        uri = self._root_uri()
        path = to_fs_path(uri) if uri else None
        if not path or not Path(path).is_dir():
            return None
        root = Path(path).resolve()
        if root == Path(root.anchor) or root == Path.home().resolve():
            self.show_once(
                f"exlsp: not indexing {root}: open a project folder, not the file system's"
                " root or your home directory",
                types.MessageType.Warning,
            )
            return None
        return root

    def prompt_path(self, uri: str) -> str:
        """The document's path as the model and the index see it: relative to the
        workspace root when inside it (as retrieved snippets' paths are), else absolute.

        Asked at every keystroke; kept per (document, workspace root)."""
        key = (uri, self._root_uri())
        path = self._prompt_paths.get(key)
        if path is None:
            if len(self._prompt_paths) >= 1024:
                self._prompt_paths.clear()
            path = self._prompt_paths[key] = self._relative_path(uri)
        return path

    def _relative_path(self, uri: str) -> str:
        path = to_fs_path(uri) or uri
        root = self.workspace_root()
        if root is not None:
            with contextlib.suppress(ValueError):
                return Path(path).relative_to(root).as_posix()
        return path

    # -- completions ------------------------------------------------------------

    async def complete(
        self,
        view: DocumentView,
        position: types.Position,
        trigger: Trigger = Trigger.AUTOMATIC,
    ) -> CompletionResult:
        """Run the engine for one request; shared by inline and fallback completion."""
        from exlsp.completion.types import CompletionRequest

        service = self.service
        if service is None:
            return CompletionResult(error="model not loaded")
        if self.secret_document(view.uri):
            return CompletionResult()

        def on_partial(text: str) -> None:
            self.protocol.notify(
                "exlsp/partialCompletion",
                {
                    "uri": view.uri,
                    "position": {"line": position.line, "character": position.character},
                    "text": text,
                },
            )

        t0 = time.perf_counter()
        result = await service.complete(CompletionRequest(view, trigger), on_partial)
        self.last_latency_ms = (time.perf_counter() - t0) * 1000
        if result.error and result.stats.source == "error":
            # The backend cannot serve now (a remote server is down): one status per
            # change of problem and one popup per distinct problem, not one per keystroke.
            if result.error != self._backend_problem:
                self._backend_problem = result.error
                self.show_once(f"exlsp: {result.error}", types.MessageType.Warning)
                self.send_status("error", result.error)
        elif result.suggestions or (
            self._backend_problem is not None and result.stats.source == "model"
        ):
            self._backend_problem = None
            self.send_status("ready", "")  # carries the latency to status bars
        return result

    def secret_document(self, uri: str) -> bool:
        """The document holds a secret (by its name, its link's target or its content):
        nothing of it goes to a model, a prompt, the index or a log. Said once."""
        doc = self.documents.get(uri)
        if doc is None or doc.secret is None:
            return False
        self.show_once(
            f"exlsp: no suggestions in {Path(to_fs_path(uri) or uri).name}: {doc.secret}",
            types.MessageType.Info,
        )
        return True

    # -- model lifecycle --------------------------------------------------------

    def start_model(self) -> None:
        """(Re)load the models in the background; requests meanwhile answer empty.

        The fallback chain starts again from its first model (a reload retries it)."""
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        old, self.service = self.service, None
        old_assist, self.assist = self.assist, None
        if old_assist is not None:
            old_assist.close()
        if old is not None:
            # What was frozen after the last load (see _report_load) holds the old
            # model (and a replaced index): hand it back to the collector and collect
            # now, or its reference cycles would stay, frozen again after this load.
            # A reload is rare and its completions answer empty anyway.
            gc.unfreeze()
            old.close()
            del old, old_assist
            gc.collect()
        service = self.service = CompletionService(self.config.engine(), self.context_source)
        service.on_change = lambda: self._report_load(service)
        service.on_notice = lambda m: self.show_once(f"exlsp: {m}", types.MessageType.Warning)
        self.assist = AssistService(service, self.config.assist.model_config())
        self._load_task = asyncio.get_running_loop().create_task(self._load(service))

    @property
    def assistant(self) -> Assistant | None:
        """What answers hover and code actions now (None: no model ready)."""
        return self.assist.assistant if self.assist is not None else None

    async def stop_model(self) -> None:
        """For `shutdown`: a load still running is abandoned, not waited for."""
        if self._load_task is not None:
            self._load_task.cancel()
        assist, self.assist = self.assist, None
        if assist is not None:
            await assist.aclose()
        service, self.service = self.service, None
        if service is not None:
            await service.aclose()

    async def _load(self, service: CompletionService) -> None:
        self.send_status("loading", "loading the model")
        await service.start()
        if not self._current(service):
            return  # replaced by a newer load
        self._report_load(service)
        assist = self.assist
        if assist is not None and assist.separate:
            # After the completion model: keystrokes matter first.
            await assist.start()
            if assist.error and self._current(service):
                self.show_once(
                    f"exlsp: the assist model could not be loaded ({assist.error});"
                    " hover and code actions use the completion model",
                    types.MessageType.Warning,
                )

    def _current(self, service: CompletionService) -> bool:
        return service is self.service

    def _report_load(self, service: CompletionService) -> None:
        if not self._current(service):
            return  # replaced by a newer load
        if service.state == "ready":
            # The imports and the model are here for good: later collections skip
            # them. (About 500,000 objects; a full collection over them took 0.29 s
            # on a 2-core machine, and one can fall in the middle of a keystroke.)
            gc.freeze()
            note = service.fallback_note()
            if note is not None:  # one message when a fallback takes over
                self.show_once(f"exlsp: {note}", types.MessageType.Warning)
            self.send_status("ready", f"model ready ({service.load_ms or 0:.0f} ms)")
        else:
            message = f"exlsp: the model could not be loaded: {service.error}"
            self.show_once(message)
            self.send_status("error", service.error or "model failed to load")

    async def wait_ready(self) -> None:
        if self._load_task is not None:
            await asyncio.shield(self._load_task)

    # -- messages to the user -----------------------------------------------------

    def show_once(self, message: str, kind: types.MessageType = types.MessageType.Error) -> None:
        """One popup per distinct problem, not a stream of them."""
        if message in self._shown:
            return
        self._shown.add(message)
        log.log(logging.ERROR if kind == types.MessageType.Error else logging.WARNING, message)
        self.window_show_message(types.ShowMessageParams(type=kind, message=message))

    def send_status(self, state: str, message: str = "") -> None:
        service = self.service
        self.protocol.notify(
            "exlsp/status",
            {
                "state": state,
                "message": message,
                "model": (
                    service.backend.info.path
                    if service and service.backend
                    else self.config.model.path or "default"
                ),
                "backend": (
                    service.serving_model.backend
                    if service and service.serving_model
                    else self.config.model.backend
                ),
                # What serves now, in words (a fallback, when the first could not).
                "serving": service.serving_label if service else None,
                "fallback": bool(service and service.serving),
                "lastLatencyMs": self.last_latency_ms,
            },
        )

    def apply_logging(self) -> None:
        """The configured level, the client's log, and `logging.file` (unless the
        command line's `--log-file` fixed the file: it takes precedence)."""
        root = logging.getLogger("exlsp")
        root.setLevel(level_number(self.config.logging.level))
        self.client_log.setLevel(max(logging.INFO, level_number(self.config.logging.level)))
        if self.client_log not in root.handlers:
            root.addHandler(self.client_log)
        if not self.log_file_from_command_line:
            self._open_log_file(self.config.logging.file)

    def _open_log_file(self, name: str) -> None:
        path = str(Path(name).expanduser()) if name else ""
        old = self.log_file
        if old is not None and old.baseFilename == (os.path.abspath(path) if path else ""):
            return
        root = logging.getLogger("exlsp")
        if old is not None:
            root.removeHandler(old)
            old.close()
            self.log_file = None
        if not path:
            return
        try:
            handler = logging.FileHandler(path, encoding="utf-8")
        except OSError as e:
            self.show_once(
                f"exlsp: cannot write the log file {path}: {e}", types.MessageType.Warning
            )
            return
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
        self.log_file = handler


def build_server() -> ExlspServer:
    """A server with every feature registered; nothing heavy happens until `initialized`."""
    from exlsp.server.features import (
        acceptance,
        code_actions,
        completion,
        configuration,
        documents,
        hover,
        indexing,
        inline,
        stats,
    )

    server = ExlspServer()
    features = (documents, configuration, indexing, inline, completion, hover, code_actions, stats)
    for feature in (*features, acceptance):
        feature.register(server)
    return server
