"""The chunker (tree-sitter definitions, line windows) and the identifier-split text."""

from __future__ import annotations

import itertools

import pytest

from exlsp.index.chunk import Chunker, chunk_id, language_for_path
from exlsp.index.lexical import query_terms, search_text
from tests.index_helpers import EXPECTED_DEFINITIONS, SAMPLES


@pytest.fixture(scope="module")
def chunker() -> Chunker:
    return Chunker(max_lines=60, overlap=10)


def test_languages_by_extension() -> None:
    assert {language_for_path(p) for p in SAMPLES} == {
        "python",
        "javascript",
        "typescript",
        "go",
        "rust",
        "java",
        "c",
        "cpp",
        "",
    }
    assert language_for_path("x/y.tsx") == "typescriptreact"
    assert language_for_path("x/Y.JSX") == "javascriptreact"
    assert language_for_path("x/y.lua") == "", "a language without definition nodes"
    assert language_for_path("a.b/Makefile") == ""


@pytest.mark.parametrize(
    "path", sorted({p for p, *_ in EXPECTED_DEFINITIONS}), ids=lambda p: p.rsplit(".", 1)[1]
)
def test_definitions_with_names_and_line_ranges(chunker: Chunker, path: str) -> None:
    text = SAMPLES[path]
    chunks = chunker.chunk(path, text)
    found = {(c.symbol, c.kind, c.start_line, c.end_line) for c in chunks}
    expected = {(s, k, a, b) for p, s, k, a, b in EXPECTED_DEFINITIONS if p == path}
    assert expected <= found, f"missing {expected - found}; found {found}"
    lines = text.splitlines(keepends=True)
    for c in chunks:
        # The text is exactly the lines it claims, and ids are the stable hash.
        assert c.text == "".join(lines[c.start_line : c.end_line])
        assert c.id == chunk_id(path, c.start_line, c.text)
        assert c.language == language_for_path(path)


def test_chunks_are_stable_and_move_with_their_text(chunker: Chunker) -> None:
    path = "src/geometry.py"
    first = chunker.chunk(path, SAMPLES[path])
    again = chunker.chunk(path, SAMPLES[path])
    assert [c.id for c in first] == [c.id for c in again]
    shifted = chunker.chunk(path, "\n\n" + SAMPLES[path])
    assert not {c.id for c in first} & {c.id for c in shifted}  # start line is in the id


def test_large_class_is_split_into_methods_and_header() -> None:
    methods = "\n".join(
        f"    def method_{i}(self, x):\n        y = x + {i}\n        return y * 2\n"
        for i in range(12)
    )
    text = f"class BigHolder:\n    '''Holds things.'''\n    LIMIT = 3\n\n{methods}"
    chunks = Chunker(max_lines=20, overlap=4).chunk("big.py", text)
    by_symbol = {c.symbol: c for c in chunks}
    for i in range(12):
        method = by_symbol[f"BigHolder.method_{i}"]
        assert method.kind == "method"
        assert method.end_line - method.start_line == 3
    header = [c for c in chunks if c.symbol == "BigHolder"]
    assert header and header[0].start_line == 0 and "LIMIT = 3" in header[0].text
    assert all(c.end_line - c.start_line <= 20 for c in chunks)


def test_large_function_is_split_into_named_windows() -> None:
    body = "".join(f"    total += compute_step({i})\n" for i in range(100))
    text = f"def long_worker(total):\n{body}    return total\n"
    chunks = Chunker(max_lines=30, overlap=5).chunk("work.py", text)
    assert len(chunks) >= 4
    assert all(c.symbol == "long_worker" and c.kind == "function" for c in chunks)
    assert all(c.end_line - c.start_line <= 30 for c in chunks)
    # Consecutive windows overlap by 5 lines and together cover the function.
    for a, b in itertools.pairwise(chunks):
        assert b.start_line == a.end_line - 5
    assert chunks[0].start_line == 0 and chunks[-1].end_line == 102


def test_plain_text_gets_overlapping_windows() -> None:
    text = "".join(f"line number {i} of the notes\n" for i in range(100))
    chunks = Chunker(max_lines=40, overlap=10).chunk("notes.txt", text)
    assert [(c.start_line, c.end_line) for c in chunks] == [(0, 40), (30, 70), (60, 100)]
    assert all(c.kind == "window" and c.language == "text" for c in chunks)


def test_code_outside_definitions_is_kept() -> None:
    text = (
        "import os\nimport sys\nCONFIG_PATH = os.path.join('a', 'b')\n\n"
        "def f():\n    return 1\n\nif __name__ == '__main__':\n    sys.exit(f())\n"
    )
    chunks = Chunker().chunk("script.py", text)
    spans = {(c.kind, c.start_line, c.end_line) for c in chunks}
    assert ("window", 0, 3) in spans
    assert ("function", 4, 6) in spans
    assert ("window", 7, 9) in spans


def test_broken_code_still_chunks() -> None:
    text = "def ok():\n    return 1\n\ndef broken(:\n    pass\n" + "x = 1\n" * 5
    chunks = Chunker().chunk("bad.py", text)
    joined = "".join(c.text for c in chunks)
    assert "def ok" in joined and "x = 1" in joined


def test_search_text_splits_identifiers() -> None:
    assert search_text("parseHTTPRequest2(x)") == "parse http request 2 parsehttprequest2 x"
    assert search_text("parse_http_request") == "parse http request parsehttprequest"
    assert search_text("__init__ self") == "init self"


def test_query_terms_put_distinctive_terms_first() -> None:
    terms = query_terms(["return self.loadUserProfile(uid)", "x = 1"], max_terms=5)
    assert terms[:5] == ["load", "user", "profile", "loaduserprofile", "uid"]
    assert "self" in query_terms(["return self"], max_terms=5)  # short queries keep keywords


def test_jsx_and_tsx_chunk_with_the_language_table_grammars() -> None:
    jsx = "export function Button({ label }) {\n  return <button>{label}</button>;\n}\n"
    chunks = Chunker().chunk("ui/Button.jsx", jsx)
    assert [(c.language, c.symbol, c.kind) for c in chunks] == [
        ("javascriptreact", "Button", "function")
    ]
    tsx = "export const Card = (p: Props) => <div>{p.title}</div>;\n"
    chunks = Chunker().chunk("ui/Card.tsx", tsx)
    assert [(c.language, c.symbol) for c in chunks] == [("typescriptreact", "Card")]
