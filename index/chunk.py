"""Split files into chunks: definitions for code (tree-sitter), line windows for the rest.

A definition (function, class, method, struct, impl, interface, ...) that fits in
`max_lines` is one chunk, with the comments right above it. A longer one is
split: its nested definitions become chunks of their own and the lines left over
(a class header, fields) become line windows; a long definition without nested
ones becomes overlapping line windows that keep its name. Code outside any
definition (imports, module constants, scripts) and files of other languages are
cut into overlapping line windows.

Lines are 0-based and `end_line` is exclusive. Lines are split on ``\\n`` (the
way tree-sitter counts rows), so a ``\\r\\n`` file numbers its lines as an
editor does.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field, replace
from typing import Any

from exlsp.completion import languages

log = logging.getLogger(__name__)

# A leftover run of lines with fewer non-blank characters than this ("}", "end")
# is not worth a chunk.
MIN_CHUNK_CHARS = 12


@dataclass(frozen=True)
class Chunk:
    id: str
    path: str
    language: str
    symbol: str  # qualified name ("Greeter.greet"); "" for plain windows
    kind: str  # "function", "class", "method", "struct", ..., "window"
    start_line: int
    end_line: int  # exclusive
    text: str


def chunk_id(path: str, start_line: int, text: str) -> str:
    """Stable id of a chunk: a hash of (path, start line, text)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(path.encode("utf-8", "surrogatepass"))
    h.update(b"\0")
    h.update(str(start_line).encode())
    h.update(b"\0")
    h.update(text.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


@dataclass(frozen=True)
class DefinitionNodes:
    """How to find definitions in one language's tree-sitter grammar.

    The language's id, extensions and grammar come from the language table
    (`exlsp.completion.languages`); this is what only the chunker needs.
    """

    name: str  # the language id
    definitions: dict[str, str]  # node type -> kind
    # Nodes that wrap a definition and belong to it (decorators, `export`, `template<>`).
    wrappers: frozenset[str] = frozenset()
    # Class-like definitions whose functions are members ("method" instead of "function").
    containers: frozenset[str] = frozenset()
    comments: frozenset[str] = frozenset({"comment"})


_JS_DEFS = {
    "function_declaration": "function",
    "generator_function_declaration": "function",
    "class_declaration": "class",
    "class": "class",
    "method_definition": "method",
    "lexical_declaration": "function",  # only `const f = () => ...` (see _name)
    "variable_declaration": "function",
}
_TS_DEFS = {
    **_JS_DEFS,
    "abstract_class_declaration": "class",
    "interface_declaration": "interface",
    "type_alias_declaration": "type",
    "enum_declaration": "enum",
    "internal_module": "namespace",
    "module": "namespace",
    "function_signature": "function",
}
_C_DEFS = {
    "function_definition": "function",
    "struct_specifier": "struct",
    "union_specifier": "union",
    "enum_specifier": "enum",
    "type_definition": "type",
}

_JS = DefinitionNodes(
    "javascript",
    _JS_DEFS,
    wrappers=frozenset({"export_statement"}),
    containers=frozenset({"class_declaration", "class"}),
)
_TS = DefinitionNodes(
    "typescript",
    _TS_DEFS,
    wrappers=frozenset({"export_statement"}),
    containers=frozenset(
        {"class_declaration", "abstract_class_declaration", "class", "interface_declaration"}
    ),
)

_NODES: tuple[DefinitionNodes, ...] = (
    DefinitionNodes(
        "python",
        {"function_definition": "function", "class_definition": "class"},
        wrappers=frozenset({"decorated_definition"}),
        containers=frozenset({"class_definition"}),
    ),
    _JS,
    replace(_JS, name="javascriptreact"),  # .jsx and .tsx: the same node types
    _TS,
    replace(_TS, name="typescriptreact"),
    DefinitionNodes(
        "go",
        {
            "function_declaration": "function",
            "method_declaration": "method",
            "type_declaration": "type",
        },
    ),
    DefinitionNodes(
        "rust",
        {
            "function_item": "function",
            "function_signature_item": "function",
            "struct_item": "struct",
            "enum_item": "enum",
            "union_item": "union",
            "trait_item": "trait",
            "impl_item": "impl",
            "mod_item": "module",
            "macro_definition": "macro",
            "type_item": "type",
        },
        containers=frozenset({"impl_item", "trait_item"}),
        comments=frozenset({"line_comment", "block_comment"}),
    ),
    DefinitionNodes(
        "java",
        {
            "class_declaration": "class",
            "interface_declaration": "interface",
            "enum_declaration": "enum",
            "record_declaration": "record",
            "annotation_type_declaration": "interface",
            "method_declaration": "method",
            "constructor_declaration": "method",
        },
        containers=frozenset(
            {"class_declaration", "interface_declaration", "enum_declaration", "record_declaration"}
        ),
        comments=frozenset({"line_comment", "block_comment"}),
    ),
    DefinitionNodes(
        "c",
        _C_DEFS,
    ),
    DefinitionNodes(
        "cpp",
        {
            **_C_DEFS,
            "class_specifier": "class",
            "namespace_definition": "namespace",
        },
        wrappers=frozenset({"template_declaration"}),
        containers=frozenset({"class_specifier", "struct_specifier"}),
    ),
)

_BY_NAME: dict[str, DefinitionNodes] = {spec.name: spec for spec in _NODES}


def language_for_path(path: str) -> str:
    """The language id of a path when the chunker finds definitions in it, else ""."""
    lang = languages.language_for_path(path)
    return lang.id if lang is not None and lang.id in _BY_NAME else ""


def _end_row(node: Any) -> int:
    """Exclusive end line of a node (a node that ends at column 0 ends on the line before)."""
    end = node.end_point
    row = int(end.row)
    if end.column == 0 and row > int(node.start_point.row):
        return row
    return row + 1


def _text(node: Any) -> str:
    raw = node.text
    return raw.decode("utf-8", errors="replace") if raw is not None else ""


def _declarator_name(node: Any) -> str:
    """Name of a C/C++ declarator chain: `int *(*f)(int)` -> `f`, `A::b` -> `A::b`."""
    current = node
    for _ in range(16):
        if current is None:
            return ""
        if current.type in {
            "identifier",
            "field_identifier",
            "qualified_identifier",
            "destructor_name",
            "operator_name",
            "type_identifier",
            "primitive_type",
        }:
            return _text(current)
        nxt = current.child_by_field_name("declarator")
        if nxt is None:
            named = [c for c in current.named_children if c.type != "parameter_list"]
            nxt = named[0] if named else None
        current = nxt
    return ""


_FUNCTION_VALUES = frozenset(
    {"arrow_function", "function_expression", "function", "generator_function", "class"}
)


def _name(node: Any, spec: DefinitionNodes) -> str | None:
    """The definition's name; None when the node is not a definition after all."""
    t = node.type
    if t in {"lexical_declaration", "variable_declaration"}:
        for child in node.named_children:
            if child.type == "variable_declarator":
                value = child.child_by_field_name("value")
                if value is not None and value.type in _FUNCTION_VALUES:
                    ident = child.child_by_field_name("name")
                    return _text(ident) if ident is not None else ""
        return None
    if t in {"struct_specifier", "union_specifier", "enum_specifier", "class_specifier"}:
        if node.child_by_field_name("body") is None:
            return None  # `struct point p;` uses a type, it does not define one
        ident = node.child_by_field_name("name")
        return _text(ident) if ident is not None else ""
    if t == "function_definition" and spec.name in {"c", "cpp"}:
        return _declarator_name(node.child_by_field_name("declarator"))
    if t == "type_definition":
        decl = node.child_by_field_name("declarator")
        return _declarator_name(decl) if decl is not None else ""
    if t == "type_declaration":
        names = []
        for child in node.named_children:
            ident = child.child_by_field_name("name")
            if ident is not None:
                names.append(_text(ident))
        return ", ".join(names)
    if t == "method_declaration" and spec.name == "go":
        ident = node.child_by_field_name("name")
        receiver = node.child_by_field_name("receiver")
        recv = ""
        if receiver is not None:
            words = _text(receiver).replace("*", " ").strip("() ").split()
            idents = [w for w in words if w.isidentifier()]
            recv = idents[-1] if idents else ""
        base = _text(ident) if ident is not None else ""
        return f"{recv}.{base}" if recv else base
    if t == "impl_item":
        typ = node.child_by_field_name("type")
        trait = node.child_by_field_name("trait")
        name = _text(typ) if typ is not None else ""
        return f"{_text(trait)} for {name}" if trait is not None else name
    ident = node.child_by_field_name("name")
    if ident is not None:
        return _text(ident)
    return ""


def _member_prefix(node: Any, name: str) -> str:
    if node.type == "impl_item":
        typ = node.child_by_field_name("type")
        return _text(typ) if typ is not None else name
    return name


@dataclass
class _Emitter:
    path: str
    language: str
    lines: list[str]
    window: int
    overlap: int
    chunks: list[Chunk] = field(default_factory=list)
    covered: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.covered = [False] * len(self.lines)

    def emit(self, start: int, end: int, symbol: str, kind: str) -> None:
        start = max(0, start)
        end = min(len(self.lines), end)
        if end <= start:
            return
        text = "".join(self.lines[start:end])
        if len("".join(text.split())) < MIN_CHUNK_CHARS and kind == "window":
            return
        self.chunks.append(
            Chunk(
                id=chunk_id(self.path, start, text),
                path=self.path,
                language=self.language,
                symbol=symbol,
                kind=kind,
                start_line=start,
                end_line=end,
                text=text,
            )
        )
        for i in range(start, end):
            self.covered[i] = True

    def windows(self, start: int, end: int, symbol: str, kind: str) -> None:
        """Overlapping windows over [start, end), blank lines trimmed at both ends."""
        while start < end and not self.lines[start].strip():
            start += 1
        while end > start and not self.lines[end - 1].strip():
            end -= 1
        if end <= start:
            return
        step = max(1, self.window - self.overlap)
        pos = start
        while True:
            stop = min(end, pos + self.window)
            self.emit(pos, stop, symbol, kind)
            if stop >= end:
                break
            pos += step

    def uncovered_runs(self, start: int, end: int) -> list[tuple[int, int]]:
        runs: list[tuple[int, int]] = []
        run_start: int | None = None
        for i in range(start, end):
            if not self.covered[i]:
                if run_start is None:
                    run_start = i
            elif run_start is not None:
                runs.append((run_start, i))
                run_start = None
        if run_start is not None:
            runs.append((run_start, end))
        return runs


class Chunker:
    """Turns file text into chunks. Holds one tree-sitter parser per language.

    Not thread-safe (tree-sitter parsers are not): one per thread.
    """

    def __init__(self, max_lines: int = 60, overlap: int = 10) -> None:
        self.max_lines = max(2, max_lines)
        self.overlap = max(0, min(overlap, self.max_lines - 1))
        self._parsers: dict[str, Any] = {}
        self._failed: set[str] = set()

    def _parser(self, language: str) -> Any | None:
        if language in self._parsers:
            return self._parsers[language]
        if language in self._failed:
            return None
        grammar = languages.tree_sitter_language(language)
        if grammar is None:  # a missing grammar degrades to line windows
            self._failed.add(language)
            return None
        try:
            import tree_sitter

            parser = tree_sitter.Parser(grammar)
        except Exception as exc:
            log.warning("no tree-sitter parser for %s (%s): using line windows", language, exc)
            self._failed.add(language)
            return None
        self._parsers[language] = parser
        return parser

    def chunk(self, path: str, text: str, language: str | None = None) -> list[Chunk]:
        """Chunks of one file; `language` defaults to the one its extension names."""
        lang = language_for_path(path) if language is None else language
        lines = _split_lf(text)
        em = _Emitter(path, lang or "text", lines, self.max_lines, self.overlap)
        parser = self._parser(lang) if lang in _BY_NAME else None
        if parser is not None:
            try:
                tree = parser.parse(text.encode("utf-8", "surrogatepass"))
                self._definitions(em, tree.root_node, _BY_NAME[lang], "", in_container=False)
            except Exception as exc:  # never lose a file to a parser problem
                log.warning("parsing %s failed (%s): using line windows", path, exc)
                em.chunks.clear()
                em.covered = [False] * len(lines)
        for start, end in em.uncovered_runs(0, len(lines)):
            em.windows(start, end, "", "window")
        em.chunks.sort(key=lambda c: (c.start_line, c.end_line))
        seen: set[str] = set()
        unique = []
        for c in em.chunks:
            if c.id not in seen:
                seen.add(c.id)
                unique.append(c)
        return unique

    def _definitions(
        self, em: _Emitter, node: Any, spec: DefinitionNodes, prefix: str, in_container: bool
    ) -> bool:
        """Emit the definitions found below `node`; True when there was at least one."""
        found = False
        for child in node.named_children:
            target, outer = child, child
            while target.type in spec.wrappers:
                inner = target.child_by_field_name("definition") or target.child_by_field_name(
                    "declaration"
                )
                if inner is None:
                    inner = next(
                        (
                            c
                            for c in target.named_children
                            if c.type in spec.definitions or c.type in spec.wrappers
                        ),
                        None,
                    )
                if inner is None:
                    break
                target = inner
            kind = spec.definitions.get(target.type)
            name = _name(target, spec) if kind is not None else None
            if kind is None or name is None:
                found |= self._definitions(em, child, spec, prefix, in_container)
                continue
            found = True
            if in_container and kind == "function":
                kind = "method"
            self._definition(em, outer, target, spec, kind, name, prefix)
        return found

    def _definition(
        self,
        em: _Emitter,
        outer: Any,
        node: Any,
        spec: DefinitionNodes,
        kind: str,
        name: str,
        prefix: str,
    ) -> None:
        start = int(outer.start_point.row)
        end = _end_row(outer)
        # Comments right above a definition document it.
        prev = outer.prev_named_sibling
        while (
            prev is not None
            and prev.type in spec.comments
            and _end_row(prev) >= start - 1
            and not any(em.covered[int(prev.start_point.row) : start])
        ):
            start = int(prev.start_point.row)
            prev = prev.prev_named_sibling
        symbol = f"{prefix}.{name}" if prefix and name else (name or prefix)
        if end - start <= self.max_lines:
            em.emit(start, end, symbol, kind)
            return
        member_prefix = _member_prefix(node, symbol)
        nested = self._definitions(
            em, node, spec, member_prefix, in_container=node.type in spec.containers
        )
        if nested:
            for run_start, run_end in em.uncovered_runs(start, end):
                em.windows(run_start, run_end, symbol, kind)
        else:
            em.windows(start, end, symbol, kind)


def _split_lf(text: str) -> list[str]:
    if not text:
        return []
    parts = text.split("\n")
    lines = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines
