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
from dataclasses import dataclass, field
from typing import Any

from exlsp.completion import languages
from exlsp.index.definitions import (
    DefinitionNodes,
    definition_name,
    definition_nodes,
    language_for_path,
    member_prefix,
)

__all__ = ["MIN_CHUNK_CHARS", "Chunk", "Chunker", "chunk_id", "language_for_path"]

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


def _end_row(node: Any) -> int:
    """Exclusive end line of a node (a node that ends at column 0 ends on the line before)."""
    end = node.end_point
    row = int(end.row)
    if end.column == 0 and row > int(node.start_point.row):
        return row
    return row + 1


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
        spec = definition_nodes(lang)
        parser = self._parser(lang) if spec is not None else None
        if spec is not None and parser is not None:
            try:
                tree = parser.parse(text.encode("utf-8", "surrogatepass"))
                self._definitions(em, tree.root_node, spec, "", in_container=False)
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
            name = definition_name(target, spec) if kind is not None else None
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
        members = member_prefix(node, symbol)
        nested = self._definitions(
            em, node, spec, members, in_container=node.type in spec.containers
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
