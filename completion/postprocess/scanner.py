"""Just enough of a language's syntax to tell code from strings and comments.

Brackets that are code, where a line opens a block, and the brackets left open
around the cursor. Comment and string syntax come from the language table
(`exlsp.completion.languages`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from exlsp.completion import languages
from exlsp.completion.languages import Language

OPENERS = "([{"
CLOSERS = ")]}"
MATCHING_OPENER = {")": "(", "]": "[", "}": "{"}
_PY_BLOCK_HEADER = re.compile(
    r"\s*(?:async\s+)?(?:def|class|if|elif|else|for|while|try|except|finally|with|match|case)\b"
)
_CASE_LABEL = re.compile(r"\s*(?:case\b|default\s*:)")
_WORD_OPENER = re.compile(r"(?:^|\W)(?:do|then)$")
# A Rust char literal; a lone quote is a lifetime or a label.
_RUST_CHAR = re.compile(r"'(?:\\(?:x[0-9a-fA-F]{2}|u\{[0-9a-fA-F]{1,6}\}|.)|[^\\'\n])'")
_RUST_CHAR_START = re.compile(r"'(?:\\(?:x[0-9a-fA-F]{0,2}|u(?:\{[0-9a-fA-F]{0,6})?)?|[^\\'\n])?")
_QUOTE_END = {
    '"': re.compile(r'[\\"\n]'),
    "'": re.compile(r"[\\'\n]"),
    "`": re.compile(r"[\\`]"),
    '"""': re.compile(r'[\\"]'),
    "'''": re.compile(r"[\\']"),
}


@dataclass(frozen=True, slots=True)
class Syntax:
    """A row of the language table, in the form the scanner reads."""

    language: Language
    quotes: frozenset[str]
    triple_quotes: bool
    code_token: re.Pattern[str]


def _compile_syntax(lang: Language) -> Syntax:
    starts = {marker[0] for marker in lang.line_comments}
    starts |= {opener[0] for opener, _ in lang.block_comments}
    starts |= {quote[0] for quote in lang.quotes}
    return Syntax(
        language=lang,
        quotes=frozenset(lang.quotes),
        triple_quotes=any(len(quote) == 3 for quote in lang.quotes),
        code_token=re.compile("[()\\[\\]{}" + "".join(re.escape(c) for c in sorted(starts)) + "]"),
    )


_SYNTAX_CACHE: dict[str, Syntax] = {}


def syntax_for(language_id: str) -> Syntax:
    syntax = _SYNTAX_CACHE.get(language_id)
    if syntax is None:
        syntax = _SYNTAX_CACHE[language_id] = _compile_syntax(languages.language(language_id))
    return syntax


class ScanState:
    """Where a bracket scan stands: inside a string, a comment, or code.

    `block_comment` holds the closer of the block comment the scan is in ("" outside one).
    """

    __slots__ = ("block_comment", "line_comment", "quote")

    def __init__(self, quote: str = "", block_comment: str = "", line_comment: bool = False):
        self.quote = quote
        self.block_comment = block_comment
        self.line_comment = line_comment

    def copy(self) -> ScanState:
        return ScanState(self.quote, self.block_comment, self.line_comment)


def code_brackets(
    text: str, syntax: Syntax, state: ScanState, complete: bool
) -> Iterator[tuple[int, str]]:
    """Yield ``(index, char)`` for each bracket of `text` that is code, not string or comment.

    Updates `state` as it goes. Stops early where deciding needs characters that
    have not arrived yet (a Rust ``'`` at the end of a streamed text).
    """
    lang = syntax.language
    n = len(text)
    i = 0
    while i < n:
        if state.line_comment:
            j = text.find("\n", i)
            if j < 0:
                return
            state.line_comment = False
            i = j + 1
            continue
        if state.block_comment:
            j = text.find(state.block_comment, i)
            if j < 0:
                return
            i = j + len(state.block_comment)
            state.block_comment = ""
            continue
        if state.quote:
            m = _QUOTE_END[state.quote].search(text, i)
            if m is None:
                return
            j = m.start()
            ch = text[j]
            if ch == "\\":
                i = j + 2
            elif ch == "\n":  # a one-line literal left open: the line end closes it
                state.quote = ""
                i = j + 1
            elif len(state.quote) == 3 and not text.startswith(state.quote, j):
                i = j + 1
            else:
                i = j + len(state.quote)
                state.quote = ""
            continue
        m = syntax.code_token.search(text, i)
        if m is None:
            return
        i = m.start()
        ch = text[i]
        if ch in "()[]{}":
            yield i, ch
            i += 1
            continue
        opened = next((pair for pair in lang.block_comments if text.startswith(pair[0], i)), None)
        if opened is not None:  # before line comments: Lua's "--[[" starts with "--"
            state.block_comment = opened[1]
            i += len(opened[0])
            continue
        marker = next((mark for mark in lang.line_comments if text.startswith(mark, i)), None)
        if marker is not None:
            state.line_comment = True
            i += len(marker)
        elif ch not in syntax.quotes:
            i += 1  # the start of a marker that is not one ("/" alone, "-" alone)
        elif ch == "'" and lang.char_literals:
            literal = _RUST_CHAR.match(text, i)
            if literal is not None:
                i = literal.end()
            elif not complete and _RUST_CHAR_START.fullmatch(text, i):
                return  # a char literal or a lifetime: the next characters decide
            else:
                i += 1  # a lifetime or a label
        elif syntax.triple_quotes and text.startswith(ch * 3, i):
            state.quote = ch * 3
            i += 3
        else:
            state.quote = ch
            i += 1


@functools.lru_cache(maxsize=8192)
def line_brackets(line: str, syntax: Syntax) -> tuple[tuple[str, ...], int]:
    """A line on its own: the openers it leaves open (in order) and how many
    closers it has that close something before it.

    Cached: the lines around the cursor are the same from one keystroke to the next.
    """
    openers: list[str] = []
    closers = 0
    for _, ch in code_brackets(line, syntax, ScanState(), complete=True):
        if ch in OPENERS:
            openers.append(ch)
        elif openers:
            if openers[-1] == MATCHING_OPENER[ch]:
                openers.pop()
        else:
            closers += 1
    return tuple(openers), closers


def open_above(lines_before: Sequence[str], syntax: Syntax) -> list[str]:
    """Brackets opened in the lines above the cursor line and still open there.

    Each line is scanned on its own (the window may start inside a string, where
    one scan from its top would misread everything after), from the nearest line
    up: a line's open brackets are first closed by the closers of the lines
    below it.
    """
    stack: list[str] = []  # outermost first
    pending = 0  # closers below that close brackets of lines further up
    for line in reversed(lines_before):
        openers, closers = line_brackets(line, syntax)
        still_open: list[str] = []
        for ch in reversed(openers):
            if pending:
                pending -= 1
            else:
                still_open.append(ch)
        stack = still_open[::-1] + stack
        pending += closers
    return stack


def closed_below(lines_after: Sequence[str], syntax: Syntax) -> int:
    """How many brackets open at the cursor the lines below the cursor line close."""
    opened = 0  # opened below and not closed yet
    closed = 0
    for line in lines_after:
        openers, closers = line_brackets(line, syntax)
        matched = min(opened, closers)
        opened += len(openers) - matched
        closed += closers - matched
    return closed


def ends_with_block_opener(line: str, language: str) -> bool:
    """Whether `line` ends by opening a block, a bracket or an expression to continue."""
    head = line.rstrip()
    if not head:
        return False
    last = head[-1]
    if last in OPENERS:
        return True
    if head.endswith(("=>", "->")):
        return True
    if last == "=":
        return not head.endswith(("==", "!=", "<=", ">="))
    if last == ":":
        blocks = syntax_for(language).language.blocks
        if blocks == "indent":
            return _PY_BLOCK_HEADER.match(head) is not None
        return _CASE_LABEL.match(head) is not None or blocks == "colon"
    return _WORD_OPENER.search(head) is not None
