"""LSP-conformant lines, position encodings and incremental edits."""

from __future__ import annotations

import random

import pytest

from exlsp.server.documents import (
    Document,
    PositionError,
    line_body,
    split_lines,
    to_char_index,
    to_units,
)

ENCODINGS = ("utf-8", "utf-16", "utf-32")


def test_only_lsp_line_breaks_split_lines() -> None:
    text = "a\fb\u2028c\x85d\r\ne\rf\ng"
    assert split_lines(text) == ["a\fb\u2028c\x85d\r\n", "e\r", "f\n", "g"]
    assert split_lines("") == [""]
    assert split_lines("x\n") == ["x\n", ""]


@pytest.mark.parametrize(("encoding", "units"), [("utf-8", 7), ("utf-16", 4), ("utf-32", 3)])
def test_units_and_indexes_round_trip(encoding: str, units: int) -> None:
    body = "é😀x"  # 2+4+1 UTF-8 bytes, 1+2+1 UTF-16 units
    assert to_units(body, 3, encoding) == units
    assert to_char_index(body, units, encoding) == 3
    assert to_char_index(body, 10_000, encoding) == 3  # clamped to the line end


def test_position_in_the_last_empty_line_after_non_ascii() -> None:
    doc = Document.from_text("u", "python", 1, "s = 'é😀'\n")
    for enc in ENCODINGS:
        assert doc.char_position(1, 0, enc) == (1, 0)


def test_a_line_past_the_end_is_an_error() -> None:
    doc = Document.from_text("u", "python", 1, "a\nb")
    with pytest.raises(PositionError):
        doc.char_position(2, 0, "utf-16")


def test_form_feed_does_not_shift_lines() -> None:
    doc = Document.from_text("u", "python", 1, "a = 1\n\f\nb = 2\n")
    doc.apply_change((2, 0), (2, 1), "c", "utf-16")
    assert doc.text == "a = 1\n\f\nc = 2\n"


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_random_incremental_edits_match_a_full_rewrite(encoding: str) -> None:
    rng = random.Random(1234)
    alphabet = ["a", "b", "\n", "\r", "\r\n", "é", "😀", "\f", " "]

    def rand(n: int) -> str:
        return "".join(rng.choice(alphabet) for _ in range(n))

    for _ in range(2000):
        text = rand(rng.randint(0, 20))
        doc = Document.from_text("u", "", 0, text)
        places = []
        offset = 0
        for i, line in enumerate(split_lines(text)):
            body = line_body(line)
            for k in range(len(body) + 1):
                places.append((offset + k, (i, to_units(body, k, encoding))))
            offset += len(line)
        (a, pa), (b, pb) = sorted(rng.sample(places, 2) if len(places) > 1 else places * 2)
        insert = rand(rng.randint(0, 5))
        doc.apply_change(pa, pb, insert, encoding)
        expect = text[:a] + insert + text[b:]
        assert doc.text == expect
        assert doc.lines == split_lines(expect)


def test_full_replacement_and_positions_past_the_end() -> None:
    doc = Document.from_text("u", "", 0, "abc\ndef")
    doc.apply_change((9, 0), (9, 0), "!", "utf-16")  # past the end: appended
    assert doc.text == "abc\ndef!"
    doc.apply_change(None, None, "new\ntext", "utf-16")
    assert doc.lines == ["new\n", "text"]
