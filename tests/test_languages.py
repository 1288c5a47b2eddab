"""The language table: lookups, and the places that read it agree."""

from __future__ import annotations

from exlsp.completion.languages import EXTENSIONS, LANGUAGES, language, language_for_path
from exlsp.completion.postprocess import FilterContext, unmatched_bracket
from exlsp.server.cli import LANGUAGES as CLI_LANGUAGES


def test_lookups_by_id_and_path() -> None:
    assert language("lua").line_comments[0] == "--"
    assert language("no-such-language").line_comments == ()
    assert language("no-such-language").comment == "//"
    assert language_for_path("src/App.TSX") is language("typescriptreact")
    assert language_for_path("a.b/Makefile") is None
    assert language_for_path("notes") is None
    assert CLI_LANGUAGES[".rs"] == "rust"
    assert len({lang.id for lang in LANGUAGES}) == len(LANGUAGES), "one row per id"
    owners = [lang.id for lang in LANGUAGES for _ in lang.extensions]
    assert len(owners) == len(EXTENSIONS), "an extension names one language"


def test_every_comment_the_prompt_writes_is_one_the_scanner_skips() -> None:
    for lang in LANGUAGES:
        if not lang.line_comments:
            continue
        ctx = FilterContext("f(", ")", language=lang.id, multiline=False)
        text = f"x {lang.comment} 1) y\n"
        assert unmatched_bracket(text, ctx) == text, lang.id


def test_documentation_comment_markers() -> None:
    from exlsp.completion.languages import language

    assert language("rust").doc_comment == "///"
    assert language("go").doc_comment == "//"
    assert language("ruby").doc_comment == "#"
    assert language("no-such-language").doc_comment == "//"
