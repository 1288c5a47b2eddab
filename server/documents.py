"""Open documents, split into lines the way LSP counts them.

LSP counts only ``\\n``, ``\\r\\n`` and ``\\r`` as line breaks (Python's
``str.splitlines`` also breaks at form feeds, U+2028, U+0085 ...), and positions
count characters in the negotiated encoding (UTF-8 bytes, UTF-16 code units or
code points). This module owns both conversions instead of relying on pygls'
document model, and applies incremental edits by replacing only the lines they
touch, so a keystroke in a large file does not copy the whole text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pygls.uris import to_fs_path

from exlsp.completion.types import line_body
from exlsp.index.secrets import secret_in_text, secret_path

_BREAK = re.compile(r"\r\n|\r|\n")


def split_lines(text: str) -> list[str]:
    """Lines with their endings; always one more line than there are breaks."""
    lines: list[str] = []
    pos = 0
    for m in _BREAK.finditer(text):
        lines.append(text[pos : m.end()])
        pos = m.end()
    lines.append(text[pos:])
    return lines


def _units(ch: str, encoding: str) -> int:
    o = ord(ch)
    if encoding == "utf-16":
        return 2 if o > 0xFFFF else 1
    if encoding == "utf-8":
        return 1 if o < 0x80 else 2 if o < 0x800 else 3 if o < 0x10000 else 4
    return 1


def to_char_index(body: str, units: int, encoding: str) -> int:
    """Code units of `encoding` into `body` -> Python index, clamped to the line end.

    A position inside a multi-unit character lands after it.
    """
    if units <= 0:
        return 0
    if encoding == "utf-32" or body.isascii():
        return min(units, len(body))
    count = 0
    for i, ch in enumerate(body):
        if count >= units:
            return i
        count += _units(ch, encoding)
    return len(body)


def to_units(body: str, index: int, encoding: str) -> int:
    """Python index into `body` -> code units of `encoding`."""
    prefix = body[:index]
    if encoding == "utf-32" or prefix.isascii():
        return len(prefix)
    if encoding == "utf-16":
        return len(prefix.encode("utf-16-le")) // 2
    return len(prefix.encode("utf-8"))


class PositionError(ValueError):
    pass


def secret_reason(uri: str, text: str) -> str | None:
    """Why a document must never reach a model: a secret file by its name or its link's
    target, or text holding a private key or a credential; None when it may."""
    path = to_fs_path(uri) if uri.startswith("file:") else None
    if path and secret_path(path):
        return "it is a secret file"
    found = secret_in_text(text)
    return f"it holds {found}" if found else None


@dataclass
class Document:
    uri: str
    language: str
    version: int
    lines: list[str] = field(default_factory=lambda: [""])
    # Why the document must not reach a model (see `secret_reason`); once set, it stays
    # until the document is closed.
    secret: str | None = None

    @classmethod
    def from_text(cls, uri: str, language: str, version: int, text: str) -> Document:
        return cls(uri, language, version, split_lines(text), secret_reason(uri, text))

    def check_secret(self, first: int | None = None, last: int | None = None) -> None:
        """Look for a secret in lines first..last (all lines without a range) after an edit."""
        if self.secret is not None:
            return
        if first is None or last is None:
            found = secret_in_text(self.text)
        else:
            found = secret_in_text("".join(self.lines[max(0, first - 1) : last + 2]))
        if found:
            self.secret = f"it holds {found}"

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def char_position(self, line: int, units: int, encoding: str) -> tuple[int, int]:
        """(line, code units) -> (line, Python index), the index clamped to the line end.

        A line past the end of the document is an error: the client and the
        server disagree about the document.
        """
        if line < 0 or units < 0:
            raise PositionError(f"negative position ({line}, {units})")
        if line >= len(self.lines):
            raise PositionError(f"line {line} is past the end of the document ({len(self.lines)})")
        return line, to_char_index(line_body(self.lines[line]), units, encoding)

    def apply_change(
        self, start: tuple[int, int] | None, end: tuple[int, int] | None, text: str, encoding: str
    ) -> None:
        """Replace the range [start, end) (LSP positions) with `text`; no range: the whole text."""
        if start is None or end is None:
            self.lines = split_lines(text)
            return
        last = len(self.lines) - 1
        # Positions past the end clamp to the end of the document (as editors expect).
        sl, sc = start if start[0] <= last else (last, 1 << 30)
        el, ec = end if end[0] <= last else (last, 1 << 30)
        sl, sc = self.char_position(sl, sc, encoding)
        el, ec = self.char_position(el, ec, encoding)
        if (el, ec) < (sl, sc):
            sl, sc, el, ec = el, ec, sl, sc
        # A bare "\r" ending the line before may join a "\n" the edit puts first.
        lo = sl - 1 if sl > 0 and self.lines[sl - 1].endswith("\r") else sl
        chunk = (
            "".join(self.lines[lo:sl]) + line_body(self.lines[sl])[:sc] + text + self.lines[el][ec:]
        )
        new = split_lines(chunk)
        if el < last:
            new.pop()  # the chunk ends with a line break: the next line follows
        self.lines[lo : el + 1] = new


class DocumentStore:
    def __init__(self) -> None:
        self._docs: dict[str, Document] = {}

    def open(self, uri: str, language: str, version: int, text: str) -> Document:
        doc = Document.from_text(uri, language, version, text)
        self._docs[uri] = doc
        return doc

    def get(self, uri: str) -> Document | None:
        return self._docs.get(uri)

    def close(self, uri: str) -> None:
        self._docs.pop(uri, None)

    def __len__(self) -> int:
        return len(self._docs)
