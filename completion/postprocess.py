"""Post-processing: raw model output at the cursor -> the suggestion shown as ghost text.

A pipeline of small pure filters ``(text, ctx) -> text``. The same pipeline runs
while the model streams, to stop generation early, so every cutting filter is
*monotone*: it only cuts on evidence that more tokens cannot change (a complete
line, a line whose indentation is already fixed by a non-blank character, a
closing bracket, a newline in single-line mode). A cut decided on a partial
text is then the same cut on every longer text that extends it.

``FilterContext.text_complete`` tells a filter whether the text it gets is the
whole completion (its last line complete) or a streamed prefix; a filter
called on its own sees the default, ``True``. `postprocess` sets it: while
streaming, ``False`` until some filter has cut (what is left after a cut is
settled, so later filters may treat it as whole). The final pass keeps the
streaming pass's cut when there is one, so stopping the generation at the
first cut never changes the suggestion; otherwise it runs the cutting filters
again on the complete text.

Cleanup filters (`FINAL_ONLY`) change text in ways more tokens could undo, so
they run in the final pass only, after every cut.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import cached_property

from exlsp.completion import languages
from exlsp.completion.languages import Language

__all__ = [
    "FILTERS",
    "FINAL_ONLY",
    "FilterContext",
    "Processed",
    "decide_multiline",
    "drop_only_closers",
    "postprocess",
    "repetition",
    "scope_end",
    "single_line",
    "suffix_overlap",
    "trim_trailing_whitespace",
    "unmatched_bracket",
]

# How many lines `FilterContext.from_text` keeps on each side of the cursor line.
CONTEXT_LINES = 20

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_OPENERS = "([{"
_CLOSERS = ")]}"
_MATCHING_OPENER = {")": "(", "]": "[", "}": "{"}
# What may follow the cursor on its line and still leave room for a multi-line
# suggestion: the closers an editor inserts automatically.
_AUTO_CLOSED_TAIL = frozenset(")]}\"'`;, \t\r")
_CLOSING_CHARS = frozenset(")]}\"'`;,")

# --- syntax knowledge: just enough to skip strings and comments -------------

_PY_BLOCK_HEADER = re.compile(
    r"\s*(?:async\s+)?(?:def|class|if|elif|else|for|while|try|except|finally|with|match|case)\b"
)
_CASE_LABEL = re.compile(r"\s*(?:case\b|default\s*:)")
_WORD_OPENER = re.compile(r"(?:^|\W)(?:do|then)$")
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
class _Syntax:
    """A row of the language table, in the form the scanner reads."""

    language: Language
    quotes: frozenset[str]
    triple_quotes: bool
    code_token: re.Pattern[str]


def _syntax_for(lang: Language) -> _Syntax:
    starts = {marker[0] for marker in lang.line_comments}
    starts |= {opener[0] for opener, _ in lang.block_comments}
    starts |= {quote[0] for quote in lang.quotes}
    return _Syntax(
        language=lang,
        quotes=frozenset(lang.quotes),
        triple_quotes=any(len(quote) == 3 for quote in lang.quotes),
        code_token=re.compile("[()\\[\\]{}" + "".join(re.escape(c) for c in sorted(starts)) + "]"),
    )


_SYNTAX_CACHE: dict[str, _Syntax] = {}


def _syntax(language_id: str) -> _Syntax:
    syntax = _SYNTAX_CACHE.get(language_id)
    if syntax is None:
        syntax = _SYNTAX_CACHE[language_id] = _syntax_for(languages.language(language_id))
    return syntax


class _ScanState:
    """Where a bracket scan stands: inside a string, a comment, or code.

    `block_comment` holds the closer of the block comment the scan is in ("" outside one).
    """

    __slots__ = ("block_comment", "line_comment", "quote")

    def __init__(self, quote: str = "", block_comment: str = "", line_comment: bool = False):
        self.quote = quote
        self.block_comment = block_comment
        self.line_comment = line_comment

    def copy(self) -> _ScanState:
        return _ScanState(self.quote, self.block_comment, self.line_comment)


def _code_brackets(
    text: str, syntax: _Syntax, state: _ScanState, complete: bool
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


# --- indentation and block openers -------------------------------------------


def _indent_width(line: str) -> int:
    """Leading spaces and tabs, each counted as one unit."""
    return len(line) - len(line.lstrip(" \t"))


def _ends_with_block_opener(line: str, language: str) -> bool:
    """Whether `line` ends by opening a block, a bracket or an expression to continue."""
    head = line.rstrip()
    if not head:
        return False
    last = head[-1]
    if last in _OPENERS:
        return True
    if head.endswith(("=>", "->")):
        return True
    if last == "=":
        return not head.endswith(("==", "!=", "<=", ">="))
    if last == ":":
        blocks = _syntax(language).language.blocks
        if blocks == "indent":
            return _PY_BLOCK_HEADER.match(head) is not None
        return _CASE_LABEL.match(head) is not None or blocks == "colon"
    return _WORD_OPENER.search(head) is not None


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
    return not head or _ends_with_block_opener(head, language)


# --- the context ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _ContextFacts:
    """What the filters derive from a context, computed once per context."""

    base_indent: int
    prefix_indent: str
    prefix_blank: bool
    suffix_text: str
    suffix_starts_with_closer: bool
    next_line: str | None
    # The first two non-blank lines after the cursor line, trailing spaces stripped.
    lines_below: tuple[str, ...]
    syntax: _Syntax
    cursor_state: _ScanState
    open_at_cursor: tuple[str, ...]
    # The rest of the line up to its first bracket that closes one of the
    # cursor line's: what a model that rewrites the line end writes first.
    suffix_head: str


@functools.lru_cache(maxsize=8192)
def _line_brackets(line: str, syntax: _Syntax) -> tuple[tuple[str, ...], int]:
    """A line on its own: the openers it leaves open (in order) and how many
    closers it has that close something before it.

    Cached: the lines around the cursor are the same from one keystroke to the next.
    """
    openers: list[str] = []
    closers = 0
    for _, ch in _code_brackets(line, syntax, _ScanState(), complete=True):
        if ch in _OPENERS:
            openers.append(ch)
        elif openers:
            if openers[-1] == _MATCHING_OPENER[ch]:
                openers.pop()
        else:
            closers += 1
    return tuple(openers), closers


def _open_above(lines_before: Sequence[str], syntax: _Syntax) -> list[str]:
    """Brackets opened in the lines above the cursor line and still open there.

    Each line is scanned on its own (the window may start inside a string, where
    one scan from its top would misread everything after), from the nearest line
    up: a line's open brackets are first closed by the closers of the lines
    below it.
    """
    stack: list[str] = []  # outermost first
    pending = 0  # closers below that close brackets of lines further up
    for line in reversed(lines_before):
        openers, closers = _line_brackets(line, syntax)
        still_open: list[str] = []
        for ch in reversed(openers):
            if pending:
                pending -= 1
            else:
                still_open.append(ch)
        stack = still_open[::-1] + stack
        pending += closers
    return stack


def _closed_below(lines_after: Sequence[str], syntax: _Syntax) -> int:
    """How many brackets open at the cursor the lines below the cursor line close."""
    opened = 0  # opened below and not closed yet
    closed = 0
    for line in lines_after:
        openers, closers = _line_brackets(line, syntax)
        matched = min(opened, closers)
        opened += len(openers) - matched
        closed += closers - matched
    return closed


def _derive_facts(ctx: FilterContext) -> _ContextFacts:
    prefix = ctx.line_prefix
    prefix_blank = not prefix.strip()
    indent = len(prefix) if prefix_blank else _indent_width(prefix)

    below = [line.rstrip() for line in ctx.lines_after if line.strip()][:2]
    next_line = below[0] if below else None

    syntax = _syntax(ctx.language)
    state = _ScanState()
    prefix_stack: list[str] = []
    for _, ch in _code_brackets(prefix, syntax, state, complete=True):
        if ch in _OPENERS:
            prefix_stack.append(ch)
        elif prefix_stack and prefix_stack[-1] == _MATCHING_OPENER[ch]:
            prefix_stack.pop()
    cursor_state = state.copy()
    suffix_stack: list[str] = []
    closed_by_suffix = 0
    suffix_head = ""
    for index, ch in _code_brackets(ctx.line_suffix, syntax, state, complete=True):
        if ch in _OPENERS:
            suffix_stack.append(ch)
        elif suffix_stack:
            if suffix_stack[-1] == _MATCHING_OPENER[ch]:
                suffix_stack.pop()
        else:
            if not closed_by_suffix:
                suffix_head = ctx.line_suffix[: index + 1].lstrip()
            closed_by_suffix += 1
    own = prefix_stack[: max(0, len(prefix_stack) - closed_by_suffix)]
    # Brackets left open by the lines above count too, unless the lines below
    # close them (after the cursor line's own, which they close first).
    above = _open_above(ctx.lines_before, syntax)
    spare = max(0, _closed_below(ctx.lines_after, syntax) - len(own))
    open_at_cursor = (*above[: max(0, len(above) - spare)], *own)

    suffix_text = ctx.line_suffix.strip()
    return _ContextFacts(
        base_indent=indent,
        prefix_indent=prefix[:indent],
        prefix_blank=prefix_blank,
        suffix_text=suffix_text,
        suffix_starts_with_closer=bool(suffix_text) and suffix_text[0] in _CLOSERS,
        next_line=next_line,
        lines_below=tuple(below),
        syntax=syntax,
        cursor_state=cursor_state,
        open_at_cursor=open_at_cursor,
        suffix_head=suffix_head,
    )


def _is_neutral(text: str, facts: _ContextFacts) -> bool:
    """Whether `text` at the cursor leaves brackets, strings and comments as it found them.

    It closes every bracket it opens, none of the line's, and ends in the
    string/comment state it started in. Text that repeats the rest of the line
    is dropped only from such a point: the repeat then reads exactly as the
    real rest of the line does.
    """
    start = facts.cursor_state
    state = start.copy()
    depth = 0
    for _, ch in _code_brackets(text, facts.syntax, state, complete=True):
        depth += 1 if ch in _OPENERS else -1
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
    def from_text(
        cls, text: str, offset: int, language: str = "", multiline: bool | None = None
    ) -> FilterContext:
        """The context for a cursor at character `offset` of a document `text`.

        `multiline` None decides it with `decide_multiline`. Lines are split the
        way LSP counts them (``\\n``, ``\\r\\n``, ``\\r``).
        """
        if not 0 <= offset <= len(text):
            raise ValueError(f"offset {offset} outside a text of {len(text)} characters")
        head = _LINE_BREAK.split(text[:offset])
        tail = _LINE_BREAK.split(text[offset:], maxsplit=CONTEXT_LINES + 1)
        line_prefix, line_suffix = head[-1], tail[0]
        if multiline is None:
            multiline = decide_multiline(line_prefix, line_suffix, language)
        return cls(
            line_prefix=line_prefix,
            line_suffix=line_suffix,
            lines_after=tuple(tail[1 : CONTEXT_LINES + 1]),
            lines_before=tuple(head[-CONTEXT_LINES - 1 : -1]),
            language=language,
            multiline=multiline,
        )

    @cached_property
    def _facts(self) -> _ContextFacts:
        return _derive_facts(self)

    def _with_text_complete(self, complete: bool) -> FilterContext:
        if complete == self.text_complete:
            return self
        return self._twin

    @cached_property
    def _twin(self) -> FilterContext:
        """This context with `text_complete` flipped, sharing the derived facts."""
        twin = replace(self, text_complete=not self.text_complete)
        twin.__dict__["_facts"] = self._facts
        twin.__dict__["_twin"] = self
        return twin


# --- the filters ---------------------------------------------------------------


def single_line(text: str, ctx: FilterContext) -> str:
    """In single-line mode, cut at the first newline."""
    if ctx.multiline:
        return text
    newline = text.find("\n")
    return text if newline < 0 else text[:newline]


_UNDECIDED, _CLOSES, _CONTINUES, _OTHER = range(4)


def _classify_block_level_line(stripped: str, complete: bool, language: str) -> int:
    """What a line at the block's own indentation does: close it, continue it, or neither."""
    if stripped[0] in _CLOSERS:
        if not complete:
            return _UNDECIDED  # kept either way; its end says whether the block goes on
        return _CONTINUES if _ends_with_block_opener(stripped, language) else _CLOSES
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
    indented = _syntax(language).language.blocks == "indent"
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
    facts = ctx._facts
    base = facts.base_indent
    complete = ctx.text_complete
    in_block = not facts.prefix_blank and _ends_with_block_opener(
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


def _repeat_of_lines_below(text: str, ctx: FilterContext) -> int | None:
    """Where `text` starts repeating the code below the cursor, if it does.

    A complete generated line equal to the first non-blank line below (with its
    indentation) starts a repeat when the next non-blank generated line equals
    the second non-blank line below, or when nothing follows it in a complete
    text, or when there is no second line below. One equal line alone is not
    enough: a statement often occurs twice in a row of code (``x.append(c)`` in
    two branches). While the next line is unfinished the answer waits.
    """
    facts = ctx._facts
    below = facts.lines_below
    spans: list[tuple[int, int, bool]] = []  # (start, end, complete) of each line
    start = 0
    while True:
        newline = text.find("\n", start)
        if newline < 0:
            spans.append((start, len(text), ctx.text_complete))
            break
        spans.append((start, newline, True))
        start = newline + 1
    for i, (start, end, complete) in enumerate(spans):
        if not complete:
            return None
        line = text[start:end]
        if i == 0:
            if not facts.prefix_blank:
                continue
            line = ctx.line_prefix + line
        if line.rstrip() != below[0]:
            continue
        if len(below) < 2:
            return start
        for next_start, next_end, next_complete in spans[i + 1 :]:
            following = text[next_start:next_end]
            if not following.strip() and next_complete:
                continue  # blank lines never decide
            if not next_complete:
                return None
            if following.rstrip() == below[1]:
                return start
            break
        else:
            return start
    return None


def suffix_overlap(text: str, ctx: FilterContext) -> str:
    """Drop text that repeats what follows the cursor.

    (b) In multi-line mode, cut where the generated lines start repeating the
    code below the cursor: a complete line equal, indentation included, to the
    first non-blank line below, confirmed by the next one (see
    `_repeat_of_lines_below`). The first generated line counts when the cursor
    line was blank.
    (a) Once the text is complete: if its last non-blank line ends with the
    stripped rest of the cursor line, cut that repetition, so accepting does not
    duplicate it (the end of the first line, in single-line mode) -- provided
    the text before it leaves brackets and strings as it found them (in
    ``print(█)``, the ``)`` of ``len(x)`` is not a repeat), and a suffix that
    starts with a word character starts a word there.
    """
    facts = ctx._facts
    if ctx.multiline and facts.next_line is not None:
        cut = _repeat_of_lines_below(text, ctx)
        if cut is not None:
            return text[:cut]

    suffix = facts.suffix_text
    if ctx.text_complete and suffix:
        body = text.rstrip()
        cut = len(body) - len(suffix)
        if (
            body.endswith(suffix)
            and cut >= body.rfind("\n") + 1
            and _starts_a_repeat(body, cut, suffix, facts)
        ):
            return text[: _from_line_start(body, cut, ctx)]
    return text


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def _starts_a_repeat(text: str, start: int, repeated: str, facts: _ContextFacts) -> bool:
    """Whether `repeated`, found at `start` of `text`, repeats the rest of the line there."""
    if start > 0 and _is_word_char(repeated[0]) and _is_word_char(text[start - 1]):
        return False  # "max" does not repeat a suffix "x"
    return _is_neutral(text[:start], facts)


def unmatched_bracket(text: str, ctx: FilterContext) -> str:
    """Cut before the first closing bracket that matches nothing.

    Brackets inside simple string literals and comments do not count. A closer
    first matches the completion's own openers, then the openers left unclosed
    in `line_prefix` that `line_suffix` does not already close. The cut may
    move back to drop what the closer ends (see `_unmatched_cut`), and to the
    start of its line when only indentation precedes it.
    """
    facts = ctx._facts
    own: list[str] = []
    outer = list(facts.open_at_cursor)
    state = facts.cursor_state.copy()
    for index, ch in _code_brackets(text, facts.syntax, state, ctx.text_complete):
        if ch in _OPENERS:
            own.append(ch)
            continue
        wanted = _MATCHING_OPENER[ch]
        if own:
            if own[-1] != wanted:
                return text[: _unmatched_cut(text, index, ctx)]
            own.pop()
        elif outer and outer[-1] == wanted:
            outer.pop()
        else:
            return text[: _unmatched_cut(text, index, ctx)]
    return text


def _unmatched_cut(text: str, index: int, ctx: FilterContext) -> int:
    """Where to cut for an unmatched closer at `index`: before it, or before what it ends.

    Before the repeat of the rest of the cursor line (``, 0)`` of ``, 0);``);
    before its whole line when the line so far is how the line below the
    cursor starts (the model is rewriting that line, which `suffix_overlap`
    would drop once complete).
    """
    facts = ctx._facts
    line_start = text.rfind("\n", 0, index) + 1
    if ctx.multiline and facts.next_line is not None and (line_start > 0 or facts.prefix_blank):
        line = (ctx.line_prefix if line_start == 0 else "") + text[line_start : index + 1]
        if facts.next_line.strip().startswith(line.strip()):
            return line_start
    head = facts.suffix_head
    start = index + 1 - len(head)
    if head and text.endswith(head, 0, index + 1) and _starts_a_repeat(text, start, head, facts):
        return _from_line_start(text, start, ctx)
    return _from_line_start(text, index, ctx)


def _from_line_start(text: str, cut: int, ctx: FilterContext) -> int:
    """`cut`, moved back to the start of its line when only indentation precedes it."""
    line_start = text.rfind("\n", 0, cut) + 1
    if line_start == 0 and not ctx._facts.prefix_blank:
        return cut
    return line_start if text[line_start:cut].isspace() or line_start == cut else cut


# Within a line: a unit of at least _MIN_UNIT characters repeated _MIN_REPEATS times.
_MIN_UNIT = 3
_MAX_UNIT = 64
_MIN_REPEATS = 4
_MAX_BLOCK_LINES = 4


def _first_line_loop(text: str, lines: list[str], ctx: FilterContext) -> tuple[int, int] | None:
    """The earliest complete line that ends a repeated line or block: (evidence end, cut)."""
    count = len(lines) if ctx.text_complete else len(lines) - 1
    if count < 2:
        return None
    keys = [line.rstrip() for line in lines[:count]]
    keys[0] = (ctx.line_prefix + lines[0]).rstrip()
    for i in range(1, count):
        key = keys[i]
        for size in range(1, min(_MAX_BLOCK_LINES, (i + 1) // 2) + 1):
            if key != keys[i - size]:
                continue
            block = keys[i - size + 1 : i + 1]
            if any(block) and block == keys[i - 2 * size + 1 : i - size + 1]:
                first = i - size
                first_end = sum(map(len, lines[: first + 1])) + first
                evidence_end = first_end + sum(map(len, lines[first + 1 : i + 1])) + size
                if i < len(lines) - 1:
                    evidence_end += 1  # the newline that completes line i
                return evidence_end, first_end
    return None


def _first_inline_loop(text: str, longest_line: int) -> tuple[int, int] | None:
    """The earliest end of a unit repeated `_MIN_REPEATS` times in one line: (end, cut).

    For each unit length k, the run u^4 is a stretch of 3k characters equal to
    the characters k further on. Comparing the text with itself shifted by k
    is done on big integers (one XOR per k) and the stretch found with
    ``bytes.find``, which keeps this in C. Newlines are encoded differently in
    the two copies, so no stretch crosses a line.
    """
    max_unit = min(_MAX_UNIT, longest_line // _MIN_REPEATS)
    if max_unit < _MIN_UNIT:
        return None
    encoding, width = ("latin-1", 1) if text.isascii() else ("utf-32-be", 4)
    left = int.from_bytes(text.replace("\n", "\x01").encode(encoding), "big")
    right_bytes = text.replace("\n", "\x02").encode(encoding)
    right = int.from_bytes(right_bytes, "big")
    size = len(right_bytes)
    best: tuple[int, int] | None = None
    for unit in range(_MIN_UNIT, max_unit + 1):
        if best is not None and _MIN_REPEATS * unit >= best[0]:
            break
        equal = ((left >> (8 * width * unit)) ^ right).to_bytes(size, "big")
        stretch = b"\0" * ((_MIN_REPEATS - 1) * unit * width)
        search_from = unit * width
        while True:
            found = equal.find(stretch, search_from)
            if found < 0:
                break
            if found % width:
                search_from = found + 1
                continue
            start = found // width - unit
            end = start + _MIN_REPEATS * unit
            if best is not None and end >= best[0]:
                break
            if len(set(text[start : start + unit]) - {" ", "\t"}) < 2:
                # Rulers and padding ("-----", "    ") are not loops; every run
                # inside this stretch is a rotation of the same unit: skip it.
                rest = equal[found:]
                search_from = found + len(rest) - len(rest.lstrip(b"\0"))
                search_from += -search_from % width
                continue
            best = (end, start + unit)
            break
    return best


def repetition(text: str, ctx: FilterContext) -> str:
    """Stop on degenerate loops, keeping the first occurrence.

    The same non-blank line twice in a row, a block of 2-4 lines repeated right
    after itself (complete lines only), or within a line a unit of at least 3
    characters (not a ruler of one character) repeated 4 times. Of all loops,
    the one whose evidence ends first decides, so a longer text cuts the same.
    """
    lines = text.split("\n")
    line_loop = _first_line_loop(text, lines, ctx)
    limit = len(text) if line_loop is None else line_loop[0]
    inline_loop = _first_inline_loop(text[:limit], max(map(len, lines)))
    loop = line_loop
    if inline_loop is not None and (loop is None or inline_loop[0] <= loop[0]):
        loop = inline_loop
    return text if loop is None else text[: loop[1]]


def trim_trailing_whitespace(text: str, ctx: FilterContext) -> str:
    """Strip trailing whitespace of every line and drop trailing blank lines.

    A text of whitespace only becomes "". One exception: when the completion
    starts on a new line (a block body) and the rest of the cursor line starts
    with a closing bracket (``{█}``, ``(█)``), the text ends with a line break
    and the cursor line's indentation, so that closer lands on its own line,
    under the line that opened it, instead of after the last statement.
    """
    lines = text.split("\n")
    trimmed = [line.rstrip() for line in lines]
    while len(trimmed) > 1 and not trimmed[-1]:
        trimmed.pop()
    result = "\n".join(trimmed)
    if not result.strip():
        return ""
    facts = ctx._facts
    if facts.suffix_starts_with_closer and len(trimmed) > 1 and not trimmed[0]:
        result += "\n" + facts.prefix_indent
    return result


def drop_only_closers(text: str, ctx: FilterContext) -> str:
    """Drop a completion that is empty, blank, or only closers the cursor line already has."""
    body = "".join(text.split())
    if not body:
        return ""
    if all(ch in _CLOSING_CHARS for ch in body) and "".join(ctx.line_suffix.split()).startswith(
        body
    ):
        return ""
    return text


FILTERS: tuple[tuple[str, Callable[[str, FilterContext], str]], ...] = (
    ("single_line", single_line),
    ("scope_end", scope_end),
    ("suffix_overlap", suffix_overlap),
    ("unmatched_bracket", unmatched_bracket),
    ("repetition", repetition),
    ("trim_trailing_whitespace", trim_trailing_whitespace),
    ("drop_only_closers", drop_only_closers),
)

# Cleanup that more tokens could undo: the final pass only, after every cut.
FINAL_ONLY = frozenset({"trim_trailing_whitespace", "drop_only_closers"})
_CUTTING_FILTERS = tuple(item for item in FILTERS if item[0] not in FINAL_ONLY)
_CLEANUP_FILTERS = tuple(item for item in FILTERS if item[0] in FINAL_ONLY)


@dataclass(frozen=True)
class Processed:
    text: str
    truncated: bool  # a filter cut text away: while streaming, the generation may stop now
    by: str | None  # name of the first filter that changed the text


def _cut(raw: str, ctx: FilterContext, complete: bool) -> tuple[str, str | None]:
    """Run the cutting filters; `complete`: the last line of `raw` is complete."""
    text = raw
    by: str | None = None
    for name, apply in _CUTTING_FILTERS:
        out = apply(text, ctx._with_text_complete(complete))
        if out != text:
            if by is None:
                by = name
            text = out
            complete = True  # what is left after a cut is settled
    return text, by


def postprocess(raw: str, ctx: FilterContext, *, final: bool = True) -> Processed:
    """Run the pipeline on `raw`.

    ``final=False`` (streaming): only the cutting filters run, treating the
    last line as unfinished; `truncated` is True iff one cut, and then the
    generation may stop: the same cut follows from any longer text.

    ``final=True``: when the streaming pass cuts, its cut stands (so stopping
    early never changes the result); otherwise the cutting filters run again
    on the text as complete, last line included. Then the cleanup filters run.
    `truncated` / `by` report the first filter that changed the text.
    """
    if not raw:  # nothing to filter (the facts about the context are not needed)
        return Processed(text="", truncated=False, by=None)
    text, by = _cut(raw, ctx, complete=False)
    if not final:
        return Processed(text=text, truncated=by is not None, by=by)
    if by is None:
        text, by = _cut(raw, ctx, complete=True)
    done = ctx._with_text_complete(True)
    for name, apply in _CLEANUP_FILTERS:
        out = apply(text, done)
        if out != text:
            if by is None:
                by = name
            text = out
    return Processed(text=text, truncated=by is not None, by=by)
