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
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from exlsp.completion.backends.base import BackendUnavailable, GenerationJob
from exlsp.completion.config import CompletionConfig
from exlsp.completion.fim import FimTokens
from exlsp.completion.postprocess import FilterContext, decide_multiline, postprocess
from exlsp.completion.prompt import BuiltPrompt, PromptBuilder
from exlsp.completion.sticky import StickySnippets
from exlsp.completion.tokenizer import Tokenizer
from exlsp.completion.typeahead import (
    PlaceKey,
    TypeAheadCache,
    accepted_place,
    accepted_view,
    place_key,
)
from exlsp.completion.types import (
    CompletionRequest,
    CompletionResult,
    CompletionStats,
    ContextSource,
    CursorContext,
    DocumentView,
    NoContext,
    Suggestion,
)
from exlsp.completion.worker import GenerationHandle, ModelWorker

log = logging.getLogger(__name__)

PartialCallback = Callable[[str], None]


def cursor_context(doc: DocumentView, multiline_mode: str = "auto") -> CursorContext:
    """The request's cursor, cut once; raises `InvalidPosition` for a place outside `doc`.

    `multiline_mode`: "always", "never", or "auto" (`decide_multiline` on the cursor line).
    """
    decision = {"always": True, "never": False}.get(multiline_mode, decide_multiline)
    return CursorContext.at(doc, decision)


def filter_context(doc: DocumentView, multiline_mode: str = "auto") -> FilterContext:
    """What the filters see of `doc`'s cursor."""
    return FilterContext.from_cursor(cursor_context(doc, multiline_mode))


# -- generations ------------------------------------------------------------------


@dataclass
class _Generation:
    key: PlaceKey
    cursor: CursorContext
    ctx: FilterContext
    handle: GenerationHandle
    task: asyncio.Task[str] | None = None
    raw: str = ""
    waiters: int = 0
    grace: asyncio.TimerHandle | None = None
    listeners: list[PartialCallback] = field(default_factory=list)
    cut_by: str | None = None  # the filter whose cut stopped the job, if one did

    @property
    def left(self) -> str:
        return self.cursor.line_prefix

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
        cursor = cursor_context(doc, self.config.multiline)
        if not doc.lines:
            doc = DocumentView(doc.uri, [""], 0, 0, doc.language, doc.path, doc.version)

        self.last_request = doc
        ctx = FilterContext.from_cursor(cursor)
        snippets = await self.snippets.get(doc)
        prompt = self.builder.build(doc, snippets, cursor)
        self.last_prompt = prompt
        key = place_key(doc.uri, cursor)
        left = cursor.line_prefix
        stats = CompletionStats(
            prompt_tokens=len(prompt.ids),
            multiline=cursor.multiline,
            snippet_tokens=prompt.segment_tokens.get("snippets", 0),
            prompt_build_ms=(time.perf_counter() - t0) * 1000,
        )

        cached = self.type_ahead.get(key, left)
        if cached is not None:
            stats.source = "prefetch" if cached.origin == "prefetch" else "type-ahead"
            self._prefetch_after(doc, cursor, cached.text)
            return self._finish(stats, t0, cached.text, cursor)

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
            gen = self._start(key, cursor, ctx, prompt, t0)
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
            return self._finish(stats, t0, "", cursor)
        text = postprocess(raw[len(typed) :], ctx, final=True).text
        if text:
            self.type_ahead.put_suggestion(doc.uri, cursor, text)
            self._prefetch_after(doc, cursor, text)
        return self._finish(stats, t0, text, cursor)

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

    def _prefetch_after(self, doc: DocumentView, cursor: CursorContext, text: str) -> None:
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
        after_cursor = cursor_context(after, self.config.multiline)
        ctx = FilterContext.from_cursor(after_cursor)
        try:
            prompt = self.prefetch_builder.build(
                after, self.snippets.current(doc.uri), after_cursor
            )
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
        gen = _Generation(key, after_cursor, ctx, self.worker.submit(job, background=True))
        gen.task = asyncio.get_running_loop().create_task(self._drive(gen))
        gen.task.add_done_callback(functools.partial(self._prefetched, gen, after.uri))
        self._prefetch = gen
        self.prefetches += 1

    def _prefetched(self, gen: _Generation, uri: str, task: asyncio.Task[str]) -> None:
        if self._prefetch is gen:
            self._prefetch = None
        if task.cancelled() or task.exception() is not None:
            return
        if gen.handle.job.stats.stop_reason == "cancelled" and not gen.raw:
            return
        text = postprocess(task.result(), gen.ctx, final=True).text
        if text and gen.handle.job.stats.stop_reason != "cancelled":
            self.type_ahead.put_suggestion(uri, gen.cursor, text, origin="prefetch")

    @property
    def prefetch_task(self) -> asyncio.Task[str] | None:
        """The prefetch under way, if any (for tests and benchmarks)."""
        return self._prefetch.task if self._prefetch is not None else None

    def _finish(
        self, stats: CompletionStats, t0: float, text: str, cursor: CursorContext
    ) -> CompletionResult:
        stats.total_ms = (time.perf_counter() - t0) * 1000
        self.last_stats = stats
        log.debug("completion %s", stats)
        return CompletionResult([Suggestion(text)] if text else [], stats, cursor=cursor)

    def _start(
        self,
        key: PlaceKey,
        cursor: CursorContext,
        ctx: FilterContext,
        prompt: BuiltPrompt,
        t0: float,
    ) -> _Generation:
        max_tokens = self.config.maxTokens if ctx.multiline else self.config.maxTokensSingleLine
        job = GenerationJob(
            prompt=prompt.ids,
            stop_ids=self.fim.stop_ids,
            max_tokens=max_tokens,
            deadline=time.monotonic() + self.config.deadlineMs / 1000 - (time.perf_counter() - t0),
            reuse_cache=self.config.kvReuse,
        )
        gen = _Generation(key, cursor, ctx, self.worker.submit(job))
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
