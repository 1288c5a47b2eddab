"""The cache-stable prompt layout, budgets, hysteresis and segment caching."""

from __future__ import annotations

import itertools
import time

from exlsp.completion.config import CompletionConfig
from exlsp.completion.fim import TEMPLATES, FimTokens
from exlsp.completion.prompt import PromptBuilder
from exlsp.completion.types import DocumentView, Snippet
from exlsp.server.documents import split_lines
from tests.fakes import CharTokenizer


def view(text: str, line: int, character: int, uri: str = "file:///a.py") -> DocumentView:
    return DocumentView(uri, split_lines(text), line, character, "python", "a.py")


def builder(family: str = "qwen2.5-coder", **cfg: int) -> tuple[PromptBuilder, CharTokenizer]:
    specials = {t for tpl in TEMPLATES.values() for t in (*tpl.stops, tpl.prefix, tpl.suffix)}
    specials |= {t.middle for t in TEMPLATES.values() if t.middle}
    specials |= {t.file_sep for t in TEMPLATES.values() if t.file_sep}
    tok = CharTokenizer(sorted(specials))
    fim = FimTokens.resolve(TEMPLATES[family], tok)
    return PromptBuilder(tok, fim, CompletionConfig(**cfg)), tok


def test_psm_layout_puts_left_of_cursor_after_middle_marker() -> None:
    b, tok = builder()
    doc = view("import os\ndef f(x):\n    return x\n", 2, 8)
    p = b.build(doc)
    fim = b.fim
    expect = [
        fim.prefix,
        *tok.encode("import os\ndef f(x):\n"),
        fim.suffix,
        *tok.encode("rn x\n"),
        fim.middle,
        *tok.encode("    retu"),
    ]
    assert p.ids == expect
    assert (p.prefix, p.suffix, p.middle) == ("import os\ndef f(x):\n", "rn x\n", "    retu")


def test_spm_family_puts_suffix_first() -> None:
    b, tok = builder("codestral")
    p = b.build(view("a = 1\nb = 2\n", 1, 3))
    fim = b.fim
    assert p.ids[0] == fim.bos or fim.bos is None
    body = p.ids[1:] if fim.bos is not None else p.ids
    assert body == [
        fim.suffix,
        *tok.encode(" 2\n"),
        fim.prefix,
        *tok.encode("a = 1\n"),
        *tok.encode("b ="),
    ]


def test_typing_in_a_line_changes_only_tokens_after_the_middle_marker() -> None:
    b, _tok = builder()
    lines = [f"line_{i} = {i}\n" for i in range(50)]
    text = "".join(lines) + "    \n" + "".join(lines)
    base = b.build(view(text, 50, 4))
    marker = base.ids.index(b.fim.middle)
    typed = "value = compute("
    for n in range(1, len(typed) + 1):
        doc_text = "".join(lines) + "    " + typed[:n] + "\n" + "".join(lines)
        p = b.build(view(doc_text, 50, 4 + n))
        assert p.ids[: marker + 1] == base.ids[: marker + 1]


def test_each_keystroke_tokenizes_only_the_cursor_line() -> None:
    b, tok = builder()
    lines = [f"x{i} = {i}\n" for i in range(100)]
    b.build(view("".join(lines), 60, 3))
    calls = tok.encode_calls
    lines[60] = "x60z = 60\n"  # typed "z" at the cursor
    b.build(view("".join(lines), 60, 4))
    assert tok.encode_calls - calls == 1  # the middle; prefix and suffix come from the cache


def test_budgets_are_respected() -> None:
    b, _tok = builder(prefixTokens=100, suffixTokens=40)
    text = "".join(f"value_{i} = {i}\n" for i in range(500))
    p = b.build(view(text, 250, 3))
    assert p.segment_tokens["prefix"] <= 100
    assert p.segment_tokens["suffix"] <= 40
    assert p.prefix.endswith("value_249 = 249\n")
    assert p.suffix.startswith("ue_250 = 250\n")


def test_prefix_window_start_moves_with_hysteresis() -> None:
    b, _ = builder(prefixTokens=200)
    lines = [f"v{i:03d} = {i:03d}\n" for i in range(400)]  # 11 tokens a line
    text = "".join(lines)
    starts = []
    for cursor in range(100, 160):
        starts.append(b.build(view(text, cursor, 0)).prefix_start_line)
    moves = sum(1 for a, c in itertools.pairwise(starts) if a != c)
    # Stays put for many lines at a time instead of sliding with every line.
    assert moves <= 60 // 4
    assert len(set(starts)) >= 2
    for cursor, start in zip(range(100, 160), starts, strict=True):
        assert (cursor - start) * 11 <= 200


def test_fim_marker_text_in_the_file_stays_plain_text() -> None:
    b, _tok = builder()
    text = "s = '<|fim_middle|><|fim_prefix|>'\nx = 1\n"
    p = b.build(view(text, 1, 2))
    assert p.ids.count(b.fim.middle) == 1
    assert p.ids.count(b.fim.prefix) == 1


def test_a_megabyte_line_is_cut_and_cheap() -> None:
    b, _ = builder()
    text = "x = '" + "a" * 1_000_000 + "'\n"
    t0 = time.perf_counter()
    p = b.build(view(text, 0, 900_000))
    assert time.perf_counter() - t0 < 1.0
    assert len(p.middle) <= 256 * 4
    assert len(p.ids) < 4000


def test_repo_level_snippets_come_first_with_file_headers() -> None:
    b, tok = builder(snippetTokens=200)
    snippets = [Snippet("lib/util.py", "def helper():\n    pass\n")]
    p = b.build(view("x = helper()\n", 0, 4), snippets)
    fim = b.fim
    assert p.ids[0] == fim.file_sep
    first_frame = p.ids.index(fim.prefix)
    text_before = tok.decode(p.ids[:first_frame])
    assert "lib/util.py\ndef helper():" in text_before
    assert text_before.rstrip().endswith("a.py")


def test_comment_snippets_for_families_without_repo_tokens() -> None:
    b, tok = builder("deepseek-coder", snippetTokens=200)
    snippets = [Snippet("lib/util.py", "def helper():\n    pass\n")]
    p = b.build(view("x = helper()\n", 0, 4), snippets)
    rendered = tok.decode(p.ids)
    assert "# Path: lib/util.py\n# def helper():\n#     pass\n# Path: a.py\n" in rendered
    assert p.ids.index(b.fim.prefix) < p.ids.index(b.fim.suffix)


def test_snippets_over_budget_are_left_out() -> None:
    b, _ = builder(snippetTokens=50)
    snippets = [Snippet("big.py", "x" * 500), Snippet("small.py", "y = 1")]
    p = b.build(view("z\n", 0, 1), snippets)
    assert p.segment_tokens["snippets"] <= 50
    assert p.segment_tokens["snippets"] > 0
