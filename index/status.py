"""Status and progress of a `WorkspaceIndex`: `stats()`, the waits, `$/progress`-shaped
events and the one-time failure report.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Literal

from exlsp.index.state import IndexState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProgressEvent:
    """Work-done progress, shaped like LSP's `$/progress` (begin / report / end).

    `token` tells concurrent sequences apart ("index" for scans and batches,
    "embed" for the embedding backlog).
    """

    kind: Literal["begin", "report", "end"]
    token: str
    title: str
    message: str = ""
    done: int = 0
    total: int = 0

    @property
    def percentage(self) -> int | None:
        if self.total <= 0:
            return None
        return max(0, min(100, int(100 * self.done / self.total)))


@dataclass(frozen=True)
class IndexStats:
    root: str
    database_dir: str
    # "created", "starting", "scanning", "updating", "embedding", "idle",
    # "pending" (file changes wait for a pause), "read-only", "disabled",
    # "failed" (see `failure`), "stopped"
    state: str
    files: int
    chunks: int
    chunks_with_vectors: int | None  # None: lexical only
    pending_events: int
    batches: int
    embedding_model: str | None
    read_only: bool
    last_error: str | None
    scan_seconds: float | None
    commits: int
    # Query embeddings computed (off the request path), and the last one's time.
    query_vectors: int = 0
    query_vector_ms: float | None = None
    # Folders and files skipped because they cannot be read or their name is not
    # UTF-8 (each logged once), as of the last scan.
    skipped_unreadable: int = 0
    # Why the index does not work as it should, until it does again: the worker
    # stopped, scans keep failing, or embedding failed. None: all is well.
    failure: str | None = None


class IndexStatus(IndexState):
    """What the index says about itself."""

    _failure: tuple[str, str] | None  # (the step that failed, why) until it works again
    _failure_told: bool

    def stats(self) -> IndexStats:
        return IndexStats(
            root=str(self.root),
            database_dir=str(self.database_dir),
            state=self._state,
            files=len(self._files),
            chunks=self._chunk_count,
            chunks_with_vectors=self._vector_count,
            pending_events=len(self._debouncer),
            batches=self._batches,
            embedding_model=self._embedding_name,
            read_only=self._read_only,
            last_error=self._last_error,
            scan_seconds=self._scan_seconds,
            commits=self._commits,
            query_vectors=self.query_vectors.computed,
            query_vector_ms=self.query_vectors.last_ms,
            skipped_unreadable=len(self._files_rules.unreadable),
            failure=self._failure[1] if self._failure is not None else None,
        )

    def wait_idle(self, timeout: float | None = None, *, embeddings: bool = True) -> bool:
        """Wait until the scan, pending events and (with `embeddings`) the embedding
        backlog are done; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                thread = self._thread
                if thread is None or not thread.is_alive() or self._read_only:
                    return len(self._debouncer) == 0  # nothing would make progress
                quiet = not self._rescan and len(self._debouncer) == 0
                if embeddings:
                    settled = self._setup_done and self._job is None and not self._backlog
                else:
                    settled = self._scan_done and self._job not in {"scan", "batch"}
                if quiet and settled:
                    return True
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(0.5 if remaining is None else min(0.5, remaining))

    def wait_searchable(self, timeout: float | None = None) -> bool:
        """Wait until a search uses all there is: the first scan is written and the
        embedding model is loaded (or not configured, or failed to load); for a
        read-only index, the table is open and the model loaded. True also when
        the worker stopped (see `stats()`); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                thread = self._thread
                if thread is None or not thread.is_alive():
                    return True
                if self._setup_done or (self._read_only and self._embedder_tried):
                    return True
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(0.5 if remaining is None else min(0.5, remaining))

    def _emit(self, event: ProgressEvent) -> None:
        if self._on_progress is None:
            return
        try:
            self._on_progress(event)
        except Exception:
            log.exception("progress callback failed")

    def _fail(self, step: str, reason: str) -> None:
        """Record that `step` ("index", "embed") does not work; tell once per index."""
        self._failure = (step, reason)
        self._state = "failed"
        if self._failure_told or self._on_failure is None:
            return
        self._failure_told = True
        try:
            self._on_failure(reason)
        except Exception:
            log.exception("failure callback failed")

    def _works(self, step: str) -> None:
        """`step` worked: a failure it had is over."""
        if self._failure is not None and self._failure[0] == step:
            log.info(
                "index %s: %s works again",
                self.root,
                "embedding" if step == "embed" else "indexing",
            )
            self._failure = None
