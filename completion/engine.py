"""The completion engine: one request in, one suggestion out, as little work as possible.

For each request, in order:

1. type-ahead: the user typed the beginning of a suggestion already made for
   this place; answer with the rest, no model call;
2. in-flight reuse: a generation for this place is running and agrees with
   what was typed since; wait for it instead of starting again;
3. otherwise build the prompt (sticky snippets, cache-stable layout) and
   submit a job to the backend worker (which cancels any older job), read the
   tokens as they stream, post-process them while streaming, stop the job as
   soon as a filter cuts, and keep the result for type-ahead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from exlsp.completion.backends.base import BackendUnavailable, GenerationJob
from exlsp.completion.config import CompletionConfig
from exlsp.completion.fim import FimTokens
from exlsp.completion.postprocess import FilterContext, decide_multiline, postprocess
from exlsp.completion.prompt import BuiltPrompt, PromptBuilder
from exlsp.completion.tokenizer import Tokenizer
from exlsp.completion.types import (
    CompletionRequest,
    CompletionResult,
    CompletionStats,
    ContextSource,
    DocumentView,
    NoContext,
    Snippet,
    Suggestion,
)
from exlsp.completion.worker import GenerationHandle, ModelWorker

log = logging.getLogger(__name__)

PartialCallback = Callable[[str], None]

_FILTER_WINDOW = 20  # lines before/after the cursor the filters look at
_LEFT_CONTEXT = 2000  # characters of the cursor line the filters look at


class InvalidPosition(ValueError):
    """The request points outside the document."""


def _eol_stripped(line: str) -> str:
    return line.rstrip("\r\n")


def filter_context(doc: DocumentView, multiline_mode: str = "auto") -> FilterContext:
    line = _eol_stripped(doc.lines[doc.line]) if doc.line < len(doc.lines) else ""
    left = line[: doc.character][-_LEFT_CONTEXT:]
    right = line[doc.character :][:_LEFT_CONTEXT]
    after = [_eol_stripped(s) for s in doc.lines[doc.line + 1 : doc.line + 1 + _FILTER_WINDOW]]
    before = [_eol_stripped(s) for s in doc.lines[max(0, doc.line - _FILTER_WINDOW) : doc.line]]
    if multiline_mode == "always":
        multiline = True
    elif multiline_mode == "never":
        multiline = False
    else:
        multiline = decide_multiline(left, right, doc.language)
    return FilterContext(
        line_prefix=left,
        line_suffix=right,
        lines_after=after,
        lines_before=before,
        language=doc.language,
        multiline=multiline,
    )


def accepted_view(doc: DocumentView, text: str) -> DocumentView:
    """`doc` after `text` was inserted at its cursor, the cursor after the insertion."""
    line = doc.lines[doc.line] if doc.line < len(doc.lines) else ""
    body = _eol_stripped(line)
    eol = line[len(body) :] or "\n"
    inserted = text.split("\n")
    new = [body[: doc.character] + inserted[0]]
    new += inserted[1:]
    new = [s + eol for s in new[:-1]] + [new[-1] + line[doc.character :]]
    lines = [*doc.lines[: doc.line], *new, *doc.lines[doc.line + 1 :]]
    row = doc.line + len(inserted) - 1
    col = (doc.character if len(inserted) == 1 else 0) + len(inserted[-1])
    return dataclasses.replace(doc, lines=lines, line=row, character=col)


def accepted_place(doc: DocumentView, text: str) -> tuple[PlaceKey, str]:
    """`place_key` and the cursor line's left text of `accepted_view(doc, text)`.

    From the lines near the cursor only: this runs at every keystroke that types
    along a suggestion, whatever the file's size.
    """
    lo = max(0, doc.line - _KEY_LINES_ABOVE)
    near = accepted_view(
        dataclasses.replace(doc, lines=list(doc.lines[lo : doc.line + 2]), line=doc.line - lo),
        text,
    )
    left = _eol_stripped(near.lines[near.line])[: near.character][-_LEFT_CONTEXT:]
    return place_key(near), left


# -- type-ahead ----------------------------------------------------------------

# A place is the text near the cursor, not the prompt's whole windows: a
# suggestion stays good after an edit further up, after the window's start
# moved, and after the cursor went elsewhere and came back.
PlaceKey = tuple[str, str, str]  # (uri, lines above, rest of the line + the line below)
_KEY_LINES_ABOVE = 3


def _place(uri: str, above: Sequence[str], right: str, below: str) -> PlaceKey:
    # Trailing blanks: editors strip them on Enter; they do not change what comes next.
    near = "\n".join(line.rstrip() for line in above[-_KEY_LINES_ABOVE:])
    return (uri, near, f"{right}\n{below.rstrip()}")


def place_key(doc: DocumentView) -> PlaceKey:
    """The type-ahead place of a request: lines just above, right of the cursor, line below."""
    above = [_eol_stripped(s) for s in doc.lines[max(0, doc.line - _KEY_LINES_ABOVE) : doc.line]]
    line = _eol_stripped(doc.lines[doc.line]) if doc.line < len(doc.lines) else ""
    below = _eol_stripped(doc.lines[doc.line + 1]) if doc.line + 1 < len(doc.lines) else ""
    return _place(doc.uri, above, line[doc.character :], below)


@dataclass(frozen=True)
class TypeAheadHit:
    text: str  # the rest of the suggestion, from the cursor
    origin: str  # "model" or "prefetch": what made the suggestion


class TypeAheadCache:
    """Suggestions by place and by the text left of the cursor on its line."""

    def __init__(self, places: int) -> None:
        self._places: OrderedDict[PlaceKey, dict[str, tuple[str, str]]] = OrderedDict()
        self._size = max(1, places)

    def put(self, key: PlaceKey, left: str, text: str, origin: str = "model") -> None:
        entries = self._places.setdefault(key, {})
        self._places.move_to_end(key)
        entries[left] = (text, origin)
        if len(entries) > 128:
            entries.pop(next(iter(entries)))
        if len(self._places) > self._size:
            self._places.popitem(last=False)

    def put_suggestion(
        self, doc: DocumentView, left: str, text: str, origin: str = "model"
    ) -> None:
        """`text` suggested at `doc`'s cursor, also kept for after each of its line breaks.

        A user who types the suggested lines presses Enter: the next line's request
        then comes from a new place (the typed line is above it), where the rest of
        the suggestion still applies.
        """
        key = place_key(doc)
        self.put(key, left, text, origin)
        lines = text.split("\n")
        if len(lines) < 2:
            return
        start = max(0, doc.line - _KEY_LINES_ABOVE)
        above = [_eol_stripped(s) for s in doc.lines[start : doc.line]] + [left + lines[0]]
        right_below = key[2]
        for i in range(1, len(lines)):
            rest = "\n".join(lines[i:])
            if rest.strip():
                near = _place(doc.uri, above, "", "")[1]
                self.put((doc.uri, near, right_below), "", rest, origin)
            above.append(lines[i])

    def get(self, key: PlaceKey, left: str) -> TypeAheadHit | None:
        """The rest of a cached suggestion the user has been typing, if any."""
        entries = self._places.get(key)
        if not entries:
            return None
        if left in entries:
            text, origin = entries[left]
            return TypeAheadHit(text, origin)
        best: tuple[int, TypeAheadHit] | None = None
        for old_left, (text, origin) in entries.items():
            if len(old_left) < len(left) and left.startswith(old_left):
                typed = left[len(old_left) :]
                rest = text[len(typed) :]
                if (
                    text.startswith(typed)
                    and rest.strip()
                    and (best is None or len(old_left) > best[0])
                ):
                    best = (len(old_left), TypeAheadHit(rest, origin))
        return best[1] if best else None


# -- sticky snippets --------------------------------------------------------------

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
        self.refreshes = 0

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
        self.refreshes += 1
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


# -- generations ------------------------------------------------------------------


@dataclass
class _Generation:
    key: PlaceKey
    left: str
    ctx: FilterContext
    handle: GenerationHandle
    task: asyncio.Task[str] | None = None
    raw: str = ""
    waiters: int = 0
    grace: asyncio.TimerHandle | None = None
    listeners: list[PartialCallback] = field(default_factory=list)
    cut_by: str | None = None  # the filter whose cut stopped the job, if one did

    def cancel(self) -> None:
        self.handle.cancel()
        if self.grace is not None:
            self.grace.cancel()
            self.grace = None


def _decoded(tokenizer: Tokenizer, ids: list[int]) -> str:
    # A token may end inside a multi-byte character: hold that part back.
    return tokenizer.decode(ids).rstrip("\ufffd")


class CompletionEngine:
    def __init__(
        self,
        worker: ModelWorker,
        tokenizer: Tokenizer,
        fim: FimTokens,
        config: CompletionConfig,
        context: ContextSource | None = None,
    ) -> None:
        self.worker = worker
        self.tokenizer = tokenizer
        self.fim = fim
        self.config = config
        self.builder = PromptBuilder(tokenizer, fim, config)
        # Prompts for the text after an accept: a window of their own, so that building
        # one does not move the window of the user's next request.
        self.prefetch_builder = PromptBuilder(tokenizer, fim, config)
        self.type_ahead = TypeAheadCache(config.typeAheadEntries)
        self.snippets = StickySnippets(context or NoContext(), config, self._warm)
        self._running: _Generation | None = None
        self._prefetch: _Generation | None = None
        self.prefetches = 0
        self.last_stats: CompletionStats | None = None
        self.last_prompt: BuiltPrompt | None = None
        self.last_request: DocumentView | None = None
        self.warmups = 0

    def reconfigure(self, config: CompletionConfig) -> None:
        self.config = config
        self.builder.config = config
        self.prefetch_builder.config = config
        self.snippets.config = config

    def set_context(self, context: ContextSource | None) -> None:
        """Take snippets from another source (the index restarted on a new root)."""
        self.snippets = StickySnippets(context or NoContext(), self.config, self._warm)

    def forget(self, uri: str) -> None:
        """A document closed: drop its per-document state."""
        self.builder.forget(uri)
        self.prefetch_builder.forget(uri)
        self.snippets.forget(uri)

    def close(self) -> None:
        self.snippets.close()
        for gen in (self._running, self._prefetch):
            if gen is not None:
                gen.cancel()

    def _warm(self, doc: DocumentView) -> None:
        """Snippets changed while the editor was idle: prefill the new prompt now.

        The next keystroke then reuses the KV cache of the new snippets instead of
        paying for them. It runs only while the backend has nothing else to do, and
        the next request cancels it like any older job.
        """
        if not self.config.kvReuse or self._running is not None or not self.worker.idle:
            return
        try:
            prompt = self.builder.build(doc, self.snippets.current(doc.uri))
        except Exception:
            log.debug("warm-up prompt not built", exc_info=True)
            return
        self.worker.submit(
            GenerationJob(
                prompt=prompt.ids,
                stop_ids=self.fim.stop_ids,
                max_tokens=1,  # the prefill is the point; one token is the least a job makes
                deadline=time.monotonic() + self.config.deadlineMs / 1000,
            )
        )
        self.warmups += 1

    async def complete(
        self, request: CompletionRequest, on_partial: PartialCallback | None = None
    ) -> CompletionResult:
        t0 = time.perf_counter()
        doc = request.document
        if not 0 <= doc.line < max(1, len(doc.lines)):
            raise InvalidPosition(f"line {doc.line} is outside the document")
        if doc.line < len(doc.lines) and doc.character > len(_eol_stripped(doc.lines[doc.line])):
            raise InvalidPosition(f"character {doc.character} is past the end of line {doc.line}")
        if not doc.lines:
            doc = DocumentView(doc.uri, [""], 0, 0, doc.language, doc.path, doc.version)

        self.last_request = doc
        ctx = filter_context(doc, self.config.multiline)
        snippets = await self.snippets.get(doc)
        prompt = self.builder.build(doc, snippets)
        self.last_prompt = prompt
        key = place_key(doc)
        left = ctx.line_prefix
        stats = CompletionStats(
            prompt_tokens=len(prompt.ids),
            multiline=ctx.multiline,
            snippet_tokens=prompt.segment_tokens.get("snippets", 0),
            prompt_build_ms=(time.perf_counter() - t0) * 1000,
        )

        cached = self.type_ahead.get(key, left)
        if cached is not None:
            stats.source = "prefetch" if cached.origin == "prefetch" else "type-ahead"
            self._prefetch_after(doc, left, cached.text)
            return self._finish(stats, t0, cached.text)

        running, typed = self._attachable(self._running, key, left)
        prefetched, typed_since_prefetch = self._attachable(self._prefetch, key, left)
        if running is not None:
            gen = running
            stats.source = "attached"
        elif prefetched is not None:
            gen, typed = prefetched, typed_since_prefetch
            stats.source = "prefetch"
        else:
            if self._running is not None:
                self._running.cancel()
            gen = self._start(key, left, ctx, prompt, t0)
            typed = ""
        raw = await self._wait(gen, on_partial, typed)
        job_stats = gen.handle.job.stats
        if stats.source == "model":
            stats.reused_tokens = job_stats.reused_tokens
            stats.prefilled_tokens = job_stats.prefilled_tokens
            stats.reuse_known = job_stats.reuse_known
            # The backend's count where it has one: a remote server counts exactly.
            stats.prompt_tokens = job_stats.prompt_tokens or stats.prompt_tokens
            stats.ttft_ms = job_stats.ttft_ms
            if gen.handle.started is not None:
                stats.queue_ms = (gen.handle.started - gen.handle.submitted) * 1000
        stats.generated_tokens = job_stats.generated_tokens
        # A filter's cut cancels the job: that cut, not "cancelled", is why it stopped.
        stats.stop_reason = f"filter:{gen.cut_by}" if gen.cut_by else job_stats.stop_reason
        if not raw.startswith(typed):
            stats.source = "empty"
            return self._finish(stats, t0, "")
        text = postprocess(raw[len(typed) :], ctx, final=True).text
        if text:
            self.type_ahead.put_suggestion(doc, left, text)
            self._prefetch_after(doc, left, text)
        return self._finish(stats, t0, text)

    @staticmethod
    def _attachable(
        gen: _Generation | None, key: PlaceKey, left: str
    ) -> tuple[_Generation | None, str]:
        """`gen` and what was typed since it started, if it still fits the request."""
        if gen is None or gen.key != key or not left.startswith(gen.left):
            return None, ""
        typed = left[len(gen.left) :]
        if gen.raw.startswith(typed) or typed.startswith(gen.raw):
            return gen, typed
        return None, ""

    # -- the suggestion after the next accept ----------------------------------------

    def _prefetch_after(self, doc: DocumentView, left: str, text: str) -> None:
        """Generate, in the background, the suggestion for the text after accepting `text`.

        Accepting then shows the next suggestion from the type-ahead cache, with no
        model wait. The job has the background priority: the next request that
        needs the model cancels it. It starts only when the backend has nothing
        else to do (it would cancel a hover otherwise).
        """
        if not self.config.prefetch:
            return
        key, after_left = accepted_place(doc, text)
        running = self._prefetch
        if running is not None and running.key == key and running.left == after_left:
            return  # already under way
        hit = self.type_ahead.get(key, after_left)
        if hit is not None and hit.origin == "prefetch":
            return
        if not self.worker.idle:
            return
        after = accepted_view(doc, text)
        ctx = filter_context(after, self.config.multiline)
        try:
            prompt = self.prefetch_builder.build(after, self.snippets.current(doc.uri))
        except Exception:
            log.debug("prefetch prompt not built", exc_info=True)
            return
        max_tokens = self.config.maxTokens if ctx.multiline else self.config.maxTokensSingleLine
        job = GenerationJob(
            prompt=prompt.ids,
            stop_ids=self.fim.stop_ids,
            max_tokens=max_tokens,
            deadline=time.monotonic() + self.config.deadlineMs / 1000,
            reuse_cache=self.config.kvReuse,
        )
        gen = _Generation(key, after_left, ctx, self.worker.submit(job, background=True))
        gen.task = asyncio.get_running_loop().create_task(self._drive(gen))
        gen.task.add_done_callback(functools.partial(self._prefetched, gen, after))
        self._prefetch = gen
        self.prefetches += 1

    def _prefetched(self, gen: _Generation, after: DocumentView, task: asyncio.Task[str]) -> None:
        if self._prefetch is gen:
            self._prefetch = None
        if task.cancelled() or task.exception() is not None:
            return
        if gen.handle.job.stats.stop_reason == "cancelled" and not gen.raw:
            return
        text = postprocess(task.result(), gen.ctx, final=True).text
        if text and gen.handle.job.stats.stop_reason != "cancelled":
            self.type_ahead.put_suggestion(after, gen.left, text, origin="prefetch")

    @property
    def prefetch_task(self) -> asyncio.Task[str] | None:
        """The prefetch under way, if any (for tests and benchmarks)."""
        return self._prefetch.task if self._prefetch is not None else None

    def _finish(self, stats: CompletionStats, t0: float, text: str) -> CompletionResult:
        stats.total_ms = (time.perf_counter() - t0) * 1000
        self.last_stats = stats
        log.debug("completion %s", stats)
        return CompletionResult([Suggestion(text)] if text else [], stats)

    def _start(
        self, key: PlaceKey, left: str, ctx: FilterContext, prompt: BuiltPrompt, t0: float
    ) -> _Generation:
        max_tokens = self.config.maxTokens if ctx.multiline else self.config.maxTokensSingleLine
        job = GenerationJob(
            prompt=prompt.ids,
            stop_ids=self.fim.stop_ids,
            max_tokens=max_tokens,
            deadline=time.monotonic() + self.config.deadlineMs / 1000 - (time.perf_counter() - t0),
            reuse_cache=self.config.kvReuse,
        )
        gen = _Generation(key, left, ctx, self.worker.submit(job))
        gen.task = asyncio.get_running_loop().create_task(self._drive(gen))
        self._running = gen
        return gen

    async def _drive(self, gen: _Generation) -> str:
        """Read the job's tokens, post-process as they come, stop at the first cut."""
        ids: list[int] = []
        stopped = False
        try:
            async for token in gen.handle.tokens():
                if stopped:
                    continue
                ids.append(token)
                text = _decoded(self.tokenizer, ids)
                done = postprocess(text, gen.ctx, final=False)
                gen.raw = text
                for listener in list(gen.listeners):
                    listener(done.text)
                if done.truncated:
                    # Everything after the cut is thrown away: stop decoding now.
                    stopped = True
                    gen.cut_by = done.by
                    gen.handle.cancel()
        finally:
            if self._running is gen:
                self._running = None
        return gen.raw

    async def _wait(self, gen: _Generation, on_partial: PartialCallback | None, typed: str) -> str:
        assert gen.task is not None
        gen.waiters += 1
        if gen.grace is not None:
            gen.grace.cancel()
            gen.grace = None
        listener: PartialCallback | None = None
        if on_partial is not None and self.config.streamPartial:

            def listener(text: str) -> None:
                if text.startswith(typed) and len(text) > len(typed):
                    on_partial(text[len(typed) :])

            gen.listeners.append(listener)
        try:
            return await asyncio.shield(gen.task)
        except asyncio.CancelledError:
            gen.waiters -= 1
            if gen.waiters == 0 and not gen.task.done():
                # Keep it briefly: the editor cancels the old request just before it
                # sends the next keystroke's, which may attach to this generation.
                loop = asyncio.get_running_loop()
                gen.grace = loop.call_later(self.config.attachGraceMs / 1000, gen.cancel)
            raise
        except BackendUnavailable:
            raise  # reported by the backend and the service, once per problem
        except Exception as e:
            log.warning("generation failed: %s", e)
            raise
        finally:
            if listener is not None and listener in gen.listeners:
                gen.listeners.remove(listener)
