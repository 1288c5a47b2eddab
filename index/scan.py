"""Scans and batches of a `WorkspaceIndex`: the workspace (or the files a batch of
events names) reconciled with the table, on the index worker.
"""

from __future__ import annotations

import bisect
import logging
import os
import time
from collections.abc import Sequence

from exlsp.index.chunk import Chunk
from exlsp.index.embed import (
    wait_while_busy,
)
from exlsp.index.events import IndexEvents
from exlsp.index.files import FileRead, Verdict, display_path
from exlsp.index.status import ProgressEvent
from exlsp.index.store import (
    ChunkStore,
    FileState,
    StoreUnavailable,
)
from exlsp.index.watch import ChangeKind

log = logging.getLogger(__name__)

# Flush the rows gathered by a scan at this many chunks (bounds memory, shows progress).
FLUSH_CHUNKS = 4096
PROGRESS_INTERVAL_S = 0.25
# A batch larger than this reports progress, and gives way to completions.
LARGE_BATCH = 50
# While the completion backend is busy, heavy index work (scans, embedding, index
# builds) waits, but at most YIELD_MAX_S before each step so that a user who types
# without pause still gets an index.
YIELD_MAX_S = 2.0
# Files a scan reads between two looks at the completion backend.
YIELD_EVERY_FILES = 16


class IndexScan(IndexEvents):
    """Reading, chunking and writing files (worker thread)."""

    def _yield_to_completions(self) -> None:
        """Wait (up to YIELD_MAX_S) while completions are being computed."""
        wait_while_busy(self._busy, YIELD_MAX_S, lambda: self._stopping)

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
