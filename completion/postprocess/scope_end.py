"""scope_end: stop at the end of the indentation scope of the cursor."""

from __future__ import annotations

import re

from exlsp.completion.postprocess.context import FilterContext
from exlsp.completion.postprocess.scanner import CLOSERS, ends_with_block_opener, syntax_for

_LEADING_WORD = re.compile(r"[A-Za-z_]\w*")
# Lines that close a block on their own.
_CLOSING_WORDS = frozenset({"end", "fi", "done", "esac"})
# Lines at a block's own level that continue the statement (`else:`, `case 1:`),
# known by their first word alone so the decision never waits for the line end.
_CONTINUING_WORDS = frozenset(
    {"else", "elif", "elsif", "except", "finally", "catch", "case", "default", "rescue", "ensure"}
)
# In Python `case` is indented under `match`, and `default` is a common name.
_PY_CONTINUING_WORDS = frozenset({"else", "elif", "except", "finally"})
_BLOCK_WORDS = _CLOSING_WORDS | _CONTINUING_WORDS
_UNDECIDED, _CLOSES, _CONTINUES, _OTHER = range(4)


def _classify_block_level_line(stripped: str, complete: bool, language: str) -> int:
    """What a line at the block's own indentation does: close it, continue it, or neither."""
    if stripped[0] in CLOSERS:
        if not complete:
            return _UNDECIDED  # kept either way; its end says whether the block goes on
        return _CONTINUES if ends_with_block_opener(stripped, language) else _CLOSES
    word_match = _LEADING_WORD.match(stripped)
    if word_match is None:
        return _OTHER
    word = word_match.group()
    if word_match.end() == len(stripped) and not complete:
        # The word may still grow: "en" -> "end" -> "endpoint".
        if any(keyword.startswith(word) for keyword in _BLOCK_WORDS):
            return _UNDECIDED
        return _OTHER
    if word in _CLOSING_WORDS:
        return _CLOSES
    indented = syntax_for(language).language.blocks == "indent"
    continuing = _PY_CONTINUING_WORDS if indented else _CONTINUING_WORDS
    return _CONTINUES if word in continuing else _OTHER


def scope_end(text: str, ctx: FilterContext) -> str:
    """Stop at the end of the indentation scope of the cursor.

    The base indent is the cursor line's (for a whitespace-only `line_prefix`,
    its length; tabs and spaces count one unit each). When the user has started
    the cursor line and it opens a block (``line_prefix`` + the first generated
    line ends with ``:`` ``{`` ``(`` ``[`` ``=>`` ``=`` ``do`` ...), the
    completion is that block: its body is indented deeper; a line back at the
    base indent that closes it (``}``, ``)``, ``end``, ``});`` ...) is kept and
    ends the completion; one that continues it (``} else {``, ``else:``,
    ``case 1:``) opens the next body; any other line at or below the base indent
    is cut away. On a blank cursor line, or one that opens nothing, the
    completion may write several statements and stops at the first line that
    dedents below the base indent. Blank lines never decide.
    """
    first_newline = text.find("\n")
    if first_newline < 0:
        return text
    facts = ctx.facts
    base = facts.base_indent
    complete = ctx.text_complete
    in_block = not facts.prefix_blank and ends_with_block_opener(
        ctx.line_prefix + text[:first_newline], ctx.language
    )
    start = first_newline + 1
    n = len(text)
    while start <= n:
        newline = text.find("\n", start)
        end = n if newline < 0 else newline
        line = text[start:end]
        stripped = line.lstrip(" \t")
        if stripped and not stripped.isspace():
            indent = len(line) - len(stripped)
            if indent < base:
                return text[:start]
            if in_block and indent == base:
                kind = _classify_block_level_line(stripped, complete or newline >= 0, ctx.language)
                if kind == _UNDECIDED:
                    return text
                if kind == _CLOSES:
                    return text[:end]
                if kind == _OTHER:
                    return text[:start]
        if newline < 0:
            break
        start = newline + 1
    return text
