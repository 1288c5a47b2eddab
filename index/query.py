"""Searching a `WorkspaceIndex`: lexical terms and, when there is a model, a query
vector, fused (`hybrid_search`); from any thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

from exlsp.index.lexical import query_terms
from exlsp.index.search import SearchHit, hybrid_search
from exlsp.index.store import (
    StoredChunk,
)
from exlsp.index.upkeep import IndexUpkeep

log = logging.getLogger(__name__)

# Terms of a lexical query (the nearest lines' first): more cost time, not recall.
QUERY_TERMS = 32


class IndexQuery(IndexUpkeep):
    """Searches of the table the worker keeps current."""

    @property
    def ready(self) -> bool:
        """The table is open and can be searched (possibly before the first scan ends)."""
        return self._store is not None

    def search(
        self,
        query: str,
        limit: int = 10,
        *,
        mode: str = "hybrid",
        keep: Callable[[StoredChunk], bool] | None = None,
        lines: Sequence[str] | None = None,
        vector_text: str | None = None,
        query_vector: np.ndarray | None = None,
        embed: bool = True,
    ) -> list[SearchHit]:
        """Search the index (thread-safe, blocking: call it off the event loop).

        `lines`, when given, are the query's lines nearest-first for the lexical
        terms. The vector side uses `query_vector`, or else (with `embed`) embeds
        `vector_text` (default: `query`) on this thread; without either the
        search is lexical.
        """
        store = self._store
        if store is None or self._stopping:
            return []
        terms = query_terms(
            lines if lines is not None else query.splitlines() or [query], QUERY_TERMS
        )
        embedder = self._embedder
        text = vector_text if vector_text is not None else query
        if (
            query_vector is None
            and embed
            and mode != "lexical"
            and embedder is not None
            and store.vector_dim is not None
            and text.strip()
        ):
            try:
                query_vector = embedder.embed_query(text)
            except Exception as exc:  # vectors are a bonus: lexical still answers
                log.debug("query embedding failed: %s", exc)
        return hybrid_search(
            store,
            terms,
            query_vector,
            limit,
            candidates=max(50, 2 * limit),
            keep=keep,
            mode=mode,
        )
