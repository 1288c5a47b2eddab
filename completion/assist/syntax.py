"""Tree-sitter views of one document for hover and refactors.

Positions are (line, character) with characters counted in code points, the
way `DocumentView` counts them; tree-sitter counts bytes, and this module does
the conversion. Lines are split as LSP splits them (the caller hands them in);
each line's ending is normalized to ``\\n`` before parsing so tree-sitter's rows
are the editor's lines.

The grammars are the official per-language wheels, imported when a document
of that language is first parsed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from exlsp.completion.languages import tree_sitter_language
from exlsp.completion.types import line_body

log = logging.getLogger(__name__)

# Definition node types -> "function" or "class" (one table: node names do not clash).
_DEFINITIONS: dict[str, str] = {
    "function_definition": "function",  # python, c, cpp
    "class_definition": "class",
    "function_declaration": "function",  # js, ts, go
    "generator_function_declaration": "function",
    "method_definition": "function",
    "class_declaration": "class",  # js, ts, java
    "abstract_class_declaration": "class",
    "interface_declaration": "class",
    "method_declaration": "function",  # go, java
    "constructor_declaration": "function",
    "type_declaration": "class",
    "function_item": "function",  # rust
    "struct_item": "class",
    "enum_item": "class",
    "trait_item": "class",
    "impl_item": "class",
    "struct_specifier": "class",  # c, cpp
    "class_specifier": "class",
}
# Nodes that wrap a definition and belong to it.
_WRAPPERS = frozenset({"decorated_definition", "export_statement", "template_declaration"})
_IDENTIFIERS = frozenset(
    {
        "identifier",
        "field_identifier",
        "property_identifier",
        "type_identifier",
        "shorthand_property_identifier",
        "private_property_identifier",
    }
)

_parsers: dict[str, Any] = {}


def _parser(language: str) -> Any | None:
    """A parser for `language` (its grammar from the language table); None without one:
    a missing grammar means no hover or refactor for that language."""
    parser = _parsers.get(language)
    if parser is None:
        grammar = tree_sitter_language(language)
        if grammar is None:
            return None
        import tree_sitter

        parser = _parsers[language] = tree_sitter.Parser(grammar)
    return parser


@dataclass(frozen=True, order=True)
class Span:
    """A range of (line, character) positions, end exclusive."""

    start_line: int
    start_char: int
    end_line: int
    end_char: int

    def contains(self, line: int, char: int) -> bool:
        return (self.start_line, self.start_char) <= (line, char) <= (self.end_line, self.end_char)

    def covers(self, other: Span) -> bool:
        return self.contains(other.start_line, other.start_char) and self.contains(
            other.end_line, other.end_char
        )

    @property
    def empty(self) -> bool:
        return (self.start_line, self.start_char) == (self.end_line, self.end_char)


@dataclass(frozen=True)
class Definition:
    name: str
    kind: str  # "function" or "class"
    span: Span  # the whole definition, decorators and export included
    header_end_line: int  # the line where the body starts
    body_line: int  # first line of the body's first statement (python)
    docstring: Span | None  # python: the existing docstring statement
    text: str  # the text of the definition's whole lines


class ParsedDocument:
    """One parse of a document; answers position queries in characters."""

    def __init__(self, lines: Sequence[str], language: str, tree: Any) -> None:
        self.language = language
        self.lines = [line_body(s) for s in lines]
        self._bytes = [s.encode("utf-8", "surrogatepass") for s in self.lines]
        self.tree = tree

    # -- conversions -----------------------------------------------------------

    def _char(self, row: int, column: int) -> int:
        if row >= len(self._bytes):
            return 0
        return len(self._bytes[row][:column].decode("utf-8", "replace"))

    def _column(self, line: int, char: int) -> int:
        if line >= len(self.lines):
            return 0
        return len(self.lines[line][:char].encode("utf-8", "surrogatepass"))

    def span_of(self, node: Any) -> Span:
        s, e = node.start_point, node.end_point
        return Span(s.row, self._char(s.row, s.column), e.row, self._char(e.row, e.column))

    def text_of(self, node: Any) -> str:
        raw = node.text
        return raw.decode("utf-8", "replace") if raw is not None else ""

    def line_text(self, start: int, end: int) -> str:
        """Lines [start, end) joined with ``\\n``, with a final newline."""
        return "".join(line + "\n" for line in self.lines[start:end])

    # -- queries -----------------------------------------------------------------

    def node_at(self, line: int, char: int) -> Any:
        col = self._column(line, char)
        node = self.tree.root_node.named_descendant_for_point_range((line, col), (line, col))
        if node is not None and node.type not in _IDENTIFIERS and char > 0:
            # The cursor right after an identifier still means that identifier.
            prev = self.tree.root_node.named_descendant_for_point_range(
                (line, self._column(line, char - 1)), (line, self._column(line, char - 1))
            )
            if prev is not None and prev.type in _IDENTIFIERS:
                return prev
        return node

    def identifier_at(self, line: int, char: int) -> tuple[str, Span] | None:
        node = self.node_at(line, char)
        if node is None or node.type not in _IDENTIFIERS:
            return None
        return self.text_of(node), self.span_of(node)

    def definitions(self) -> Iterator[Definition]:
        """Every definition in document order (outer before inner)."""
        stack = [self.tree.root_node]
        found: list[Definition] = []
        while stack:
            node = stack.pop()
            d = self._definition(node)
            if d is not None:
                found.append(d)
            stack.extend(reversed(node.named_children))
        found.sort(key=lambda d: (d.span.start_line, d.span.start_char, -d.span.end_line))
        yield from found

    def definition_at(self, span: Span) -> Definition | None:
        """The innermost definition that covers `span`."""
        best: Definition | None = None
        for d in self.definitions():
            if d.span.covers(span) and (best is None or best.span.covers(d.span)):
                best = d
        return best

    def definition_named(self, name: str) -> Definition | None:
        for d in self.definitions():
            if d.name == name:
                return d
        return None

    def error_spans(self) -> list[Span]:
        """Where the parse failed (ERROR nodes and missing tokens)."""
        spans: list[Span] = []
        stack = [self.tree.root_node]
        while stack:
            node = stack.pop()
            if node.is_error or node.is_missing:
                spans.append(self.span_of(node))
                continue
            if node.has_error:
                stack.extend(node.children)
        return sorted(spans)

    def _definition(self, node: Any) -> Definition | None:
        kind = _DEFINITIONS.get(node.type)
        if kind is None:
            return None
        if node.type in ("struct_specifier", "class_specifier") and (
            node.child_by_field_name("body") is None
        ):
            return None  # `struct point p;` uses a type, it does not define one
        outer = node
        while outer.parent is not None and outer.parent.type in _WRAPPERS:
            outer = outer.parent
        name = _name(self, node)
        span = self.span_of(outer)
        body = node.child_by_field_name("body")
        header_end = body.start_point.row if body is not None else node.start_point.row
        body_line = header_end
        docstring: Span | None = None
        if body is not None and body.named_child_count and self.language == "python":
            first = body.named_children[0]
            while first is not None and first.type == "comment":
                first = first.next_named_sibling
            if first is not None:
                body_line = first.start_point.row
                if first.type == "expression_statement" and (
                    first.named_child_count and first.named_children[0].type == "string"
                ):
                    docstring = self.span_of(first)
        end_line = span.end_line + (1 if span.end_char > 0 else 0)
        return Definition(
            name=name,
            kind=kind,
            span=span,
            header_end_line=header_end,
            body_line=body_line,
            docstring=docstring,
            text=self.line_text(span.start_line, end_line),
        )


def _name(doc: ParsedDocument, node: Any) -> str:
    ident = node.child_by_field_name("name")
    if ident is None and node.type == "impl_item":
        ident = node.child_by_field_name("type")
    if ident is None:
        decl = node.child_by_field_name("declarator")
        for _ in range(8):  # C declarator chains: `int *(*f)(int)`
            if decl is None or decl.type in _IDENTIFIERS or decl.type == "qualified_identifier":
                break
            decl = decl.child_by_field_name("declarator")
        ident = decl
    if ident is None and node.type == "type_declaration":
        spec = node.named_children[0] if node.named_child_count else None
        ident = spec.child_by_field_name("name") if spec is not None else None
    return doc.text_of(ident) if ident is not None else ""


# Parsing holds the GIL (about 75 ms a megabyte on a fast core, several times that
# on a busy one): past this size hover and refactors stay off rather than stall
# the event loop, and with it every completion.
MAX_PARSE_CHARS = 1_000_000


def parse(lines: Sequence[str], language: str) -> ParsedDocument | None:
    """A parse of `lines`; None without a grammar for `language` or past MAX_PARSE_CHARS."""
    parser = _parser(language)
    if parser is None:
        return None
    if sum(map(len, lines)) > MAX_PARSE_CHARS:
        log.debug("not parsed: the document is over %d characters", MAX_PARSE_CHARS)
        return None
    text = "".join(line_body(s) + "\n" for s in lines)
    key = (language, text)
    parsed = _recent.get(key)
    if parsed is None:
        # Editors ask for code actions at every cursor move: parse a text once.
        tree = parser.parse(text.encode("utf-8", "surrogatepass"))
        parsed = _recent[key] = ParsedDocument(lines, language, tree)
        while len(_recent) > 4:
            _recent.pop(next(iter(_recent)))
    return parsed


_recent: dict[tuple[str, str], ParsedDocument] = {}


def hover_target(doc: ParsedDocument, line: int, char: int) -> tuple[Definition, Span, str] | None:
    """What a hover at (line, char) explains: (definition, range to highlight, symbol).

    On an identifier defined in this file: that definition. Otherwise the
    innermost definition around the position.
    """
    ident = doc.identifier_at(line, char)
    here = Span(line, char, line, char)
    if ident is not None:
        name, span = ident
        definition = doc.definition_named(name)
        if definition is not None:
            return definition, span, name
        around = doc.definition_at(span)
        return (around, span, name) if around is not None else None
    around = doc.definition_at(here)
    return (around, around.span, "") if around is not None else None
