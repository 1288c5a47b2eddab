"""The workspace index: started after `initialized`, fed by file events and edits,
reporting `$/progress`; its retriever is the completion engine's context source."""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import TYPE_CHECKING

from lsprotocol import types

from exlsp.server.lsp import ExlspServer

if TYPE_CHECKING:  # imported when indexing starts
    from exlsp.index.service import ProgressEvent

log = logging.getLogger(__name__)

_WATCH_ID = "exlsp-watched-files"


def _completions_busy(ls: ExlspServer) -> bool:
    """The completion backend runs or queues a job (heavy index work waits meanwhile)."""
    service = ls.service
    worker = service.worker if service is not None else None
    return worker is not None and not worker.idle


def _client_watches_files(ls: ExlspServer) -> bool:
    ws = ls.client_capabilities.workspace
    watched = ws.did_change_watched_files if ws else None
    return bool(watched and watched.dynamic_registration)


class ProgressReporter:
    """Index progress (from the index thread) as `$/progress` on the event loop."""

    def __init__(self, ls: ExlspServer, loop: asyncio.AbstractEventLoop) -> None:
        self.ls = ls
        self.loop = loop
        self.supported = bool(
            ls.client_capabilities.window and ls.client_capabilities.window.work_done_progress
        )
        self._tokens: dict[str, str] = {}

    def __call__(self, event: ProgressEvent) -> None:
        if self.loop.is_closed():
            return
        if event.kind == "end":
            # A pass is over and the embedder loaded: its imports and weights stay,
            # so keep them out of full collections too (see ExlspServer._report_load).
            self.loop.call_soon_threadsafe(gc.freeze)
        if self.supported:
            self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self._send(event)))

    async def _send(self, event: ProgressEvent) -> None:
        progress = self.ls.work_done_progress
        try:
            if event.kind == "begin":
                token = f"exlsp-{event.token}-{id(event)}"
                self._tokens[event.token] = token
                # Shielded: cancelling an await on a client request upsets pygls 2.1.
                await asyncio.shield(progress.create_async(token))
                progress.begin(
                    token,
                    types.WorkDoneProgressBegin(
                        title=event.title, message=event.message, percentage=event.percentage
                    ),
                )
                return
            known = self._tokens.get(event.token)
            if known is None:
                return
            token = known
            if event.kind == "report":
                progress.report(
                    token,
                    types.WorkDoneProgressReport(
                        message=event.message, percentage=event.percentage
                    ),
                )
            else:
                progress.end(token, types.WorkDoneProgressEnd(message=event.message))
                self._tokens.pop(event.token, None)
        except Exception as e:
            log.debug("progress not sent: %s", e)


async def start_index(ls: ExlspServer) -> None:
    """Start (or restart) the index for the workspace; no-op when disabled or no root."""
    await stop_index(ls)
    config = ls.config.index
    root = ls.workspace_root()
    if not config.enabled or root is None:
        ls.context_source = None
        return
    from exlsp.completion.host import host_embedder
    from exlsp.index.embed import embedder_settings
    from exlsp.index.retrieve import WorkspaceRetriever
    from exlsp.index.service import WorkspaceIndex

    editor_events = _client_watches_files(ls)
    if editor_events:
        try:
            await asyncio.shield(
                ls.client_register_capability_async(
                    types.RegistrationParams(
                        registrations=[
                            types.Registration(
                                id=_WATCH_ID,
                                method=types.WORKSPACE_DID_CHANGE_WATCHED_FILES,
                                register_options=types.DidChangeWatchedFilesRegistrationOptions(
                                    watchers=[types.FileSystemWatcher(glob_pattern="**/*")]
                                ),
                            )
                        ]
                    )
                )
            )
        except Exception as e:
            log.warning("the client refused file watching (%s); using watchdog", e)
            editor_events = False
    reporter = ProgressReporter(ls, asyncio.get_running_loop())

    def failed(reason: str) -> None:  # on the index thread
        message = f"exlsp: indexing failed: {reason}"
        reporter.loop.call_soon_threadsafe(ls.show_once, message, types.MessageType.Warning)

    try:
        index = WorkspaceIndex(
            root,
            config,
            reporter,
            use_watchdog=not editor_events,
            # The embedding model in the model host (None: loaded here).
            embedder=host_embedder(ls.config.model, embedder_settings(config)),
            busy=lambda: _completions_busy(ls),
            on_failure=failed,
        )
        index.start()
    except Exception as e:
        ls.show_once(f"exlsp: the workspace index is disabled: {e}", types.MessageType.Warning)
        ls.context_source = None
        return
    ls.index = index
    ls.context_source = WorkspaceRetriever(index, config)
    log.info("indexing %s (%s)", root, "editor file events" if editor_events else "watchdog")


async def stop_index(ls: ExlspServer) -> None:
    """Stop the running index, if any."""
    index, ls.index = ls.index, None
    if index is not None:
        # Stopping waits for the worker's current write: not on the event loop.
        await asyncio.to_thread(index.stop)


async def restart_index(ls: ExlspServer) -> None:
    """Start the index again (new settings, new root) and hand its retriever to the engine."""
    await start_index(ls)
    if ls.service is not None:
        ls.service.set_context(ls.context_source)


def register(server: ExlspServer) -> None:
    @server.feature(types.WORKSPACE_DID_CHANGE_WORKSPACE_FOLDERS)
    async def did_change_workspace_folders(
        ls: ExlspServer, params: types.DidChangeWorkspaceFoldersParams
    ) -> None:
        # pygls has updated the folders. The index, the prompt's paths and the model's
        # context all follow the first folder; the index moves only when that changes.
        root = ls.workspace_root()
        indexed = ls.index.root if ls.index is not None else None
        if ls.initialized and root != indexed:
            log.info("workspace folders changed: indexing %s", root or "nothing")
            await restart_index(ls)

    @server.feature(types.WORKSPACE_DID_CHANGE_WATCHED_FILES)
    def did_change_watched_files(
        ls: ExlspServer, params: types.DidChangeWatchedFilesParams
    ) -> None:
        if ls.index is not None:
            ls.index.file_events((c.uri, int(c.type)) for c in params.changes)
