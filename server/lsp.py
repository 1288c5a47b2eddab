"""The exlsp language server: state shared by the features, and the factory."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from lsprotocol import types
from pygls.exceptions import JsonRpcInvalidParams
from pygls.uris import to_fs_path

from exlsp.completion.assist.assistant import Assistant
from exlsp.completion.assist.service import AssistService
from exlsp.completion.service import CompletionService
from exlsp.completion.types import CompletionResult, ContextSource, DocumentView, Trigger
from exlsp.server.config import LOG_FORMAT, Config, level_number
from exlsp.server.documents import DocumentStore, PositionError
from exlsp.server.protocol import ExlspProtocol, ProtocolServer

if TYPE_CHECKING:  # imported when indexing starts (numpy, lancedb)
    from exlsp.index.service import WorkspaceIndex

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


class ExlspServer(ProtocolServer):
    def __init__(self) -> None:
        super().__init__("exlsp", __version__, protocol_cls=ExlspProtocol)
        self.documents = DocumentStore()
        self.config = Config()
        self.service: CompletionService | None = None
        self.assist: AssistService | None = None  # the model behind hover and code actions
        # The index, when indexing, and its retriever: the engine's context source.
        self.index: WorkspaceIndex | None = None
        self.context_source: ContextSource | None = None
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
