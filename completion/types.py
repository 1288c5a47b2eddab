"""Plain data types the engine speaks: no LSP types below the server layer."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


class Trigger(enum.Enum):
    """Why the editor asked: typing (automatic) or an explicit keybinding (invoked)."""

    AUTOMATIC = "automatic"
    INVOKED = "invoked"


@dataclass(frozen=True)
class DocumentView:
    """A read-only view of one document at the cursor.

    `lines` hold the document split the way LSP counts lines (``\\n``, ``\\r\\n``
    and ``\\r`` only), each line keeping its line ending, so that the engine can
    cut prefix and suffix windows without joining or re-splitting the whole text.
    `character` is an index into ``lines[line]`` counted in Python characters
    (code points), already converted from the editor's position encoding.
    """

    uri: str
    lines: Sequence[str]
    line: int
    character: int
    language: str = ""
    path: str = ""
    version: int | None = None


@dataclass(frozen=True)
class CompletionRequest:
    document: DocumentView
    trigger: Trigger = Trigger.AUTOMATIC


@dataclass
class KvReuseStats:
    """What one generation cost the backend."""

    prompt_tokens: int = 0
    reused_tokens: int = 0
    prefilled_tokens: int = 0
    generated_tokens: int = 0
    ttft_ms: float | None = None  # time to first generated token, from job start
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    stop_reason: str = ""  # "eos", "stop", "max_tokens", "deadline", "cancelled", "error"
    # False when the KV cache is a remote server's that did not report its reuse:
    # reused_tokens is then 0 and prefilled_tokens the whole prompt, as unknowns.
    reuse_known: bool = True


@dataclass
class CompletionStats:
    """Per-request figures: returned by `exlsp/stats` and `exlsp complete --json`."""

    # "model", "type-ahead", "prefetch" (a suggestion made ahead, for the text after
    # an accept), "attached", "empty", "error"
    source: str = "model"
    prompt_tokens: int = 0
    reused_tokens: int = 0
    prefilled_tokens: int = 0
    generated_tokens: int = 0
    ttft_ms: float | None = None
    total_ms: float = 0.0
    prompt_build_ms: float = 0.0
    queue_ms: float = 0.0
    stop_reason: str = ""  # the job's, or "filter:<name>" when a filter's cut stopped it
    multiline: bool = False
    snippet_tokens: int = 0
    reuse_known: bool = True  # see KvReuseStats.reuse_known


@dataclass(frozen=True)
class Suggestion:
    """Text to insert at the cursor (the engine never replaces text before it)."""

    text: str


@dataclass
class CompletionResult:
    suggestions: list[Suggestion] = field(default_factory=list)
    stats: CompletionStats = field(default_factory=CompletionStats)
    error: str | None = None


# --- the seam with the index -------------------------------------------------


@dataclass(frozen=True)
class Snippet:
    """A piece of code from elsewhere in the workspace to show the model.

    `path` is workspace-relative where possible; lines are 0-based, end exclusive.
    """

    path: str
    text: str
    start_line: int = 0
    end_line: int = 0
    score: float = 0.0
    source: str = "retrieval"  # "retrieval" or "recent-edit"


@runtime_checkable
class ContextSource(Protocol):
    """Supplies snippets for a prompt. `index` implements it; `server` wires it in.

    `budget_chars` is a coarse upper bound; the engine trims by tokens.
    Called from the event loop: an implementation that must do real work
    hands it to its own thread and awaits it.
    """

    async def snippets(self, document: DocumentView, budget_chars: int) -> list[Snippet]: ...


class NoContext:
    """The context source used when no index is configured."""

    async def snippets(self, document: DocumentView, budget_chars: int) -> list[Snippet]:
        return []
