"""The index as the engine's `ContextSource`: snippets for the code around the cursor.

The query is the window of lines around the cursor: its identifiers (nearest
lines first) for BM25, its text for the embedding. The query is never embedded
while a request waits: the vector side uses the query vector already computed
for this place (the same text, or the cursor a few lines away), and a missing
one is computed in the background for the next time (`QueryVectorCache`);
until then the search is lexical. Chunks of the current file that the prompt
already shows (within `excludeLines` of the cursor) are left out. Recently
edited ranges of other documents come first, then the fused search hits, until
`budget_chars` is used. The engine decides when to ask (snippets are sticky)
and trims by tokens.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from exlsp.completion.types import DocumentView, Snippet
from exlsp.index.config import IndexConfig
from exlsp.index.service import WorkspaceIndex
from exlsp.index.store import StoredChunk

log = logging.getLogger(__name__)

# Below this many characters left, stop filling.
MIN_SNIPPET_CHARS = 64
# The embedded part of the query: fewer lines than the lexical one (the model
# reads 256 word pieces at most, and on a CPU every one of them costs time).
VECTOR_LINES_BEFORE = 8
VECTOR_LINES_AFTER = 2
_WARN_EVERY_S = 60.0


def query_window(document: DocumentView, before: int, after: int) -> tuple[str, list[str]]:
    """(text in document order, lines nearest the cursor first) of the query window."""
    lines = document.lines
    if not lines:
        return "", []
    line = max(0, min(document.line, len(lines) - 1))
    start = max(0, line - before)
    end = min(len(lines), line + after + 1)
    window = [lines[i] for i in range(start, end)]
    nearest: list[str] = [lines[line]]
    for distance in range(1, max(before, after) + 1):
        if line - distance >= start:
            nearest.append(lines[line - distance])
        if line + distance < end:
            nearest.append(lines[line + distance])
    return "".join(window), nearest


def _overlaps(a: Snippet, b: Snippet) -> bool:
    return a.path == b.path and a.start_line < b.end_line and b.start_line < a.end_line


def _fit(snippet: Snippet, room: int) -> Snippet | None:
    """The snippet cut to whole lines that fit in `room` characters (None if none fit)."""
    if len(snippet.text) <= room:
        return snippet
    kept: list[str] = []
    used = 0
    for line in snippet.text.splitlines(keepends=True):
        if used + len(line) > room:
            break
        kept.append(line)
        used += len(line)
    if not kept or used < MIN_SNIPPET_CHARS:
        return None
    return Snippet(
        path=snippet.path,
        text="".join(kept),
        start_line=snippet.start_line,
        end_line=snippet.start_line + len(kept),
        score=snippet.score,
        source=snippet.source,
    )


def fill_budget(candidates: Sequence[Snippet], budget_chars: int, max_count: int) -> list[Snippet]:
    """Take candidates in order, skipping overlaps, until the budget or count runs out."""
    out: list[Snippet] = []
    room = budget_chars
    for candidate in candidates:
        if len(out) >= max_count or room < MIN_SNIPPET_CHARS:
            break
        if not candidate.text.strip() or any(_overlaps(candidate, s) for s in out):
            continue
        fitted = _fit(candidate, room)
        if fitted is None:
            continue
        out.append(fitted)
        room -= len(fitted.text)
    return out


class WorkspaceRetriever:
    """Implements `exlsp.completion.types.ContextSource` over a `WorkspaceIndex`."""

    def __init__(self, index: WorkspaceIndex, config: IndexConfig | None = None) -> None:
        self.index = index
        self.config = config or index.config
        self._last_warning = 0.0
        # How the last query got its vector: "exact", "near" or "miss".
        self.last_vector = "miss"

    async def snippets(self, document: DocumentView, budget_chars: int) -> list[Snippet]:
        if budget_chars <= 0:
            return []
        return await asyncio.to_thread(self.snippets_sync, document, budget_chars)

    def snippets_sync(self, document: DocumentView, budget_chars: int) -> list[Snippet]:
        """The blocking part of `snippets` (for callers already off the event loop)."""
        cfg = self.config
        source = document.path or document.uri
        current = self.index.relpath(source) or source
        candidates: list[Snippet] = [
            Snippet(
                path=e.path,
                text=e.text,
                start_line=e.start_line,
                end_line=e.end_line,
                score=1.0,
                source="recent-edit",
            )
            for e in self.index.recent_edits(exclude_path=current, limit=cfg.recentEdits)
        ]
        text, nearest = query_window(document, cfg.queryLinesBefore, cfg.queryLinesAfter)
        vector_text, _ = query_window(
            document,
            min(VECTOR_LINES_BEFORE, cfg.queryLinesBefore),
            min(VECTOR_LINES_AFTER, cfg.queryLinesAfter),
        )
        lo = document.line - cfg.excludeLines
        hi = document.line + cfg.excludeLines + 1

        def keep(c: StoredChunk) -> bool:
            return not (c.path == current and c.start_line < hi and c.end_line > lo)

        vector, self.last_vector = self.index.query_vectors.lookup(
            current, document.line, vector_text
        )
        try:
            hits = self.index.search(
                text,
                limit=2 * cfg.maxSnippets,
                keep=keep,
                lines=nearest,
                query_vector=vector,
                embed=False,
            )
        except Exception as exc:  # retrieval is a bonus: a failure means fewer snippets
            now = time.monotonic()
            if now - self._last_warning > _WARN_EVERY_S:
                self._last_warning = now
                log.warning("workspace retrieval failed: %s", exc)
            hits = []
        if self.last_vector != "exact":
            # For the next refresh here; after the search, not competing with it.
            self.index.query_vectors.request(current, document.line, vector_text)
        candidates.extend(
            Snippet(
                path=h.path,
                text=h.text,
                start_line=h.start_line,
                end_line=h.end_line,
                score=h.score,
                source="retrieval",
            )
            for h in hits
        )
        return fill_budget(candidates, budget_chars, cfg.maxSnippets + cfg.recentEdits)
