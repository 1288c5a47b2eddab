"""The indexer service: one worker thread keeps a workspace's chunk table current.

All reading, chunking, embedding and LanceDB writes happen on that worker; the
caller's thread (the server's event loop) only hands it events. Start-up:
open (or rebuild) the table, watch, scan the workspace, build the full-text
index; then apply debounced batches of file events, and fill in embeddings in
the background, lexical rows first so the index answers before the model has
seen a single chunk.

Only one process writes an index (a lock file in its directory); a second one,
for example a second editor window on the same folder, searches it read-only
and takes over when the writer goes away.

Paths from file events are trusted no more than the scan's: each is resolved
(every link on its way) and must lie inside the workspace before anything is
read or walked, and events for paths the rules surely ignore are dropped before
they wait for a batch, so that a busy ``node_modules/`` costs nothing. While
file events keep coming, the embedding backlog still advances in steps between
their batches.
"""

from __future__ import annotations

import bisect
import collections
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import platformdirs

from exlsp.index.chunk import Chunk, Chunker
from exlsp.index.config import IndexConfig
from exlsp.index.embed import (
    Embedder,
    QueryVectorCache,
    embedding_input,
    load_embedder,
    peek_dimension,
    resolve_model,
    wait_while_busy,
)
from exlsp.index.files import FileRead, Verdict, WorkspaceFiles, display_path
from exlsp.index.lexical import query_terms
from exlsp.index.search import SearchHit, hybrid_search
from exlsp.index.secrets import secret_in_text, secret_path
from exlsp.index.shared import make_store
from exlsp.index.store import (
    ChunkStore,
    FileState,
    StoredChunk,
    StoreUnavailable,
    WriterLock,
    store_location,
)
from exlsp.index.watch import ChangeKind, Debouncer, FileEvent, WorkspaceWatcher

log = logging.getLogger(__name__)

CHUNKER_VERSION = 1
# What a file must pass to be indexed (secrets by name, link and content; the
# real path inside the workspace). An index checked under an older version
# re-reads every file once at start, so that what is no longer allowed leaves it
# (unchanged files keep their rows and vectors).
CHECKS_VERSION = 2
# Flush the rows gathered by a scan at this many chunks (bounds memory, shows progress).
FLUSH_CHUNKS = 4096
# Rows per embedding step: starts here, then adapts so a step takes about
# EMBED_STEP_S (small on a CPU, large on a GPU) within these bounds.
EMBED_BATCH = 64
MAX_EMBED_BATCH = 1024
MIN_EMBED_BATCH = 8
EMBED_STEP_S = 1.0
# Retries of a failed scan or batch (as a rescan) before waiting for the next event.
MAX_RETRIES = 3
OPTIMIZE_AFTER_COMMITS = 40
OPTIMIZE_AFTER_S = 600.0
# Filling in vectors rewrites rows, which leaves them outside the full-text index
# (searched the slow way) until optimize(): fold them in once this many rows
# were rewritten, at most every OPTIMIZE_BACKLOG_S, and when the backlog ends.
OPTIMIZE_AFTER_ROWS = 2000
OPTIMIZE_BACKLOG_S = 20.0
READ_ONLY_RETRY_S = 10.0
PROGRESS_INTERVAL_S = 0.25
MAX_RECENT_EDITS = 32
# Terms of a lexical query (the nearest lines' first): more cost time, not recall.
QUERY_TERMS = 32
# A batch larger than this reports progress, and gives way to completions.
LARGE_BATCH = 50
# While the completion backend is busy, heavy index work (scans, embedding, index
# builds) waits, but at most YIELD_MAX_S before each step so that a user who types
# without pause still gets an index.
YIELD_MAX_S = 2.0
# Files a scan reads between two looks at the completion backend.
YIELD_EVERY_FILES = 16


class UnsafeRoot(ValueError):
    """The folder is no workspace to index whole: the file system root or the home folder."""


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


@dataclass(frozen=True)
class RecentEdit:
    path: str  # workspace-relative where possible
    start_line: int
    end_line: int  # exclusive
    text: str
    stamp: float  # time.monotonic() of the edit


def default_database_dir(root: Path) -> Path:
    digest = hashlib.sha256(str(root.resolve()).encode("utf-8", "surrogatepass")).hexdigest()
    return Path(platformdirs.user_cache_dir("exlsp")) / "index" / digest[:16]


def refuse_root(root: Path) -> None:
    """Raise `UnsafeRoot` for a folder no index should cover whole: the file system
    root or the user's home folder (every private file of the user, other projects)."""
    try:
        home: Path | None = Path.home().resolve()
    except (RuntimeError, OSError):  # no home folder known
        home = None
    if root == Path(root.anchor) or root == home:
        raise UnsafeRoot(
            f"will not index {root}: it is the "
            + ("home folder" if root == home else "file system root")
            + ", not a project workspace; open a project folder instead"
        )


class WorkspaceIndex:
    """The index of one workspace folder.

    `on_progress` is called on the index worker thread; a server hands the
    events to its event loop (``loop.call_soon_threadsafe``). `use_watchdog`:
    watch the folder with watchdog; pass False when the editor sends
    `workspace/didChangeWatchedFiles` (then feed them to `file_events`).
    `embedder` replaces the configured embedding model (tests, benchmarks).
    `busy` says whether completions are being computed: heavy index work (scans,
    the embedding backlog, index builds) waits while it says so. `on_failure`
    is called once (on the index worker thread) with a one-line reason when the
    index stops working as it should; `stats().failure` says whether it still
    does not.

    Raises `UnsafeRoot` for the file system root or the home folder.
    """

    def __init__(
        self,
        root: Path,
        config: IndexConfig | None = None,
        on_progress: Callable[[ProgressEvent], None] | None = None,
        *,
        use_watchdog: bool = True,
        embedder: Embedder | None = None,
        busy: Callable[[], bool] | None = None,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        self.root = Path(root).resolve()
        refuse_root(self.root)
        self.config = config or IndexConfig()
        self.database_dir = (
            store_location(self.config.databaseDir)
            if self.config.databaseDir
            else default_database_dir(self.root)
        )
        self._on_progress = on_progress
        self._on_failure = on_failure
        self._use_watchdog = use_watchdog
        self._given_embedder = embedder
        self._busy = busy
        self._files_rules = WorkspaceFiles(self.root, self.config)
        self._edit_paths: dict[str, str | None] = {}
        self._chunker = Chunker(self.config.chunkLines, self.config.chunkOverlap)

        self._cond = threading.Condition()
        quiet = max(0.0, self.config.debounceMs / 1000.0)
        self._debouncer = Debouncer(quiet, max(2.0, 10 * quiet))
        self._rescan = False
        self._stopping = False
        # What the worker is doing ("scan", "batch", "embed", "optimize", "setup"); None: idle.
        self._job: str | None = "setup"
        self._scan_done = False  # the initial scan has been written
        self._setup_done = False  # ... and the embedding model loaded (or not configured)
        self._embedder_tried = False  # the model was loaded (or not) for searching
        self._state = "created" if self.config.enabled else "disabled"
        self._batches = 0
        self._commits = 0
        self._last_error: str | None = None
        # (the step that failed: "index" or "embed", why) until that step works again.
        self._failure: tuple[str, str] | None = None
        self._failure_told = False
        self._scan_seconds: float | None = None
        self._recent: collections.deque[RecentEdit] = collections.deque()

        # Shared with searching threads (set once by the worker).
        self._store: ChunkStore | None = None
        self._embedder: Embedder | None = None
        self._embedding_name: str | None = None
        self._read_only = False

        # Worker-only state.
        self._files: dict[str, FileState] = {}
        self._chunk_count = 0
        self._vector_count: int | None = None
        self._backlog = False
        self._commits_since_optimize = 0
        self._rows_since_optimize = 0
        self._last_optimize = time.monotonic()
        self._writer_lock = WriterLock(self.database_dir)
        self._watcher: WorkspaceWatcher | None = None
        self._thread: threading.Thread | None = None
        self._embed_batch = EMBED_BATCH
        self._embed_progress: list[int] | None = None  # [done, total] while a backlog runs
        self._failures = 0
        self.query_vectors = QueryVectorCache(lambda: self._embedder, busy=busy)

    # --- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Start the index worker (initial scan, watcher); returns at once."""
        if not self.config.enabled or self._thread is not None:
            return
        self._state = "starting"
        self._thread = threading.Thread(target=self._run, name="exlsp-index", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker and the watcher; the table stays on disk for the next start."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._watcher is not None:
            self._watcher.stop()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        self.query_vectors.close()
        if thread is not None and thread.is_alive():
            # Still inside a write: the lock goes with the process, not before.
            log.warning("index worker did not stop within %.0f s", timeout)
        else:
            self._writer_lock.release()
        self._state = "stopped"

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

    # --- inputs from the server ----------------------------------------------

    def file_events(self, events: Iterable[tuple[str | Path, object]]) -> None:
        """File changes reported by the editor: (path or file:// URI, kind).

        `kind` is a `ChangeKind`, "created"/"changed"/"deleted" or LSP's
        FileChangeType (1, 2, 3). Paths outside the workspace, and paths that the
        rules surely ignore, are dropped here (no file system access: the caller
        may be the event loop); the worker checks the rest, links resolved.
        """
        parsed: list[FileEvent] = []
        for path, kind in events:
            rel = self._files_rules.relpath(path)
            if rel is None:
                continue
            if rel == "":  # the folder itself
                self.rescan()
                continue
            if self._files_rules.surely_ignored(rel):
                continue
            parsed.append((rel, ChangeKind.parse(kind)))
        self._add_events(parsed)

    def rescan(self) -> None:
        """Re-check the whole workspace (after the configuration or many files changed)."""
        with self._cond:
            self._rescan = True
            self._cond.notify_all()

    def note_edit(self, uri_or_path: str, text: str, line: int) -> None:
        """Remember that the lines starting at `line` now read `text` (an unsaved edit).

        Edits are context for prompts, so they pass the checks a file read does:
        edits of secret files (by name in any case, inside the workspace or not,
        or through a link to one) are not kept, nor edits whose text holds a
        secret, which also take the nearby edits before them (a key typed bit
        by bit) with them.
        """
        path = self._edit_path(uri_or_path)
        if path is None:
            return
        lines = max(1, text.count("\n") + (0 if text.endswith("\n") else 1))
        edit = RecentEdit(path, max(0, line), max(0, line) + lines, text, time.monotonic())
        secret = secret_in_text(text) is not None
        with self._cond:
            kept = [
                e
                for e in self._recent
                if not (
                    e.path == edit.path
                    and e.start_line <= edit.end_line + 2
                    and edit.start_line <= e.end_line + 2
                )
            ]
            if not secret:
                kept.append(edit)
            self._recent = collections.deque(kept[-MAX_RECENT_EDITS:])

    def _edit_path(self, uri_or_path: str) -> str | None:
        """The path an edit is kept under (None: a secret file), kept per open document
        (until `forget_document`): it is asked at every keystroke and path rules are
        not cheap."""
        if uri_or_path in self._edit_paths:
            return self._edit_paths[uri_or_path]
        rel = self._files_rules.relpath(uri_or_path)
        files = self._files_rules
        denied = files.is_denied(rel or files.plain_path(uri_or_path)) or secret_path(
            files.local_path(uri_or_path)
        )
        path = None if denied else (rel or uri_or_path)
        if len(self._edit_paths) >= 1024:
            self._edit_paths.clear()
        self._edit_paths[uri_or_path] = path
        return path

    def recent_edits(self, exclude_path: str | None = None, limit: int = 3) -> list[RecentEdit]:
        """The latest edits, newest first, leaving out those of `exclude_path`."""
        with self._cond:
            edits = list(self._recent)
        out = [e for e in reversed(edits) if e.path != exclude_path]
        return out[: max(0, limit)]

    def forget_document(self, uri_or_path: str) -> None:
        """Drop what is kept for a closed document: its recent edits, its edit path."""
        rel = self._files_rules.relpath(uri_or_path)
        path = rel if rel else uri_or_path
        self._edit_paths.pop(uri_or_path, None)
        self.query_vectors.forget(path)
        with self._cond:
            self._recent = collections.deque(e for e in self._recent if e.path != path)

    def relpath(self, uri_or_path: str) -> str | None:
        """Workspace-relative path of a path or file:// URI (None outside the workspace)."""
        return self._files_rules.relpath(uri_or_path)

    # --- queries -------------------------------------------------------------

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

    # --- the worker ----------------------------------------------------------

    def _add_events(self, events: list[FileEvent]) -> None:
        if not events:
            return
        with self._cond:
            self._debouncer.add(events, time.monotonic())
            self._cond.notify_all()

    def _on_watch_events(self, events: list[FileEvent]) -> None:
        self.file_events(events)

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

    def _yield_to_completions(self) -> None:
        """Wait (up to YIELD_MAX_S) while completions are being computed."""
        wait_while_busy(self._busy, YIELD_MAX_S, lambda: self._stopping)

    def _emit(self, event: ProgressEvent) -> None:
        if self._on_progress is None:
            return
        try:
            self._on_progress(event)
        except Exception:
            log.exception("progress callback failed")

    def _fingerprint(self) -> tuple[dict[str, object], int | None]:
        dim: int | None = None
        name: str | None = None
        if self._given_embedder is not None:
            name, dim = self._given_embedder.name, self._given_embedder.dim
        else:
            resolved = resolve_model(self.config)
            if resolved is not None:
                dim = peek_dimension(resolved[1])
                name = resolved[0] if dim is not None else None
        self._embedding_name = name
        chunker = [CHUNKER_VERSION, self._chunker.max_lines, self._chunker.overlap]
        return {"chunker": chunker, "embedding": name}, dim

    def _run(self) -> None:
        try:
            fingerprint, dim = self._fingerprint()
            if not self._acquire_writer(fingerprint, dim):
                return
            store = make_store(self.database_dir, fingerprint, dim, self.config)
            store.open()
            self._store = store
            if self._use_watchdog:
                watcher = WorkspaceWatcher(
                    self.root,
                    self._on_watch_events,
                    skip=lambda p: (
                        (r := self._files_rules.relpath(p)) is None
                        or self._files_rules.surely_ignored(r)
                    ),
                )
                if watcher.start():
                    self._watcher = watcher
            self._files = store.file_states()
            self._job = "scan"
            verify = store.meta_value("checks") != CHECKS_VERSION
            if verify and self._files:
                log.info("index %s: checking every file again (new rules)", self.root)
            self._scan(initial=True, verify=verify)
            if verify:
                store.set_meta_value("checks", CHECKS_VERSION)
            self._after_writes(force_optimize=True)
            with self._cond:
                self._job = "setup"
                self._scan_done = True
                self._cond.notify_all()
            self._load_embedder()
            with self._cond:
                self._setup_done = True
                self._cond.notify_all()
            self._loop()
        except Exception as exc:
            self._last_error = f"{type(exc).__name__}: {exc}"
            log.exception("the workspace index stopped")
            self._fail("worker", f"the workspace index stopped: {self._last_error}")
        finally:
            with self._cond:
                self._job = None
                self._cond.notify_all()

    def _acquire_writer(self, fingerprint: dict[str, object], dim: int | None) -> bool:
        """Take the writer lock; until it is free, serve the other process's index read-only."""
        while True:
            if self._writer_lock.acquire():
                if self._read_only:
                    log.info("index %s: now the writer", self.database_dir)
                    self._store = None
                self._read_only = False
                return True
            if self._store is None:
                try:
                    store = make_store(
                        self.database_dir, fingerprint, dim, self.config, read_only=True
                    )
                    store.open()
                    self._store = store
                    self._chunk_count = store.count_rows()
                    self._load_embedder()
                except Exception as exc:
                    log.debug("read-only open failed: %s", exc)
                self._embedder_tried = self._store is not None
            if not self._read_only:
                log.info(
                    "index %s is maintained by another process: searching it read-only",
                    self.database_dir,
                )
                self._state = "read-only"
            with self._cond:
                self._read_only = True  # after the first open attempt: wait_idle returns
                self._cond.notify_all()
                if self._stopping:
                    return False
                self._cond.wait(READ_ONLY_RETRY_S)
                if self._stopping:
                    return False

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

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        return
                    if self._rescan:
                        self._rescan = False
                        job: tuple[str, dict[str, ChangeKind]] = ("scan", {})
                        break
                    due = self._debouncer.due_in(time.monotonic())
                    if due == 0:
                        job = ("batch", self._debouncer.drain())
                        break
                    # Also while events wait for a pause: under constant file
                    # activity the backlog advances a step (about EMBED_STEP_S)
                    # at a time between batches, instead of never.
                    if self._backlog and self._embedder is not None:
                        job = ("embed", {})
                        break
                    if self._optimize_due() and due is None:
                        job = ("optimize", {})
                        break
                    self._job = None
                    if due is not None:
                        self._state = "pending"
                    else:
                        self._state = "idle" if self._failure is None else "failed"
                    self._cond.notify_all()
                    self._cond.wait(due if due is not None else 1.0)
                self._job = job[0]
            try:
                if job[0] == "scan":
                    self._scan(initial=False)
                    self._after_writes()
                elif job[0] == "batch":
                    self._apply_batch(job[1])
                    self._after_writes()
                elif job[0] == "embed":
                    self._embed_step()
                    self._works("embed")
                else:
                    self._optimize()
                if job[0] in {"scan", "batch"}:
                    self._failures = 0
                    self._works("index")
            except Exception as exc:  # one failed step must not end the index
                self._last_error = f"{type(exc).__name__}: {exc}"
                log.exception("index step %s failed", job[0])
                if job[0] == "embed":
                    self._backlog = False
                    progress, self._embed_progress = self._embed_progress, None
                    if progress is not None and progress[1]:
                        reason = f"failed: {self._last_error}"
                        self._emit(
                            ProgressEvent("end", "embed", "Embedding chunks", reason, *progress)
                        )
                    self._fail("embed", f"embedding failed: {self._last_error}")
                self._recover_store()
                if job[0] in {"scan", "batch"}:
                    # The batch's events are gone: re-check everything, a few times.
                    self._failures += 1
                    if self._failures <= MAX_RETRIES:
                        with self._cond:
                            self._cond.wait(float(self._failures))
                        self.rescan()
                    else:
                        self._fail("index", f"indexing failed: {self._last_error}")

    def _recover_store(self) -> None:
        """After a failed write, reopen (and if need be rebuild) the table."""
        store = self._store
        if store is None:
            return
        try:
            store.open()
            self._files = store.file_states()
            if store.rebuilt:
                store.rebuilt = False
                self.rescan()
        except Exception:
            log.exception("reopening the index table failed")

    # --- scanning and batches --------------------------------------------------

    def _scan(self, *, initial: bool, verify: bool = False) -> None:
        """Reconcile the whole workspace with the table (`verify`: read every file,
        also those whose size and mtime did not change)."""
        started = time.monotonic()
        self._state = "scanning"
        self._files_rules.reload()
        candidates = list(self._files_rules.walk())
        seen = self._reconcile(
            candidates,
            title="Indexing workspace" if initial else "Re-indexing workspace",
            always_report=True,
            verify=verify,
        )
        gone = [p for p in self._files if p not in seen]
        self._delete(gone)
        self._chunk_count = self._count()
        if initial:
            self._scan_seconds = time.monotonic() - started
        log.info(
            "index %s: %d files, %d chunks (scan %.1f s)",
            self.root,
            len(self._files),
            self._chunk_count,
            time.monotonic() - started,
        )

    def _apply_batch(self, batch: dict[str, ChangeKind]) -> None:
        self._batches += 1
        self._state = "updating"
        if any(p == ".gitignore" or p.endswith("/.gitignore") for p in batch):
            self._scan(initial=False)
            return
        check: set[str] = set()
        known: list[str] | None = None
        for rel, kind in batch.items():
            path = self._files_rules.abspath(rel)
            if rel not in self._files:
                # Maybe a deleted or moved-away directory: everything indexed under it.
                if known is None:
                    known = sorted(self._files)
                prefix = rel + "/"
                i = bisect.bisect_left(known, prefix)
                while i < len(known) and known[i].startswith(prefix):
                    check.add(known[i])
                    i += 1
            if self._files_rules.real_relpath(rel) is None:
                # Through a link out of the workspace: never read or walked (and
                # whatever was indexed under this path goes).
                check.add(rel)
                continue
            if kind != ChangeKind.DELETED and os.path.isdir(path) and not os.path.islink(path):
                check.update(self._files_rules.walk(rel))
            else:
                check.add(rel)
        seen = self._reconcile(
            sorted(check), title="Updating index", always_report=len(check) > LARGE_BATCH
        )
        self._delete([p for p in check if p in self._files and p not in seen])
        self._chunk_count = self._count()

    def _reconcile(
        self, paths: Sequence[str], *, title: str, always_report: bool, verify: bool = False
    ) -> set[str]:
        """Index each path whose content changed; returns the paths that are indexable."""
        seen: set[str] = set()
        total = len(paths)
        if always_report:
            self._emit(ProgressEvent("begin", "index", title, f"0/{total} files", 0, total))
        try:
            self._read_and_flush(
                paths, seen, title=title, always_report=always_report, verify=verify
            )
        except Exception as exc:
            if always_report:  # the client's progress ends, with the reason
                reason = f"failed: {type(exc).__name__}: {exc}"
                self._emit(ProgressEvent("end", "index", title, reason, 0, total))
            raise
        if always_report:
            self._emit(
                ProgressEvent("end", "index", title, f"{len(seen)} files indexed", total, total)
            )
        return seen

    def _read_and_flush(
        self,
        paths: Sequence[str],
        seen: set[str],
        *,
        title: str,
        always_report: bool,
        verify: bool = False,
    ) -> None:
        """Read `paths`, chunk the changed ones and write them; indexable ones go in `seen`."""
        pending: dict[str, tuple[FileState, list[Chunk]]] = {}
        pending_chunks = 0
        total = len(paths)
        last_report = time.monotonic()
        for done, rel in enumerate(paths, start=1):
            if self._stopping:
                break
            if always_report and done % YIELD_EVERY_FILES == 0:
                self._yield_to_completions()
            old = self._files.get(rel)
            if (
                old is not None
                and not verify
                and self._files_rules.stat_key(rel) == (old.mtime_ns, old.size)
            ):
                seen.add(rel)
                continue
            fr: FileRead = self._files_rules.read(rel)
            if fr.verdict != Verdict.OK:
                if fr.verdict not in {Verdict.MISSING, Verdict.DIRECTORY}:
                    log.debug("not indexed: %s (%s)", display_path(rel), fr.verdict.value)
                continue
            seen.add(rel)
            state = FileState(fr.content_hash, fr.mtime_ns, fr.size)
            if old is not None and old.content_hash == fr.content_hash:
                self._files[rel] = state  # touched, not changed
                continue
            chunks = self._chunker.chunk(rel, fr.text)
            pending[rel] = (state, chunks)
            pending_chunks += len(chunks)
            if pending_chunks >= FLUSH_CHUNKS:
                self._flush(pending)
                pending, pending_chunks = {}, 0
            now = time.monotonic()
            if always_report and now - last_report >= PROGRESS_INTERVAL_S:
                last_report = now
                self._emit(
                    ProgressEvent("report", "index", title, f"{done}/{total} files", done, total)
                )
        self._flush(pending)

    def _flush(self, pending: dict[str, tuple[FileState, list[Chunk]]]) -> None:
        if not pending:
            return
        store = self._require_store()
        new = all(p not in self._files for p in pending)
        store.replace_files(pending, new=new)
        self._commits += 1
        self._commits_since_optimize += 1
        for rel, (state, _chunks) in pending.items():
            self._files[rel] = state
        if self._embedder is not None:
            self._backlog = True

    def _delete(self, paths: Sequence[str]) -> None:
        if not paths:
            return
        self._require_store().delete_paths(paths)
        self._commits += 1
        self._commits_since_optimize += 1
        for p in paths:
            self._files.pop(p, None)

    def _require_store(self) -> ChunkStore:
        if self._store is None:
            raise StoreUnavailable("the index table is not open")
        return self._store

    def _count(self) -> int:
        store = self._require_store()
        if self._embedder is not None:
            self._vector_count = store.count_rows("vector IS NOT NULL")
        return store.count_rows()

    # --- embeddings and maintenance --------------------------------------------

    def _embed_step(self) -> None:
        """Embed one batch of the backlog (its progress in `_embed_progress`)."""
        store = self._require_store()
        embedder = self._embedder
        if embedder is None:
            self._backlog = False
            return
        self._state = "embedding"
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
