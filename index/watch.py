"""File-change events: the editor's, or watchdog's as a fallback, debounced into batches.

The server prefers the editor's `workspace/didChangeWatchedFiles` and feeds
those in through `WorkspaceIndex.file_events`; the watchdog observer here is
for editors that do not offer it. Either way events land in a `Debouncer`,
which releases them as one batch once the burst is over: the thousands of
events of a branch switch become one batch. Which paths are indexed at all
(.gitignore, exclude globs, the secret deny-list, binary and large files,
symlinks leaving the workspace) is decided by `exlsp.index.files`.
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class ChangeKind(enum.StrEnum):
    CREATED = "created"
    CHANGED = "changed"
    DELETED = "deleted"

    @classmethod
    def parse(cls, value: object) -> ChangeKind:
        """Accept a ChangeKind, its name or value, or LSP's FileChangeType number (1, 2, 3)."""
        if isinstance(value, ChangeKind):
            return value
        if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
            return {1: cls.CREATED, 2: cls.CHANGED, 3: cls.DELETED}.get(int(value), cls.CHANGED)
        text = str(value).lower()
        for kind in cls:
            if text in {kind.value, kind.name.lower()}:
                return kind
        return cls.CHANGED


FileEvent = tuple[str, ChangeKind]

# A burst of at least this many paths (a branch switch, a build) is gathered until
# a longer pause, BURST_QUIET_S, and for up to BURST_MAX_WAIT_S: a checkout
# whose events come in stages, or a busy machine that delays them, still makes
# one batch. A single save keeps the short pause.
BURST_EVENTS = 100
BURST_QUIET_S = 1.0
BURST_MAX_WAIT_S = 10.0


class Debouncer:
    """Collects path events until `quiet_s` passes without one (or `max_wait_s` in all).

    A burst of BURST_EVENTS paths or more waits for a longer pause (see there).
    Not thread-safe: the owner guards it. Times come from the caller's monotonic clock.
    A path's latest event wins; the kind is only a hint (every path is re-checked
    on disk when its batch runs).
    """

    def __init__(self, quiet_s: float, max_wait_s: float) -> None:
        self.quiet_s = max(0.0, quiet_s)
        self.max_wait_s = max(self.quiet_s, max_wait_s)
        self._pending: dict[str, ChangeKind] = {}
        self._first = 0.0
        self._last = 0.0

    def add(self, events: Iterable[FileEvent], now: float) -> int:
        added = 0
        for path, kind in events:
            if not self._pending:
                self._first = now
            self._pending[path] = kind
            added += 1
        if added:
            self._last = now
        return added

    def __len__(self) -> int:
        return len(self._pending)

    def due_in(self, now: float) -> float | None:
        """Seconds until the pending batch is due (0: now); None when nothing is pending."""
        if not self._pending:
            return None
        quiet, max_wait = self.quiet_s, self.max_wait_s
        if len(self._pending) >= BURST_EVENTS:
            quiet, max_wait = max(quiet, BURST_QUIET_S), max(max_wait, BURST_MAX_WAIT_S)
        due = min(self._last + quiet, self._first + max_wait)
        return max(0.0, due - now)

    def drain(self) -> dict[str, ChangeKind]:
        batch, self._pending = self._pending, {}
        return batch


class WorkspaceWatcher:
    """A watchdog observer on the workspace root that forwards events to `sink`.

    `skip(abs_path)` drops events cheaply on the observer thread (VCS internals);
    the full rules run later on the index worker.
    """

    def __init__(
        self,
        root: Path,
        sink: Callable[[list[FileEvent]], None],
        skip: Callable[[str], bool] | None = None,
    ) -> None:
        self.root = root
        self._sink = sink
        self._skip = skip or (lambda _path: False)
        self._observer: Any = None

    def start(self) -> bool:
        """Start watching; False (logged) when watchdog is unavailable or fails."""
        try:
            from watchdog.events import FileSystemEvent, FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError:
            log.warning("watchdog is not installed: file changes are seen only through the editor")
            return False

        watcher = self

        class _Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                watcher._on_event(event)

        try:
            observer = Observer()
            observer.daemon = True
            observer.schedule(_Handler(), str(self.root), recursive=True)
            observer.start()
        except Exception as exc:  # e.g. inotify watch limit reached
            log.warning("cannot watch %s (%s): only the editor reports changes", self.root, exc)
            return False
        self._observer = observer
        return True

    def _on_event(self, event: Any) -> None:
        try:
            etype = event.event_type
            is_dir = bool(event.is_directory)
            if etype in {"opened", "closed_no_write"} or (is_dir and etype == "modified"):
                return
            events: list[FileEvent] = []
            src = os.fsdecode(event.src_path)
            if etype == "moved":
                dest = os.fsdecode(event.dest_path)
                events.append((src, ChangeKind.DELETED))
                events.append((dest, ChangeKind.CREATED))
            elif etype == "deleted":
                events.append((src, ChangeKind.DELETED))
            elif etype == "created":
                events.append((src, ChangeKind.CREATED))
            else:  # modified, closed (after a write)
                events.append((src, ChangeKind.CHANGED))
            events = [e for e in events if not self._skip(e[0])]
            if events:
                self._sink(events)
        except Exception:  # the observer thread must survive anything
            log.exception("watch event dropped")

    def stop(self) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            try:
                observer.stop()
                observer.join(timeout=5)
            except Exception:
                log.debug("stopping the observer failed", exc_info=True)
