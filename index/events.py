"""Inputs of a `WorkspaceIndex`: file events (the editor's or the watcher's), rescans,
and the unsaved edits kept as context for prompts.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from exlsp.index.secrets import secret_in_text, secret_path
from exlsp.index.status import IndexStatus
from exlsp.index.watch import ChangeKind, FileEvent

log = logging.getLogger(__name__)

MAX_RECENT_EDITS = 32


@dataclass(frozen=True)
class RecentEdit:
    path: str  # workspace-relative where possible
    start_line: int
    end_line: int  # exclusive
    text: str
    stamp: float  # time.monotonic() of the edit


class IndexEvents(IndexStatus):
    """What the server and the watcher hand the index."""

    _recent: collections.deque[RecentEdit]  # under `_cond`

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

    def _add_events(self, events: list[FileEvent]) -> None:
        if not events:
            return
        with self._cond:
            self._debouncer.add(events, time.monotonic())
            self._cond.notify_all()

    def _on_watch_events(self, events: list[FileEvent]) -> None:
        self.file_events(events)

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
