"""The document around the cursor as the filters see it, and the facts they derive from it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property

from exlsp.completion.postprocess.scanner import (
    CLOSERS,
    MATCHING_OPENER,
    OPENERS,
    ScanState,
    Syntax,
    closed_below,
    code_brackets,
    ends_with_block_opener,
    open_above,
    syntax_for,
)
from exlsp.completion.types import CursorContext

# What may follow the cursor on its line and still leave room for a multi-line
# suggestion: the closers an editor inserts automatically.
_AUTO_CLOSED_TAIL = frozenset(")]}\"'`;, \t\r")


def _indent_width(line: str) -> int:
    """Leading spaces and tabs, each counted as one unit."""
    return len(line) - len(line.lstrip(" \t"))


def decide_multiline(line_prefix: str, line_suffix: str, language: str = "") -> bool:
    """Whether the cursor calls for a multi-line suggestion.

    Multi-line iff both hold:

    - the rest of the line (`line_suffix`) is blank or holds only what editors
      close automatically: closing brackets, quotes, ``;`` and ``,``;
    - `line_prefix` is blank, or ends (trailing spaces aside) with a block
      opener: ``{`` ``(`` ``[`` ``=>`` ``->``, an assignment ``=`` (not
      ``==`` ``!=`` ``<=`` ``>=``), ``do`` / ``then``, or ``:`` where it opens a
      block -- a Python compound-statement header (``def``, ``if``, ``for``,
      ``with``, ``match`` ...), a ``case`` / ``default`` label in any language,
      and any ``:`` for YAML-like or unknown languages.

    Otherwise single-line: the user is in the middle of an expression, or text
    follows the cursor that a multi-line suggestion would push down.
    """
    if any(ch not in _AUTO_CLOSED_TAIL for ch in line_suffix):
        return False
    head = line_prefix.rstrip()
    return not head or ends_with_block_opener(head, language)


@dataclass(frozen=True, slots=True)
class ContextFacts:
    """What the filters derive from a context, computed once per context."""

    base_indent: int
    prefix_indent: str
    prefix_blank: bool
    suffix_text: str
    suffix_starts_with_closer: bool
    next_line: str | None
    # The first two non-blank lines after the cursor line, trailing spaces stripped.
    lines_below: tuple[str, ...]
    syntax: Syntax
    cursor_state: ScanState
    open_at_cursor: tuple[str, ...]
    # The rest of the line up to its first bracket that closes one of the
    # cursor line's: what a model that rewrites the line end writes first.
    suffix_head: str


def _derive_facts(ctx: FilterContext) -> ContextFacts:
    prefix = ctx.line_prefix
    prefix_blank = not prefix.strip()
    indent = len(prefix) if prefix_blank else _indent_width(prefix)

    below = [line.rstrip() for line in ctx.lines_after if line.strip()][:2]
    next_line = below[0] if below else None

    syntax = syntax_for(ctx.language)
    state = ScanState()
    prefix_stack: list[str] = []
    for _, ch in code_brackets(prefix, syntax, state, complete=True):
        if ch in OPENERS:
            prefix_stack.append(ch)
        elif prefix_stack and prefix_stack[-1] == MATCHING_OPENER[ch]:
            prefix_stack.pop()
    cursor_state = state.copy()
    suffix_stack: list[str] = []
    closed_by_suffix = 0
    suffix_head = ""
    for index, ch in code_brackets(ctx.line_suffix, syntax, state, complete=True):
        if ch in OPENERS:
            suffix_stack.append(ch)
        elif suffix_stack:
            if suffix_stack[-1] == MATCHING_OPENER[ch]:
                suffix_stack.pop()
        else:
            if not closed_by_suffix:
                suffix_head = ctx.line_suffix[: index + 1].lstrip()
            closed_by_suffix += 1
    own = prefix_stack[: max(0, len(prefix_stack) - closed_by_suffix)]
    # Brackets left open by the lines above count too, unless the lines below
    # close them (after the cursor line's own, which they close first).
    above = open_above(ctx.lines_before, syntax)
    spare = max(0, closed_below(ctx.lines_after, syntax) - len(own))
    open_at_cursor = (*above[: max(0, len(above) - spare)], *own)

    suffix_text = ctx.line_suffix.strip()
    return ContextFacts(
        base_indent=indent,
        prefix_indent=prefix[:indent],
        prefix_blank=prefix_blank,
        suffix_text=suffix_text,
        suffix_starts_with_closer=bool(suffix_text) and suffix_text[0] in CLOSERS,
        next_line=next_line,
        lines_below=tuple(below),
        syntax=syntax,
        cursor_state=cursor_state,
        open_at_cursor=open_at_cursor,
        suffix_head=suffix_head,
    )


def is_neutral(text: str, facts: ContextFacts) -> bool:
    """Whether `text` at the cursor leaves brackets, strings and comments as it found them.

    It closes every bracket it opens, none of the line's, and ends in the
    string/comment state it started in. Text that repeats the rest of the line
    is dropped only from such a point: the repeat then reads exactly as the
    real rest of the line does.
    """
    start = facts.cursor_state
    state = start.copy()
    depth = 0
    for _, ch in code_brackets(text, facts.syntax, state, complete=True):
        depth += 1 if ch in OPENERS else -1
        if depth < 0:
            return False
    return depth == 0 and (state.quote, state.block_comment, state.line_comment) == (
        start.quote,
        start.block_comment,
        start.line_comment,
    )


@dataclass(frozen=True)
class FilterContext:
    """The document around the cursor, as the filters see it.

    `lines_after` and `lines_before` are bounded windows of whole lines without
    their line endings; `lines_before` is ordered top-down (the nearest last).
    `text_complete`: the text handed to a filter is the whole completion, its
    last line complete; `postprocess` sets it, see the module docstring.
    """

    line_prefix: str
    line_suffix: str
    lines_after: Sequence[str] = ()
    lines_before: Sequence[str] = ()
    language: str = ""
    multiline: bool = True
    text_complete: bool = True

    @classmethod
    def from_cursor(cls, cursor: CursorContext) -> FilterContext:
        """The filters' view of a request's cursor."""
        return cls(
            line_prefix=cursor.line_prefix,
            line_suffix=cursor.line_suffix,
            lines_after=cursor.below,
            lines_before=cursor.above,
            language=cursor.language.id,
            multiline=cursor.multiline,
        )

    @cached_property
    def facts(self) -> ContextFacts:
        return _derive_facts(self)

    def with_text_complete(self, complete: bool) -> FilterContext:
        if complete == self.text_complete:
            return self
        return self._twin

    @cached_property
    def _twin(self) -> FilterContext:
        """This context with `text_complete` flipped, sharing the derived facts."""
        twin = replace(self, text_complete=not self.text_complete)
        twin.__dict__["facts"] = self.facts
        twin.__dict__["_twin"] = self
        return twin


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def starts_a_repeat(text: str, start: int, repeated: str, facts: ContextFacts) -> bool:
    """Whether `repeated`, found at `start` of `text`, repeats the rest of the line there."""
    if start > 0 and _is_word_char(repeated[0]) and _is_word_char(text[start - 1]):
        return False  # "max" does not repeat a suffix "x"
    return is_neutral(text[:start], facts)


def from_line_start(text: str, cut: int, ctx: FilterContext) -> int:
    """`cut`, moved back to the start of its line when only indentation precedes it."""
    line_start = text.rfind("\n", 0, cut) + 1
    if line_start == 0 and not ctx.facts.prefix_blank:
        return cut
    return line_start if text[line_start:cut].isspace() or line_start == cut else cut
