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

The class is cut by concern: `status` (stats, waits, progress), `events`
(file events, edits), `scan` (scans and batches), `upkeep` (embeddings,
maintenance), `query` (search), and here the worker's start, run and loop.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import platformdirs

from exlsp.index.chunk import Chunker
from exlsp.index.config import IndexConfig
from exlsp.index.embed import (
    Embedder,
    QueryVectorCache,
    peek_dimension,
    resolve_model,
)
from exlsp.index.events import RecentEdit
from exlsp.index.files import WorkspaceFiles
from exlsp.index.query import IndexQuery
from exlsp.index.shared import make_store
from exlsp.index.state import UnsafeRoot
from exlsp.index.status import IndexStats, ProgressEvent
from exlsp.index.store import (
    ChunkStore,
    FileState,
    WriterLock,
    store_location,
)
from exlsp.index.watch import ChangeKind, Debouncer, WorkspaceWatcher

__all__ = [
    "CHUNKER_VERSION",
    "IndexStats",
    "ProgressEvent",
    "RecentEdit",
    "UnsafeRoot",
    "WorkspaceIndex",
]

log = logging.getLogger(__name__)

CHUNKER_VERSION = 1
# What a file must pass to be indexed (secrets by name, link and content; the
# real path inside the workspace). An index checked under an older version
# re-reads every file once at start, so that what is no longer allowed leaves it
# (unchanged files keep their rows and vectors).
CHECKS_VERSION = 2
# Retries of a failed scan or batch (as a rescan) before waiting for the next event.
MAX_RETRIES = 3
READ_ONLY_RETRY_S = 10.0


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


class WorkspaceIndex(IndexQuery):
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
        self._embed_batch = 0  # rows per embedding step; 0: not started (upkeep.EMBED_BATCH)
        self._embed_progress: list[int] | None = None  # [done, total] while a backlog runs
        self._failures = 0
        self.query_vectors = QueryVectorCache(lambda: self._embedder, busy=busy)

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
