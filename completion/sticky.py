"""Sticky snippets: retrieved context that changes only when it must.

A changed snippet invalidates the KV cache of everything after it, so the
snippets of a document are refreshed when the cursor moves far or the editor
is idle, never per keystroke.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from exlsp.completion.config import CompletionConfig
from exlsp.completion.types import ContextSource, DocumentView, Snippet

log = logging.getLogger(__name__)

RefreshCallback = Callable[[DocumentView], None]


@dataclass
class _StickyEntry:
    line: int
    snippets: list[Snippet]
    view: DocumentView  # the latest request in this document
    last_seen: float
    idle_timer: asyncio.TimerHandle | None = None


class StickySnippets:
    """Snippets per document, changed only when the cursor moves far or while idle.

    A changed snippet invalidates the KV cache of everything after it, so the
    snippets of a document stay fixed while the user types. They are fetched
    again when a request lands `snippetRefreshLines` away from where they were
    fetched (the prompt changes anyway: the request waits for them), and when
    the editor has been idle for `snippetRefreshIdleMs` (in the background; the
    new snippets are kept only if no request came meanwhile, and `on_refresh`
    lets the engine prefill the new prompt before the user types again).

    A fetch runs as a task of its own: a request cancelled while waiting for it
    (the user typed on) leaves it running, and the next request waits for the
    same fetch instead of starting another one.
    """

    def __init__(
        self,
        source: ContextSource,
        config: CompletionConfig,
        on_refresh: RefreshCallback | None = None,
    ) -> None:
        self.source = source
        self.config = config
        self.on_refresh = on_refresh
        self._by_uri: OrderedDict[str, _StickyEntry] = OrderedDict()
        self._fetching: dict[str, tuple[int, asyncio.Task[list[Snippet]]]] = {}

    async def get(self, doc: DocumentView) -> list[Snippet]:
        entry = self._by_uri.get(doc.uri)
        if entry is None or abs(doc.line - entry.line) >= self.config.snippetRefreshLines:
            snippets = await asyncio.shield(self._fetch(doc))
            entry = self._store(doc, snippets)
        entry.view = doc
        entry.last_seen = time.monotonic()
        self._by_uri.move_to_end(doc.uri)
        self._arm_idle(entry)
        return entry.snippets

    def _fetch(self, doc: DocumentView) -> asyncio.Task[list[Snippet]]:
        """The fetch for `doc`'s place: the one in flight near it, or a new one."""
        running = self._fetching.get(doc.uri)
        if running is not None and abs(running[0] - doc.line) < self.config.snippetRefreshLines:
            return running[1]
        # The fetch reads the document on another thread: give it a copy of the lines.
        view = dataclasses.replace(doc, lines=list(doc.lines))
        task = asyncio.get_running_loop().create_task(self._query(view))
        self._fetching[doc.uri] = (doc.line, task)
        task.add_done_callback(functools.partial(self._fetched, doc.uri))
        return task

    def _fetched(self, uri: str, task: asyncio.Task[list[Snippet]]) -> None:
        if self._fetching.get(uri, (0, None))[1] is task:
            del self._fetching[uri]

    async def _query(self, doc: DocumentView) -> list[Snippet]:
        try:
            return list(await self.source.snippets(doc, self.config.snippetTokens * 4))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("context source failed; continuing without snippets")
            entry = self._by_uri.get(doc.uri)
            return entry.snippets if entry else []

    def _store(self, doc: DocumentView, snippets: list[Snippet]) -> _StickyEntry:
        entry = self._by_uri.get(doc.uri)
        if entry is None:
            entry = _StickyEntry(doc.line, snippets, doc, time.monotonic())
            self._by_uri[doc.uri] = entry
            while len(self._by_uri) > 64:
                self._drop(next(iter(self._by_uri)))
        else:
            entry.line = doc.line
            entry.snippets = snippets
        return entry

    # -- refresh while idle ------------------------------------------------------

    def _arm_idle(self, entry: _StickyEntry) -> None:
        if entry.idle_timer is not None:
            entry.idle_timer.cancel()
        entry.idle_timer = asyncio.get_running_loop().call_later(
            self.config.snippetRefreshIdleMs / 1000, self._idle, entry.view.uri
        )

    def _idle(self, uri: str) -> None:
        entry = self._by_uri.get(uri)
        if entry is None:
            return
        entry.idle_timer = None
        asked = entry.last_seen
        task = self._fetch(entry.view)

        def done(t: asyncio.Task[list[Snippet]]) -> None:
            if t.cancelled() or t.exception() is not None:
                return
            current = self._by_uri.get(uri)
            # A request since the fetch began: the user is typing; keep the prompt stable.
            if current is not entry or entry.last_seen != asked:
                return
            snippets = t.result()
            if snippets == entry.snippets:
                return
            entry.line = entry.view.line
            entry.snippets = snippets
            if self.on_refresh is not None:
                self.on_refresh(entry.view)

        task.add_done_callback(done)

    def current(self, uri: str) -> list[Snippet]:
        entry = self._by_uri.get(uri)
        return entry.snippets if entry else []

    def _drop(self, uri: str) -> None:
        entry = self._by_uri.pop(uri, None)
        if entry is not None and entry.idle_timer is not None:
            entry.idle_timer.cancel()

    def forget(self, uri: str) -> None:
        self._drop(uri)
        running = self._fetching.pop(uri, None)
        if running is not None:
            running[1].cancel()

    def close(self) -> None:
        for uri in list(self._by_uri):
            self.forget(uri)
        for _, task in self._fetching.values():
            task.cancel()
        self._fetching.clear()
