"""Post-processing filters: golden cases, streaming monotonicity, one unit test per filter.

Golden cases live in ``tests/golden/postprocess/<language>.toml``: a ``language``
and a list of ``[[case]]`` tables with ``name``, ``filter``, ``document``, ``raw``,
``expected``, and optionally ``multiline = true/false`` to override the decision
taken from the document. ``document`` holds exactly one ``█`` (U+2588) at the
cursor; ``raw`` is what a model generated there; ``expected`` is
``postprocess(raw).text`` in the final pass; ``filter`` names the filter that is
first to change the text (``"none"``: nothing changes it). Each case's context is
built the way the engine builds a request's: `cursor_context` on a `DocumentView`.
"""

from __future__ import annotations

import tomllib
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from exlsp.completion.engine import cursor_context
from exlsp.completion.postprocess import (
    FILTERS,
    FINAL_ONLY,
    FilterContext,
    decide_multiline,
    drop_only_closers,
    postprocess,
    repetition,
    scope_end,
    single_line,
    suffix_overlap,
    trim_trailing_whitespace,
    unmatched_bracket,
)
from exlsp.completion.types import DocumentView
from exlsp.server.documents import split_lines

CURSOR = "\u2588"
GOLDEN_DIR = Path(__file__).parent / "golden" / "postprocess"
FILTER_NAMES = [name for name, _ in FILTERS]


def _load_cases() -> list[tuple[str, dict[str, Any]]]:
    cases = []
    for path in sorted(GOLDEN_DIR.glob("*.toml")):
        golden = tomllib.loads(path.read_text(encoding="utf-8"))
        for case in golden["case"]:
            cases.append((f"{path.stem}:{case['name']}", {**case, "language": golden["language"]}))
    return cases


CASES = _load_cases()


def ctx_at(document: str, language: str = "", multiline: bool | None = None) -> FilterContext:
    """The filters' context at the █ of `document`, built as the engine builds a request's."""
    assert document.count(CURSOR) == 1, "a document marks exactly one cursor"
    head = split_lines(document[: document.index(CURSOR)])
    lines = split_lines(document.replace(CURSOR, ""))
    view = DocumentView("file:///golden", lines, len(head) - 1, len(head[-1]), language)
    mode = "auto" if multiline is None else "always" if multiline else "never"
    return FilterContext.from_cursor(cursor_context(view, mode))


def _context(case: dict[str, Any]) -> FilterContext:
    return ctx_at(case["document"], case["language"], case.get("multiline"))


# --- golden cases ---------------------------------------------------------------


@pytest.mark.parametrize("case", [c for _, c in CASES], ids=[i for i, _ in CASES])
def test_golden_case(case: dict[str, Any]) -> None:
    result = postprocess(case["raw"], _context(case))
    assert result.text == case["expected"]
    if case["filter"] == "none":
        assert result.by is None
        assert not result.truncated
    else:
        assert result.by == case["filter"]
        assert result.truncated


@pytest.mark.parametrize("case", [c for _, c in CASES], ids=[i for i, _ in CASES])
def test_golden_case_streams_to_the_same_cut(case: dict[str, Any]) -> None:
    """Fed one character at a time, the first streamed cut already gives the final text.

    And every longer text cuts the same way: the decision never changes.
    """
    ctx = _context(case)
    raw: str = case["raw"]
    first_cut = None
    for end in range(1, len(raw) + 1):
        streamed = postprocess(raw[:end], ctx, final=False)
        if streamed.truncated:
            first_cut = end
            assert streamed.by is not None and streamed.by not in FINAL_ONLY
            break
        assert streamed.text == raw[:end], "nothing is cut before a filter reports a cut"
    if first_cut is None:
        return
    streamed_text = streamed.text
    for end in range(first_cut, len(raw) + 1):
        assert postprocess(raw[:end], ctx).text == case["expected"], raw[:end]
        later = postprocess(raw[:end], ctx, final=False)
        assert (later.truncated, later.text) == (True, streamed_text), raw[:end]


def test_golden_files_cover_every_filter() -> None:
    assert len(CASES) >= 67
    per_language = Counter(case["language"] for _, case in CASES)
    assert set(per_language) == {"python", "typescript", "go", "rust", "lua"}
    assert min(per_language[lang] for lang in ("python", "typescript", "go", "rust")) >= 6
    languages_per_filter: dict[str, set[str]] = {}
    for _, case in CASES:
        assert case["filter"] in {*FILTER_NAMES, "none"}, case["name"]
        languages_per_filter.setdefault(case["filter"], set()).add(case["language"])
    for name in [*FILTER_NAMES, "none"]:
        assert len(languages_per_filter.get(name, ())) >= 2, name
    assert len({case_id for case_id, _ in CASES}) == len(CASES), "case names are unique per file"


# --- decide_multiline ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "suffix", "language", "expected"),
    [
        ("    ", "", "python", True),
        ("def area(self) -> float:", "", "python", True),
        ("    if x < 0:", "", "python", True),
        ("    d = {'a':", "", "python", False),  # a dict value, not a block
        ("    return a +", "", "python", False),
        ("    print(", ")", "python", True),
        ("    print(x, ", ")", "python", False),
        ("    return ", "", "python", False),
        ("function f(): number {", "}", "typescript", True),
        ("const handler = (e: Event) =>", "", "typescript", True),
        ("const x = ", ";", "typescript", True),
        ("if (a == ", ") {", "typescript", False),
        ("  port:", ",", "typescript", False),  # an object key, not a block
        ("\tif err != nil {", "", "go", True),
        ("\tcase 1:", "", "go", True),
        ("\tx := ", "", "go", True),
        ("\tname := user.", "Name", "go", False),
        ("fn norm(&self) -> f64 {", "", "rust", True),
        ("        Some(x) =>", "", "rust", True),
        ("    let v = vec![", "];", "rust", True),
        ("    let n = a.min(", ") + 1;", "rust", False),
    ],
)
def test_decide_multiline(prefix: str, suffix: str, language: str, expected: bool) -> None:
    assert decide_multiline(prefix, suffix, language) is expected


def test_the_context_splits_the_document_around_the_cursor() -> None:
    lines = [f"line{i}" for i in range(50)]
    document = "\r\n".join(lines[:25]) + "\r\nleft" + CURSOR + "right\r\n" + "\n".join(lines[25:])
    ctx = ctx_at(document, "python")
    assert (ctx.line_prefix, ctx.line_suffix) == ("left", "right")
    assert list(ctx.lines_before) == lines[5:25]
    assert list(ctx.lines_after) == lines[25:45]
    assert ctx.multiline is False
    assert ctx_at("x = 1\n" + CURSOR, multiline=False).multiline is False
    assert ctx_at("x = 1\n" + CURSOR).multiline is True


# --- one small case per filter ----------------------------------------------------


def test_single_line_cuts_at_the_first_newline() -> None:
    ctx = ctx_at("x = f(" + CURSOR, multiline=False)
    assert single_line("a, b)\ny = 2", ctx) == "a, b)"
    assert single_line("a, b)", ctx) == "a, b)"
    assert single_line("a\nb", ctx_at("x = f(" + CURSOR, multiline=True)) == "a\nb"


def test_scope_end_block_and_dedent() -> None:
    ctx = ctx_at("def f(x):" + CURSOR, "python")
    assert scope_end("\n    y = x\n    return y\nz = 1", ctx) == "\n    y = x\n    return y\n"
    # A blank cursor line continues the enclosing scope until a dedent.
    ctx = ctx_at("def f(x):\n    " + CURSOR, "python")
    text = "if x:\n        a()\n    else:\n        b()\n    return 1\nprint(f(1))"
    assert scope_end(text, ctx) == "if x:\n        a()\n    else:\n        b()\n    return 1\n"
    # Tabs count one unit each, like the cursor line's own.
    ctx = ctx_at("func f() {\n\tif ok {" + CURSOR, "go")
    assert scope_end("\n\t\tg()\n\t}\n\th()", ctx) == "\n\t\tg()\n\t}"


def test_scope_end_waits_for_evidence_while_streaming() -> None:
    ctx = ctx_at("fn f() {\n    if ok {" + CURSOR, "rust")
    streaming = replace(ctx, text_complete=False)
    # "    }" may still become "    } else {": the line is kept, the scope not yet ended.
    assert scope_end("\n        g()\n    }", streaming) == "\n        g()\n    }"
    assert scope_end("\n        g()\n    } else {\n        h()\n    }\n", streaming) == (
        "\n        g()\n    } else {\n        h()\n    }"
    )
    # Blank lines never decide, a whitespace-only last line neither.
    assert scope_end("\n        g()\n\n", streaming) == "\n        g()\n\n"
    # "e" may become "else"; "x" decides at once.
    ctx = ctx_at("def f(x):\n    if x:" + CURSOR, "python")
    streaming = replace(ctx, text_complete=False)
    assert scope_end("\n        a()\n    e", streaming) == "\n        a()\n    e"
    assert scope_end("\n        a()\n    x", streaming) == "\n        a()\n"


def test_suffix_overlap_lines_below_and_rest_of_line() -> None:
    ctx = ctx_at("def f():\n    " + CURSOR + "\n    return y\n", "python")
    assert suffix_overlap("y = 1\n    return y\n", ctx) == "y = 1\n"
    assert suffix_overlap("return y", ctx) == ""  # the first line of a blank cursor line counts
    # A bare "}" below is compared with its indentation: a nested "}" is not a repeat.
    ctx = ctx_at("func f() {\n\t" + CURSOR + "\n}\n", "go")
    assert suffix_overlap("if x {\n\t\ty()\n\t}\n", ctx) == "if x {\n\t\ty()\n\t}\n"
    assert suffix_overlap("g()\n}\n", ctx) == "g()\n"
    ctx = ctx_at("x = max(a, " + CURSOR + ")\n", "python")
    assert suffix_overlap("b)", ctx) == "b"
    assert suffix_overlap("len(b)", ctx) == "len(b)", "that ) closes the completion's own ("
    ctx = ctx_at('name = "' + CURSOR + '"\n', "python")
    assert suffix_overlap('Ada"', ctx) == "Ada"
    assert suffix_overlap('" + first + "', ctx) == '" + first + "', "that quote opens a string"
    ctx = ctx_at("x = [" + CURSOR + "]\n", "python")
    assert suffix_overlap("\n    1,\n    2,\n]", ctx) == "\n    1,\n    2,\n"
    ctx = ctx_at("values = " + CURSOR + "x\n", "python", multiline=False)
    assert suffix_overlap("max", ctx) == "max", "a word suffix must start a word"


def test_unmatched_bracket_uses_the_line_around_the_cursor() -> None:
    assert unmatched_bracket("x)", ctx_at("print(" + CURSOR + ")", "python")) == "x"
    assert unmatched_bracket("a, b)", ctx_at("foo(" + CURSOR, "python")) == "a, b)"
    assert unmatched_bracket("a]", ctx_at("foo(" + CURSOR, "python")) == "a"
    assert unmatched_bracket("a])", ctx_at("foo([" + CURSOR, "python")) == "a])"
    ctx = ctx_at("x = f(" + CURSOR + ")", "python")
    assert unmatched_bracket('"(" + a) # )', ctx) == '"(" + a'
    assert unmatched_bracket("a # )\n)", ctx) == "a # )\n"
    rust = ctx_at("let r = f(" + CURSOR + ");", "rust")
    assert unmatched_bracket("x as &'a str) + 1", rust) == "x as &'a str"
    assert unmatched_bracket("')') + 1", rust) == "')'"
    # The model rewrote the rest of the line: the repeat goes too.
    ctx = ctx_at("total = reduce(add, items, " + CURSOR + ", 0)\n", "python")
    assert unmatched_bracket("start, 0) + 1", ctx) == "start"
    # It is rewriting the line below, which closes a bracket of the line above.
    ctx = ctx_at("x = f(a,\n      " + CURSOR + "\n      b)\n", "python")
    assert unmatched_bracket("c,\n      b) + 1", ctx) == "c,\n"
    assert unmatched_bracket("c)", ctx) == "c"
    # Streaming: "')" may still be the char literal "')'".
    streaming = replace(rust, text_complete=False)
    assert unmatched_bracket("')", streaming) == "')"
    assert unmatched_bracket("'a)", streaming) == "'a", "a lifetime: the ) decides at once"


def test_repetition_lines_blocks_and_inline_loops() -> None:
    ctx = ctx_at("def f():\n    " + CURSOR, "python")
    assert repetition("a = 1\n    a = 1\n", ctx) == "a = 1"
    assert repetition("a()\n    b()\n    a()\n    b()\n", ctx) == "a()\n    b()"
    assert repetition("a()\n    b()\n    a()\n", ctx) == "a()\n    b()\n    a()\n"
    assert repetition("x = y.z.z.z.z", ctx) == "x = y.z.z.z.z", "units are 3 characters or more"
    assert repetition("x = y.zz.zz.zz.zz", ctx) == "x = y.zz"
    assert repetition("# " + "-" * 60, ctx) == "# " + "-" * 60, "a ruler is not a loop"
    assert repetition("s = 'é, é, é, é, é'", ctx) == "s = 'é, "
    streaming = FilterContext("    ", "", language="python", text_complete=False)
    assert repetition("a = 1\n    a = 1", streaming) == "a = 1\n    a = 1", "the line may go on"


def test_trim_trailing_whitespace() -> None:
    ctx = ctx_at("def f():" + CURSOR, "python")
    text = "\n    a = 1  \n    b = 2\t\n\n  "
    assert trim_trailing_whitespace(text, ctx) == "\n    a = 1\n    b = 2"
    assert trim_trailing_whitespace(" \n\t\n", ctx) == ""
    # A body written into "{█}" ends on its own line, so the "}" lands below it.
    ctx = ctx_at("func f() {\n\tif ok {" + CURSOR + "}\n}", "go")
    assert trim_trailing_whitespace("\n\t\tg()\n\t", ctx) == "\n\t\tg()\n\t"
    assert trim_trailing_whitespace("\n\t\tg()", ctx) == "\n\t\tg()\n\t"
    assert trim_trailing_whitespace("g() ", ctx) == "g()"


def test_drop_only_closers() -> None:
    ctx = ctx_at('print("hi' + CURSOR + '")', "python")
    assert drop_only_closers('"', ctx) == ""
    assert drop_only_closers('")', ctx) == ""
    assert drop_only_closers("!", ctx) == "!"
    assert drop_only_closers("]", ctx) == "]", "not what the line already has"
    assert drop_only_closers("  \n", ctx) == ""


def test_postprocess_streaming_runs_only_cutting_filters() -> None:
    ctx = ctx_at("def f():\n    " + CURSOR + "\n", "python")
    streamed = postprocess("x = 1   \n\n", ctx, final=False)
    assert streamed == postprocess("x = 1   \n\n", ctx, final=False)
    assert (streamed.text, streamed.truncated, streamed.by) == ("x = 1   \n\n", False, None)
    final = postprocess("x = 1   \n\n", ctx)
    assert (final.text, final.truncated, final.by) == ("x = 1", True, "trim_trailing_whitespace")
    # After a cut, the rest is settled: later filters see it as complete.
    ctx = ctx_at("func f() {\n\tif err != nil {" + CURSOR + "\n\t}\n}", "go")
    streamed = postprocess("\n\t\treturn err\n\t}\n", ctx, final=False)
    assert (streamed.text, streamed.by) == ("\n\t\treturn err\n", "scope_end")


def test_filters_are_listed_in_pipeline_order() -> None:
    assert FILTER_NAMES == [
        "single_line",
        "scope_end",
        "suffix_overlap",
        "unmatched_bracket",
        "repetition",
        "trim_trailing_whitespace",
        "drop_only_closers",
    ]
    assert set(FINAL_ONLY) < set(FILTER_NAMES)
