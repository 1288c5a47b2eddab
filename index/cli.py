"""`exlsp index PATH` and `exlsp search PATH QUERY`: the index from a terminal.

Both exit non-zero with a one-line reason on stderr when the index does not
work (the worker stopped, indexing or embedding failed); `exlsp search` waits
for the embedding model, so that its hits carry vector scores when the index
has vectors.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TextIO

from exlsp.index.config import IndexConfig
from exlsp.index.service import ProgressEvent, UnsafeRoot, WorkspaceIndex

# How long `exlsp search` waits for the index to be searchable (scan, model load).
SEARCH_READY_S = 300.0


class _ProgressBar:
    """One line on stderr, redrawn in place when stderr is a terminal."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._last_line = ""

    def __call__(self, event: ProgressEvent) -> None:
        width = 30
        pct = event.percentage
        filled = int(width * (pct or 0) / 100)
        bar = "#" * filled + "-" * (width - filled)
        line = f"{event.title:<22} [{bar}] {pct if pct is not None else 0:3d}%  {event.message}"
        if self._tty:
            self._stream.write("\r" + line.ljust(len(self._last_line)))
            if event.kind == "end":
                self._stream.write("\n")
        elif event.kind in {"begin", "end"}:
            self._stream.write(line + "\n")
        self._stream.flush()
        self._last_line = line


def run_index(path: Path, config: IndexConfig) -> int:
    """Build or update the index of `path`, with progress on stderr; 0 on success."""
    root = path.resolve()
    if not root.is_dir():
        print(f"exlsp index: {path} is not a directory", file=sys.stderr)
        return 2
    started = time.monotonic()
    try:
        index = WorkspaceIndex(root, config, _ProgressBar(sys.stderr), use_watchdog=False)
    except UnsafeRoot as exc:
        print(f"exlsp index: {exc}", file=sys.stderr)
        return 2
    index.start()
    try:
        while not index.wait_idle(timeout=1.0):
            if index.stats().failure is not None:
                break
    except KeyboardInterrupt:
        print("\ninterrupted: the index keeps what was written so far", file=sys.stderr)
        index.stop()
        return 130
    stats = index.stats()
    index.stop()
    elapsed = time.monotonic() - started
    if stats.read_only:
        print(
            f"exlsp index: {stats.database_dir} is being updated by another process "
            "(an exlsp server?); nothing written",
            file=sys.stderr,
        )
        return 1
    if stats.failure is not None:
        print(f"exlsp index: {stats.failure}", file=sys.stderr)
        return 1
    vectors = (
        f", {stats.chunks_with_vectors} with vectors ({stats.embedding_model})"
        if stats.chunks_with_vectors is not None
        else " (lexical only)"
    )
    print(f"files:    {stats.files}")
    print(f"chunks:   {stats.chunks}{vectors}")
    print(f"time:     {elapsed:.1f} s")
    print(f"database: {stats.database_dir}")
    return 0


def run_search(path: Path, query: str, config: IndexConfig, limit: int = 10) -> int:
    """Print the best chunks of the index of `path` for `query`; 0 on success."""
    root = path.resolve()
    try:
        index = WorkspaceIndex(root, config, None, use_watchdog=False)
    except UnsafeRoot as exc:
        print(f"exlsp search: {exc}", file=sys.stderr)
        return 2
    index.start()
    try:
        deadline = time.monotonic() + SEARCH_READY_S
        # Searching needs the table open and the embedding model loaded; a writer
        # also finishes its update first (quick when the index is current), a
        # reader searches what is there.
        while not index.wait_searchable(timeout=0.5):
            if index.stats().failure is not None or time.monotonic() > deadline:
                break
        stats = index.stats()
        if stats.failure is not None:
            print(f"exlsp search: {stats.failure}", file=sys.stderr)
            return 1
        if stats.chunks == 0 and not index.ready:
            print(f"exlsp search: no index for {root} (run `exlsp index {path}`)", file=sys.stderr)
            return 1
        started = time.perf_counter()
        hits = index.search(query, limit=limit)
        elapsed_ms = (time.perf_counter() - started) * 1000
    finally:
        index.stop()
    if not hits:
        print("no results")
        return 0
    for n, h in enumerate(hits, start=1):
        lexical = f"{h.lexical_score:.2f}#{h.lexical_rank}" if h.lexical_score is not None else "-"
        vector = (
            f"{1.0 - h.vector_distance:.3f}#{h.vector_rank}"
            if h.vector_distance is not None
            else "-"
        )
        symbol = f"  {h.symbol}" if h.symbol else ""
        print(
            f"{n:2d}. {h.path}:{h.start_line + 1}-{h.end_line}{symbol}\n"
            f"    lexical {lexical}  vector {vector}  fused {h.score:.4f}"
        )
    print(f"({len(hits)} hits in {elapsed_ms:.1f} ms)")
    return 0
