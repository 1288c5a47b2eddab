"""The exlsp language server: state shared by the features, and the factory."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import logging
import sys
import threading
import time
import types as pytypes
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

from lsprotocol import types
from pygls.exceptions import JsonRpcInvalidParams
from pygls.io_ import StdinAsyncReader, StdoutWriter, run_async
from pygls.lsp.server import LanguageServer
from pygls.protocol import LanguageServerProtocol
from pygls.protocol.json_rpc import RPCNotification, RPCRequest, RPCResponse
from pygls.protocol.language_server import lsp_method
from pygls.uris import to_fs_path

from exlsp.completion.service import CompletionService
from exlsp.completion.types import CompletionResult, DocumentView, Trigger
from exlsp.server.config import Config, level_number
from exlsp.server.documents import DocumentStore, PositionError

log = logging.getLogger(__name__)

try:
    __version__ = metadata.version("exlsp")
except metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

ENCODINGS = {
    types.PositionEncodingKind.Utf8: "utf-8",
    types.PositionEncodingKind.Utf16: "utf-16",
    types.PositionEncodingKind.Utf32: "utf-32",
}


class ExlspProtocol(LanguageServerProtocol):
    """pygls' protocol with two changes.

    - Open documents live in `ExlspServer.documents` (LSP-conformant lines,
      incremental edits by line); pygls' own copy is not kept.
    - A request whose params do not deserialize is answered with -32602
      instead of being dropped.
    """

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
        if self._shutdown and getattr(message, "method", "") != types.EXIT:
            log.warning("Server shutting down. No more requests!")
            return
        ctx = contextvars.copy_context()
        kind = self._kind(message)
        if kind == "request":
            ctx.run(self._handle_request, message.id, message.method, message.params)
        elif kind == "notification":
            ctx.run(self._handle_notification, message.method, message.params)
        elif kind == "response":
            ctx.run(self._handle_response, message.id, message.result)
        else:
            ctx.run(self._handle_response, message.id, None, message.error)

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
            reader: Any
            try:
                reader = await PipeReader.open(stdin)
            except (ValueError, OSError):
                reader = StdinAsyncReader(stdin, self.thread_pool)
            await run_async(
                stop_event=stop,
                reader=reader,
                protocol=self.protocol,
                logger=log,
                error_handler=self.report_server_error,
            )

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
        """The first workspace folder (or the root URI) as a local directory."""
        uri = self._root_uri()
        path = to_fs_path(uri) if uri else None
        return Path(path) if path and Path(path).is_dir() else None

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

    # -- model lifecycle --------------------------------------------------------

    def start_model(self) -> None:
        """(Re)load the model in the background; requests meanwhile answer empty."""
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        old, self.service = self.service, None
        if old is not None:
            # What was frozen after the last load (see _report_load) holds the old
            # model (and a replaced index): hand it back to the collector and collect
            # now, or its reference cycles would stay, frozen again after this load.
            # A reload is rare and its completions answer empty anyway.
            gc.unfreeze()
            old.close()
            del old
            gc.collect()
        self.service = CompletionService(self.config.engine(), self.context_source)
        self._load_task = asyncio.get_running_loop().create_task(self._load(self.service))

    async def _load(self, service: CompletionService) -> None:
        self.send_status("loading", "loading the model")
        await service.start()
        if service is not self.service:
            return  # replaced by a newer load
        self._report_load(service)

    def _report_load(self, service: CompletionService) -> None:
        if service.state == "ready":
            # The imports and the model are here for good: later collections skip
            # them. (About 500,000 objects; a full collection over them took 0.29 s
            # on a 2-core machine, and one can fall in the middle of a keystroke.)
            gc.freeze()
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
        log.log(logging.ERROR if kind == types.MessageType.Error else logging.WARNING, message)
        if message in self._shown:
            return
        self._shown.add(message)
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
                "backend": self.config.model.backend,
                "lastLatencyMs": self.last_latency_ms,
            },
        )

    def apply_logging(self) -> None:
        root = logging.getLogger("exlsp")
        root.setLevel(level_number(self.config.logging.level))
        self.client_log.setLevel(max(logging.INFO, level_number(self.config.logging.level)))
        if self.client_log not in root.handlers:
            root.addHandler(self.client_log)


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
