"""Inline items replace the word typed left of the cursor, in every position encoding."""

from __future__ import annotations

import pytest
from lsprotocol import types

from exlsp.completion.types import DocumentView, Suggestion
from exlsp.server.documents import split_lines
from exlsp.server.features.inline import inline_items, typed_word
from tests.test_lsp_e2e import units

# 'é' / 'ä' are 2 UTF-8 bytes and 1 UTF-16 unit; '😀' is 4 bytes and 2 units.
TEXT = 'print("😀")\n    s = "😀é"; x = réturn_vä\nnext_line()\n'
LINE = 1


def index_of(body: str, count: int, encoding: str) -> int:
    """Code units -> Python index, computed independently of the server's helpers."""
    for i in range(len(body) + 1):
        if units(body[:i], encoding) >= count:
            return i
    return len(body)


def apply(body: str, item: types.InlineCompletionItem, encoding: str) -> str:
    assert item.range is not None and isinstance(item.insert_text, str)
    start = index_of(body, item.range.start.character, encoding)
    end = index_of(body, item.range.end.character, encoding)
    return body[:start] + item.insert_text + body[end:]


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16", "utf-32"])
@pytest.mark.parametrize(
    ("cut", "word"),
    [
        ('    s = "😀é"; x = réturn_vä', "réturn_vä"),  # inside a word after non-ASCII text
        ('    s = "😀é"; x = ', ""),  # after a space: nothing typed, an insertion
        ('    s = "😀é', "é"),  # a one-letter word right after a 2-unit emoji
    ],
)
def test_the_range_covers_the_typed_word(encoding: str, cut: str, word: str) -> None:
    lines = split_lines(TEXT)
    body = lines[LINE].rstrip("\n")
    view = DocumentView("file:///m.py", lines, LINE, len(cut), "python")
    assert typed_word(view) == word
    position = types.Position(LINE, units(cut, encoding))
    [item] = inline_items(view, position, [Suggestion("lue + 1")], encoding)
    assert item.range is not None
    assert item.range.start == types.Position(LINE, units(cut[: len(cut) - len(word)], encoding))
    assert item.range.end == position
    assert item.insert_text == word + "lue + 1"
    assert item.filter_text == item.insert_text
    # Accepting the item leaves the typed word once, followed by the suggestion.
    assert apply(body, item, encoding) == cut + "lue + 1" + body[len(cut) :]
