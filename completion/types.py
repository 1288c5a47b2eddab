"""Plain data types the engine speaks: no LSP types below the server layer."""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from exlsp.completion.languages import Language, language


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


def line_body(line: str) -> str:
    """A line without its ending (``\\n``, ``\\r\\n`` or ``\\r``)."""
    if line.endswith("\r\n"):
        return line[:-2]
    if line.endswith(("\n", "\r")):
        return line[:-1]
    return line


class InvalidPosition(ValueError):
    """The request points outside the document."""


# Lines above and below the cursor line that the filters and type-ahead look at.
CURSOR_WINDOW_LINES = 20
# Characters of the cursor line on each side of the cursor that they look at.
CURSOR_LINE_CHARS = 2000

# Whether a cursor calls for a multi-line suggestion: (line_prefix, line_suffix,
# language id) -> bool, as `exlsp.completion.postprocess.decide_multiline` decides.
MultilineDecision = Callable[[str, str, str], bool]


@dataclass(frozen=True)
class CursorContext:
    """The cursor line and the lines around it, cut once per request.

    The prompt builder, the post-processing filters, type-ahead and the
    completion-item fallback all read this one value instead of splitting the
    cursor line again. `above` and `below` are windows of whole lines without
    their endings (`above` top-down, the nearest last).
    """

    left: str  # the cursor line left of the cursor
    right: str  # the cursor line right of the cursor, without its ending
    ending: str  # the line ending ("\n", "\r\n", "\r"), "" on the last line
    above: tuple[str, ...]
    below: tuple[str, ...]
    language: Language
    multiline: bool = False

    @classmethod
    def at(cls, doc: DocumentView, multiline: bool | MultilineDecision = False) -> CursorContext:
        """The cursor of `doc`; the one check that its position is inside the document.

        `multiline`: the decision itself, or how to take it from the cursor line.
        """
        if not 0 <= doc.line < max(1, len(doc.lines)):
            raise InvalidPosition(f"line {doc.line} is outside the document")
        line = doc.lines[doc.line] if doc.lines else ""
        body = line_body(line)
        if not 0 <= doc.character <= len(body):
            raise InvalidPosition(f"character {doc.character} is past the end of line {doc.line}")
        left, right = body[: doc.character], body[doc.character :]
        if not isinstance(multiline, bool):
            multiline = multiline(
                left[-CURSOR_LINE_CHARS:], right[:CURSOR_LINE_CHARS], doc.language
            )
        lo = max(0, doc.line - CURSOR_WINDOW_LINES)
        hi = doc.line + 1 + CURSOR_WINDOW_LINES
        return cls(
            left=left,
            right=right,
            ending=line[len(body) :],
            above=tuple(line_body(s) for s in doc.lines[lo : doc.line]),
            below=tuple(line_body(s) for s in doc.lines[doc.line + 1 : hi]),
            language=language(doc.language),
            multiline=multiline,
        )

    @property
    def line(self) -> str:
        """The cursor line without its ending."""
        return self.left + self.right

    @property
    def line_prefix(self) -> str:
        """The part of `left` the filters and type-ahead look at."""
        return self.left[-CURSOR_LINE_CHARS:]

    @property
    def line_suffix(self) -> str:
        """The part of `right` the filters look at."""
        return self.right[:CURSOR_LINE_CHARS]


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
    # The request's cursor, as the engine cut it (None where no engine answered).
    cursor: CursorContext | None = None


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
