"""Embeddings and maintenance of a `WorkspaceIndex`: the embedding model, the
backlog of rows without vectors, and the table's indexes and compaction.
"""

from __future__ import annotations

import logging
import time

from exlsp.index.embed import (
    Embedder,
    embedding_input,
    load_embedder,
)
from exlsp.index.scan import IndexScan
from exlsp.index.status import ProgressEvent

log = logging.getLogger(__name__)

# Rows per embedding step: starts here, then adapts so a step takes about
# EMBED_STEP_S (small on a CPU, large on a GPU) within these bounds.
EMBED_BATCH = 64
MAX_EMBED_BATCH = 1024
MIN_EMBED_BATCH = 8
EMBED_STEP_S = 1.0
OPTIMIZE_AFTER_COMMITS = 40
OPTIMIZE_AFTER_S = 600.0
# Filling in vectors rewrites rows, which leaves them outside the full-text index
# (searched the slow way) until optimize(): fold them in once this many rows
# were rewritten, at most every OPTIMIZE_BACKLOG_S, and when the backlog ends.
OPTIMIZE_AFTER_ROWS = 2000
OPTIMIZE_BACKLOG_S = 20.0


class IndexUpkeep(IndexScan):
    """Vectors filled in step by step, and the table kept fast (worker thread)."""

    # Declared in IndexState too: mypy, as configured, does not follow `exlsp.` imports
    # to the base classes, and this part reads it before it assigns it.
    _embedder: Embedder | None
    _embed_batch: int
    _embed_progress: list[int] | None  # [done, total] while a backlog runs

    def _load_embedder(self) -> None:
        store = self._store
        if store is None or store.vector_dim is None:
            return
        embedder: Embedder | None = self._given_embedder or self._embedder
        if embedder is None:
            embedder = load_embedder(self.config)
        if embedder is not None and embedder.dim != store.vector_dim:
            log.warning(
                "embedding model %s gives %d dimensions, the table has %d: lexical only",
                embedder.name,
                embedder.dim,
                store.vector_dim,
            )
            embedder = None
        self._embedder = embedder
        if embedder is not None:
            self._vector_count = store.count_rows("vector IS NOT NULL")
            self._backlog = self._vector_count < self._chunk_count

    def _embed_step(self) -> None:
        """Embed one batch of the backlog (its progress in `_embed_progress`)."""
        store = self._require_store()
        embedder = self._embedder
        if embedder is None:
            self._backlog = False
            return
        self._state = "embedding"
        self._embed_batch = self._embed_batch or EMBED_BATCH
        self._yield_to_completions()
        progress = self._embed_progress
        if progress is None:
            missing = store.count_rows("vector IS NULL")
            progress = self._embed_progress = [0, missing]
            if missing:
                self._emit(
                    ProgressEvent("begin", "embed", "Embedding chunks", f"0/{missing}", 0, missing)
                )
        rows = store.rows_without_vectors(self._embed_batch)
        if not rows:
            self._backlog = False
            self._embed_progress = None
            if progress[1]:
                self._emit(
                    ProgressEvent(
                        "end", "embed", "Embedding chunks", f"{progress[0]} chunks", *progress
                    )
                )
            self._vector_count = store.count_rows("vector IS NOT NULL")
            self._after_writes(force_optimize=True)
            return
        started = time.monotonic()
        vectors = embedder.embed([embedding_input(p, s, t) for _id, p, s, t in rows])
        took = time.monotonic() - started
        if took < EMBED_STEP_S / 2 and len(rows) == self._embed_batch:
            self._embed_batch = min(MAX_EMBED_BATCH, self._embed_batch * 2)
        elif took > EMBED_STEP_S * 3:
            self._embed_batch = max(MIN_EMBED_BATCH, self._embed_batch // 2)
        store.set_vectors([r[0] for r in rows], vectors)
        self._commits += 1
        self._commits_since_optimize += 1
        self._rows_since_optimize += len(rows)
        progress[0] += len(rows)
        progress[1] = max(progress[1], progress[0])
        self._vector_count = (self._vector_count or 0) + len(rows)
        self._emit(
            ProgressEvent(
                "report", "embed", "Embedding chunks", f"{progress[0]}/{progress[1]}", *progress
            )
        )
        if (
            self._rows_since_optimize >= OPTIMIZE_AFTER_ROWS
            and time.monotonic() - self._last_optimize >= OPTIMIZE_BACKLOG_S
        ):
            self._after_writes(force_optimize=True)

    def _optimize_due(self) -> bool:
        if self._commits_since_optimize == 0:
            return False
        return (
            self._commits_since_optimize >= OPTIMIZE_AFTER_COMMITS
            or time.monotonic() - self._last_optimize >= OPTIMIZE_AFTER_S
        )

    def _after_writes(self, *, force_optimize: bool = False) -> None:
        store = self._require_store()
        self._yield_to_completions()
        created = store.ensure_indexes()
        if created:
            log.info("index %s: built %s index", self.root, ", ".join(created))
        if force_optimize and self._commits_since_optimize:
            self._optimize()

    def _optimize(self) -> None:
        self._require_store().optimize()
        self._commits_since_optimize = 0
        self._rows_since_optimize = 0
        self._last_optimize = time.monotonic()
