"""The refactors on offer, and minimal, parse-checked edits from the model's code."""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

from exlsp.completion.assist.prompts import DocstringSlot, indent_of
from exlsp.completion.assist.syntax import Definition, ParsedDocument, Span, parse
from exlsp.completion.types import line_body

log = logging.getLogger(__name__)


class RefactorRefused(Exception):
    """A refactor cannot be offered as an edit; the message says why, for the user."""


# -- refactor kinds ------------------------------------------------------------------


@dataclass(frozen=True)
class Refactor:
    id: str
    title: str  # "{name}" is replaced with the definition's name
    extract: bool  # refactor.extract rather than refactor.rewrite
    instruction: str


REFACTORS: dict[str, Refactor] = {
    r.id: r
    for r in (
        Refactor(
            "docstring",
            "Add a docstring to {name}",
            False,
            "Add a clear, concise documentation comment (a docstring in Python) that says "
            "what it does, its parameters, its return value and its errors. Change nothing else.",
        ),
        Refactor(
            "simplify",
            "Simplify {name}",
            False,
            "Make it simpler and easier to read without changing its behaviour.",
        ),
        Refactor(
            "extract",
            "Extract the selection from {name} into a function",
            True,
            "Move the selected lines into a new, well-named function defined right before "
            "it, and call that function where the lines were. Reply with both definitions.",
        ),
        Refactor(
            "annotate",
            "Add type annotations to {name}",
            False,
            "Add type annotations to every parameter and the return value. Change nothing else.",
        ),
        Refactor(
            "rename",
            "Rename unclear local names in {name}",
            False,
            "Rename unclear local variable names to descriptive ones. Do not rename "
            "parameters or anything visible outside it. Change nothing else.",
        ),
    )
}
_TYPED_OPTIONAL = frozenset({"python", "typescript", "typescriptreact"})


@dataclass(frozen=True)
class RefactorOffer:
    refactor: str  # a key of REFACTORS
    title: str
    extract: bool


def available_refactors(doc: ParsedDocument, selection: Span) -> list[RefactorOffer]:
    """What can be offered for a selection; no model call."""
    definition = doc.definition_at(selection)
    if definition is None:
        return []
    ids = ["docstring", "simplify"]
    if not selection.empty and selection.start_line >= definition.header_end_line:
        ids.append("extract")
    if doc.language in _TYPED_OPTIONAL and definition.kind == "function":
        ids.append("annotate")
    if definition.kind == "function":
        ids.append("rename")
    offers = []
    for rid in ids:
        r = REFACTORS[rid]
        title = r.title.format(name=definition.name or "this definition")
        if rid == "docstring" and definition.docstring is not None:
            title = f"Improve the docstring of {definition.name}"
        offers.append(RefactorOffer(rid, title, r.extract))
    return offers


# -- edits -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TextEdit:
    """Replace `span` (characters) with `text`."""

    span: Span
    text: str


def _position(text: str, index: int, line0: int) -> tuple[int, int]:
    before = text[:index]
    nl = before.count("\n")
    col = len(before) - (before.rfind("\n") + 1)
    return line0 + nl, col


def minimal_edit(old: str, new: str, first_line: int) -> TextEdit | None:
    """The one edit that turns `old` (starting at `first_line`, column 0) into `new`.

    Only the changed range is replaced: common leading and trailing text stays.
    None when nothing changes.
    """
    if old == new:
        return None
    n = min(len(old), len(new))
    head = 0
    while head < n and old[head] == new[head]:
        head += 1
    # Back up to a line start so the edit never splits a line's indentation oddly.
    head = old.rfind("\n", 0, head) + 1
    tail = 0
    while tail < n - head and old[len(old) - 1 - tail] == new[len(new) - 1 - tail]:
        tail += 1
    # ... and end it at a line start: whole lines are replaced, easier to review.
    while tail and old[len(old) - tail - 1] != "\n":
        tail -= 1
    start = _position(old, head, first_line)
    end = _position(old, len(old) - tail, first_line)
    return TextEdit(Span(*start, *end), new[head : len(new) - tail])


def apply_edit(lines: Sequence[str], edit: TextEdit) -> list[str]:
    """Line bodies after `edit` (for checking)."""
    bodies = [line_body(line) for line in lines]
    s, e = edit.span, edit.span
    head = bodies[s.start_line][: s.start_char] if s.start_line < len(bodies) else ""
    tail = bodies[e.end_line][e.end_char :] if e.end_line < len(bodies) else ""
    middle = (head + edit.text + tail).split("\n")
    return bodies[: s.start_line] + middle + bodies[e.end_line + 1 :]


def check_parses(lines: Sequence[str], language: str, edit: TextEdit) -> None:
    """Refuse an edit that leaves a syntax error in the text it changed."""
    after = apply_edit(lines, edit)
    doc = parse([line + "\n" for line in after], language)
    if doc is None:
        return
    added = edit.text.count("\n")
    changed = Span(edit.span.start_line, 0, edit.span.start_line + added + 1, 0)
    for error in doc.error_spans():
        if error.start_line <= changed.end_line and error.end_line >= changed.start_line:
            raise RefactorRefused(
                f"the suggested code does not parse as {language} "
                f"(syntax error at line {error.start_line + 1}); nothing was changed"
            )


def reindent(code: str, indent: str) -> str:
    """`code` dedented, then indented to the definition's own indentation."""
    body = textwrap.dedent(code.strip("\n"))
    out = [indent + line if line.strip() else "" for line in body.split("\n")]
    return "\n".join(out) + "\n"


def format_docstring(doc: str, slot: DocstringSlot) -> str:
    """Documentation text in the definition's own form (docstring or line comments)."""
    lines = doc.strip().split("\n")
    if slot.quotes:
        if len(lines) == 1:
            return f'{slot.indent}"""{lines[0]}"""\n'
        body = "".join(f"{slot.indent}{line}\n" if line.strip() else "\n" for line in lines[1:])
        return f'{slot.indent}"""{lines[0]}\n{body}{slot.indent}"""\n'
    return "".join(f"{slot.indent}{slot.marker} {line}".rstrip() + "\n" for line in lines)


def docstring_edit(doc: ParsedDocument, slot: DocstringSlot, text: str) -> TextEdit | None:
    start, end = slot.replace
    old = doc.line_text(start, end)
    documented = format_docstring(text, slot)
    if slot.quotes:
        before = slot.before[: -len(slot.indent + '"""')]
        new = before + documented + slot.after[len('"""\n') :]
    else:
        new = documented + slot.after[1:]
    return minimal_edit(old, new, start)


def rewrite_edit(doc: ParsedDocument, definition: Definition, code: str) -> TextEdit | None:
    start = definition.span.start_line
    indent = indent_of(doc.lines[start])
    return minimal_edit(definition.text, reindent(code, indent), start)
