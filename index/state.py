"""What the parts of a `WorkspaceIndex` share: the attributes several parts use.

`WorkspaceIndex.__init__` (index/service.py) sets them; the parts (`status`,
`events`, `scan`, `upkeep`, `query`, `service`) are the class's methods, cut by
concern, each declaring the attributes only it writes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from exlsp.index.chunk import Chunker
from exlsp.index.config import IndexConfig
from exlsp.index.embed import (
    Embedder,
    QueryVectorCache,
)
from exlsp.index.files import WorkspaceFiles
from exlsp.index.store import (
    ChunkStore,
    FileState,
    WriterLock,
)
from exlsp.index.watch import Debouncer, WorkspaceWatcher

if TYPE_CHECKING:
    from exlsp.index.status import ProgressEvent


class UnsafeRoot(ValueError):
    """The folder is no workspace to index whole: the file system root or the home folder."""


class IndexState:
    """The attributes of a `WorkspaceIndex`, for its parts to share."""

    root: Path
    config: IndexConfig
    database_dir: Path | str  # a local directory or an s3:// URI
    query_vectors: QueryVectorCache
    _on_progress: Callable[[ProgressEvent], None] | None
    _on_failure: Callable[[str], None] | None
    _use_watchdog: bool
    _given_embedder: Embedder | None
    _busy: Callable[[], bool] | None
    _files_rules: WorkspaceFiles
    _edit_paths: dict[str, str | None]
    _chunker: Chunker

    # Under `_cond`: the worker's inputs and what waiters look at.
    _cond: threading.Condition
    _debouncer: Debouncer
    _rescan: bool
    _stopping: bool
    _job: str | None  # "scan", "batch", "embed", "optimize", "setup"; None: idle
    _scan_done: bool  # the initial scan has been written
    _setup_done: bool  # ... and the embedding model loaded (or not configured)
    _embedder_tried: bool  # the model was loaded (or not) for searching

    # Status.
    _state: str
    _batches: int
    _commits: int
    _last_error: str | None
    _scan_seconds: float | None

    # Shared with searching threads (set once by the worker).
    _store: ChunkStore | None
    _embedder: Embedder | None
    _embedding_name: str | None
    _read_only: bool

    # Worker-only.
    _files: dict[str, FileState]
    _chunk_count: int
    _vector_count: int | None
    _backlog: bool
    _commits_since_optimize: int
    _rows_since_optimize: int
    _last_optimize: float
    _writer_lock: WriterLock
    _watcher: WorkspaceWatcher | None
    _thread: threading.Thread | None
    _failures: int
