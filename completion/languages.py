"""What exlsp knows about each language, in one table.

One frozen `Language` per LSP language id: the file extensions that name it,
its comment and string syntax (as far as the bracket scanner of the
post-processing needs it, and the prompt needs a comment marker), how its
blocks are delimited, and the tree-sitter grammar that parses it.

A leaf module: it imports nothing else of exlsp, so the index can read it as it
reads the plain types of `exlsp.completion.types`, and importing it loads no
grammar (`tree_sitter_language` imports one when first asked).
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "EXTENSIONS",
    "LANGUAGES",
    "PLAIN",
    "BlockStyle",
    "Grammar",
    "Language",
    "language",
    "language_for_path",
    "tree_sitter_language",
]

log = logging.getLogger(__name__)

# How blocks are delimited:
# - "braces": brackets (a trailing ":" opens a block only after a case label);
# - "indent": indentation under a compound-statement header ending in ":" (Python);
# - "colon": indentation under any line ending in ":" (YAML-like);
# - "end": keywords close blocks (`end`, `fi`, `done`).
BlockStyle = Literal["braces", "indent", "colon", "end"]


@dataclass(frozen=True, slots=True)
class Grammar:
    """A tree-sitter grammar: the official per-language wheel and its language function."""

    module: str
    function: str = "language"


@dataclass(frozen=True, slots=True)
class Language:
    id: str  # the LSP language id
    extensions: tuple[str, ...] = ()  # lower case, with the dot
    # Markers that start a comment running to the line end; the first is the one
    # exlsp writes (file headers in prompts).
    line_comments: tuple[str, ...] = ()
    block_comments: tuple[tuple[str, str], ...] = ()  # (opener, closer)
    # String delimiters: '"', "'", "`" (may span lines), '"""' and "'''" (triple).
    # Escapes are backslashes; a one-line quote left open ends at the line end.
    quotes: tuple[str, ...] = ('"', "'")
    # A "'" starts a char literal, a lifetime or a label (Rust).
    char_literals: bool = False
    blocks: BlockStyle = "braces"
    grammar: Grammar | None = None
    # The marker of documentation comments above a definition where it differs
    # from the line comment (Rust's `///`).
    doc_line_comment: str = ""

    @property
    def comment(self) -> str:
        """The line-comment marker to write; "//" where the language has none known."""
        return self.line_comments[0] if self.line_comments else "//"

    @property
    def doc_comment(self) -> str:
        """The marker of documentation comments written above a definition."""
        return self.doc_line_comment or self.comment


_HASH = ("#",)
_SLASH = ("//",)
_C_BLOCK = (("/*", "*/"),)
_DASH = ("--",)
_BACKTICK = ('"', "'", "`")
_JS = Grammar("tree_sitter_javascript")
_TS = Grammar("tree_sitter_typescript", "language_typescript")
_TSX = Grammar("tree_sitter_typescript", "language_tsx")


def _slash(id: str, *extensions: str, **kw: Any) -> Language:
    return Language(id, extensions, _SLASH, _C_BLOCK, **kw)


def _hash(id: str, *extensions: str, **kw: Any) -> Language:
    return Language(id, extensions, _HASH, **kw)


# The language of a request without a language id.
PLAIN = Language("", blocks="colon")

LANGUAGES: tuple[Language, ...] = (
    PLAIN,
    Language(
        "python",
        (".py", ".pyi", ".pyw"),
        _HASH,
        quotes=('"""', "'''", '"', "'"),
        blocks="indent",
        grammar=Grammar("tree_sitter_python"),
    ),
    _slash("javascript", ".js", ".mjs", ".cjs", quotes=_BACKTICK, grammar=_JS),
    _slash("javascriptreact", ".jsx", quotes=_BACKTICK, grammar=_JS),
    _slash("typescript", ".ts", ".mts", ".cts", quotes=_BACKTICK, grammar=_TS),
    _slash("typescriptreact", ".tsx", quotes=_BACKTICK, grammar=_TSX),
    _slash("go", ".go", quotes=_BACKTICK, grammar=Grammar("tree_sitter_go")),
    _slash(
        "rust",
        ".rs",
        char_literals=True,
        grammar=Grammar("tree_sitter_rust"),
        doc_line_comment="///",
    ),
    _slash("java", ".java", grammar=Grammar("tree_sitter_java")),
    _slash("c", ".c", ".h", grammar=Grammar("tree_sitter_c")),
    _slash(
        "cpp",
        *(".cc", ".cpp", ".cxx", ".c++", ".hh", ".hpp", ".hxx", ".h++", ".ipp", ".tpp"),
        grammar=Grammar("tree_sitter_cpp"),
    ),
    _slash("csharp", ".cs"),
    _slash("kotlin", ".kt"),
    _slash("swift", ".swift"),
    _slash("php", ".php"),
    _slash("scala", ".scala"),
    *(_slash(id) for id in ("objective-c", "objective-cpp", "cuda-cpp", "dart", "proto")),
    *(_slash(id) for id in ("groovy", "jsonc")),
    Language("zig", line_comments=_SLASH),
    _hash("ruby", ".rb", blocks="end"),
    _hash("shellscript", ".sh", blocks="end"),
    *(_hash(id, blocks="end") for id in ("bash", "sh", "zsh", "elixir", "julia")),
    *(_hash(id) for id in ("perl", "r", "toml", "makefile", "dockerfile", "cmake", "powershell")),
    *(_hash(id, blocks="colon") for id in ("yaml", "nim", "coffeescript")),
    Language("lua", (".lua",), _DASH, (("--[[", "]]"),), blocks="end"),
    Language("sql", line_comments=_DASH, block_comments=_C_BLOCK),
    *(
        Language(id, line_comments=_DASH, block_comments=(("{-", "-}"),))
        for id in ("haskell", "elm")
    ),
    *(Language(id, line_comments=_DASH) for id in ("ada", "vhdl")),
    *(
        Language(id, line_comments=(";;", ";"), quotes=('"',))
        for id in ("lisp", "clojure", "scheme", "racket", "elisp", "emacs-lisp")
    ),
    *(Language(id, line_comments=("%",)) for id in ("erlang", "latex", "tex", "matlab")),
    Language("vim", line_comments=('"',), quotes=("'",)),
)

_BY_ID: dict[str, Language] = {lang.id: lang for lang in LANGUAGES}

# File extension -> language id (lower-case extensions, with the dot).
EXTENSIONS: Mapping[str, str] = {ext: lang.id for lang in LANGUAGES for ext in lang.extensions}


def language(id: str) -> Language:
    """The language with this LSP id; an unknown id gets the defaults (no comments known)."""
    found = _BY_ID.get(id)
    return found if found is not None else Language(id)


def language_for_path(path: str) -> Language | None:
    """The language a file's extension names, if the table knows it."""
    dot = path.rfind(".")
    if dot < 0 or "/" in path[dot:] or "\\" in path[dot:]:
        return None
    id = EXTENSIONS.get(path[dot:].lower())
    return _BY_ID[id] if id is not None else None


@functools.cache
def tree_sitter_language(id: str) -> Any | None:
    """The `tree_sitter.Language` of a language id; None without a grammar or its wheel.

    Loaded once per process; a missing wheel is logged once and degrades the
    caller (line windows instead of definitions, no syntax-aware prompts).
    """
    grammar = language(id).grammar
    if grammar is None:
        return None
    try:
        import tree_sitter

        module = importlib.import_module(grammar.module)
        return tree_sitter.Language(getattr(module, grammar.function)())
    except Exception as exc:
        log.warning("no tree-sitter grammar for %s (%s)", id, exc)
        return None
