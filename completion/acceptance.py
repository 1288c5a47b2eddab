"""Acceptance statistics: which suggestions were shown and which the user took.

Kept on this machine only, in one JSON file (`stats_path()`), never sent
anywhere; `completion.acceptanceStats: false` turns them off. Counts are
grouped by model and language. Updates happen on the event loop and only
touch memory; `flush` (blocking: call it off the loop) adds what was counted
since the last flush to the file, under a file lock, so that several editors
sharing the file do not lose each other's counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FILE_NAME = "stats.json"
FLUSH_AFTER_S = 30.0  # a change is on disk this long after it was counted, at most
_RECENT = 512  # suggestions remembered for a later accept


def stats_path() -> Path:
    """`$EXLSP_STATE_DIR/stats.json`, else the user state directory's."""
    env = os.environ.get("EXLSP_STATE_DIR")
    if env:
        return Path(env).expanduser() / FILE_NAME
    import platformdirs

    return Path(platformdirs.user_state_dir("exlsp")) / FILE_NAME


@dataclass
class AcceptanceCounts:
    shown: int = 0
    accepted: int = 0
    partiallyAccepted: int = 0
    charsShown: int = 0
    charsAccepted: int = 0
    # Sum of the latencies of the shown suggestions (request to answer).
    latencyMsTotal: float = 0.0

    def add(self, other: AcceptanceCounts) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def accept_rate(self) -> float:
        return self.accepted / self.shown if self.shown else 0.0

    @property
    def mean_latency_ms(self) -> float:
        return self.latencyMsTotal / self.shown if self.shown else 0.0

    @classmethod
    def from_wire(cls, data: Any) -> AcceptanceCounts:
        counts = cls()
        if isinstance(data, dict):
            for f in dataclasses.fields(cls):
                value = data.get(f.name)
                if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
                    setattr(counts, f.name, type(getattr(counts, f.name))(value))
        return counts


Totals = dict[tuple[str, str], AcceptanceCounts]  # (model, language) -> counts


@dataclass
class _Shown:
    model: str
    language: str
    typed: int  # characters of the item's insert text the user had typed already
    length: int  # characters of the item's insert text
    accepted: bool = False
    counted: int = 0  # characters of the insert text counted as accepted


def load(path: Path) -> Totals:
    """The totals in `path`; empty when it is missing or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("acceptance statistics in %s unreadable (%s); starting again", path, e)
        return {}
    totals: Totals = {}
    models = data.get("models") if isinstance(data, dict) else None
    if isinstance(models, dict):
        for model, languages in models.items():
            if isinstance(languages, dict):
                for language, counts in languages.items():
                    totals[(str(model), str(language))] = AcceptanceCounts.from_wire(counts)
    return totals


def to_wire(totals: Totals) -> dict[str, Any]:
    models: dict[str, dict[str, Any]] = {}
    for (model, language), counts in sorted(totals.items()):
        models.setdefault(model, {})[language] = dataclasses.asdict(counts)
    return {"version": 1, "models": models}


class AcceptanceStats:
    """Counts suggestions shown and accepted; see the module docstring."""

    def __init__(self, path: Path | None = None, enabled: bool = True) -> None:
        self.path = path or stats_path()
        self.enabled = enabled
        self._pending: Totals = {}
        self._recent: OrderedDict[str, _Shown] = OrderedDict()
        self._ids = itertools.count(1)
        self._tag = secrets.token_hex(4)  # ids from another server process never match
        self._lock = threading.Lock()  # `_pending` is swapped by a flush on another thread
        self._timer: asyncio.TimerHandle | None = None

    def _counts(self, model: str, language: str) -> AcceptanceCounts:
        return self._pending.setdefault((model, language), AcceptanceCounts())

    def shown(self, model: str, language: str, typed: int, added: int, latency_ms: float) -> str:
        """Count one suggestion shown; its id for the accept command ("" when off).

        The item inserts the `typed` characters already left of the cursor and then
        `added` new ones; accepted lengths count from the start of the item.
        """
        if not self.enabled:
            return ""
        sid = f"{self._tag}-{next(self._ids)}"
        self._recent[sid] = _Shown(model, language or "unknown", typed, typed + added)
        while len(self._recent) > _RECENT:
            self._recent.popitem(last=False)
        with self._lock:
            counts = self._counts(model, language or "unknown")
            counts.shown += 1
            counts.charsShown += added
            counts.latencyMsTotal += latency_ms
        self._arm()
        return sid

    def accepted(self, sid: str) -> bool:
        """The whole suggestion `sid` was accepted; False for an unknown id."""
        item = self._recent.get(sid)
        if not self.enabled or item is None or item.accepted:
            return False
        item.accepted = True
        self._count_chars(item, item.length, partial=False)
        return True

    def partially_accepted(self, sid: str, accepted_length: int) -> bool:
        """`accepted_length` characters of `sid`'s insert text are in the document now."""
        item = self._recent.get(sid)
        if not self.enabled or item is None or item.accepted:
            return False
        self._count_chars(item, min(max(0, accepted_length), item.length), partial=True)
        return True

    def _count_chars(self, item: _Shown, upto: int, partial: bool) -> None:
        # Characters the user had typed before the suggestion are not the model's.
        upto = max(upto, item.typed)
        gained = max(0, upto - max(item.counted, item.typed))
        item.counted = max(item.counted, upto)
        with self._lock:
            counts = self._counts(item.model, item.language)
            if partial:
                counts.partiallyAccepted += 1
            else:
                counts.accepted += 1
            counts.charsAccepted += gained
        self._arm()

    # -- the file ---------------------------------------------------------------

    @property
    def dirty(self) -> bool:
        return bool(self._pending)

    def _arm(self) -> None:
        """Flush within FLUSH_AFTER_S, on a worker thread of the running loop."""
        if self._timer is not None:
            return
        with contextlib.suppress(RuntimeError):  # no loop: flushed at close
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(FLUSH_AFTER_S, self._flush_soon, loop)

    def _flush_soon(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        loop.run_in_executor(None, self.flush)

    def flush(self) -> None:
        """Add the counts since the last flush to the file. Blocking."""
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with _locked(self.path.with_name(self.path.name + ".lock")):
                totals = load(self.path)
                for key, counts in pending.items():
                    totals.setdefault(key, AcceptanceCounts()).add(counts)
                tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps(to_wire(totals), indent=1) + "\n", encoding="utf-8")
                os.replace(tmp, self.path)
        except OSError as e:
            log.warning("acceptance statistics not saved to %s: %s", self.path, e)

    def close(self) -> None:
        """Cancel the timer and flush. Blocking."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()

    def totals(self) -> Totals:
        """The file's totals plus what is not flushed yet."""
        totals = load(self.path)
        with self._lock:
            for key, counts in self._pending.items():
                totals.setdefault(key, AcceptanceCounts()).add(counts)
        return totals


@contextlib.contextmanager
def _locked(lock_path: Path) -> Any:
    with open(lock_path, "a+b") as f:
        try:
            import fcntl
        except ImportError:  # Windows: last writer wins
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def format_totals(totals: Totals) -> str:
    """A table of the totals, one row per model and language, and a total per model."""
    if not totals:
        return "no suggestions counted yet"
    header = (
        f"{'model':<28} {'language':<12} {'shown':>7} {'accepted':>8} {'rate':>6} "
        f"{'partial':>7} {'chars':>8} {'latency':>8}"
    )
    rows = [header]
    for model in sorted({m for m, _ in totals}):
        name = Path(model).name or model
        model_total = AcceptanceCounts()
        for (m, language), counts in sorted(totals.items()):
            if m != model:
                continue
            model_total.add(counts)
            rows.append(_row(name, language, counts))
        rows.append(_row(name, "(all)", model_total))
    return "\n".join(rows)


def _row(model: str, language: str, c: AcceptanceCounts) -> str:
    return (
        f"{model[:28]:<28} {language[:12]:<12} {c.shown:>7} {c.accepted:>8} "
        f"{c.accept_rate:>6.1%} {c.partiallyAccepted:>7} {c.charsAccepted:>8} "
        f"{c.mean_latency_ms:>6.0f}ms"
    )
