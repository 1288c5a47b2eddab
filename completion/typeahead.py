"""Type-ahead: suggestions kept by place, answered again while the user types them.

A place is the text near the cursor, not the prompt's whole windows: a
suggestion stays good after an edit further up, after the window's start
moved, and after the cursor went elsewhere and came back.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from exlsp.completion.types import CursorContext, DocumentView, line_body


def accepted_view(doc: DocumentView, text: str) -> DocumentView:
    """`doc` after `text` was inserted at its cursor, the cursor after the insertion."""
    line = doc.lines[doc.line] if doc.line < len(doc.lines) else ""
    body = line_body(line)
    eol = line[len(body) :] or "\n"
    inserted = text.split("\n")
    new = [body[: doc.character] + inserted[0]]
    new += inserted[1:]
    new = [s + eol for s in new[:-1]] + [new[-1] + line[doc.character :]]
    lines = [*doc.lines[: doc.line], *new, *doc.lines[doc.line + 1 :]]
    row = doc.line + len(inserted) - 1
    col = (doc.character if len(inserted) == 1 else 0) + len(inserted[-1])
    return dataclasses.replace(doc, lines=lines, line=row, character=col)


def accepted_place(doc: DocumentView, text: str) -> tuple[PlaceKey, str]:
    """`place_key` and the cursor line's left text of `accepted_view(doc, text)`.

    From the lines near the cursor only: this runs at every keystroke that types
    along a suggestion, whatever the file's size.
    """
    lo = max(0, doc.line - _KEY_LINES_ABOVE)
    near = accepted_view(
        dataclasses.replace(doc, lines=list(doc.lines[lo : doc.line + 2]), line=doc.line - lo),
        text,
    )
    cursor = CursorContext.at(near)
    return place_key(near.uri, cursor), cursor.line_prefix


PlaceKey = tuple[str, str, str]  # (uri, lines above, rest of the line + the line below)
_KEY_LINES_ABOVE = 3


def _place(uri: str, above: Sequence[str], right: str, below: str) -> PlaceKey:
    # Trailing blanks: editors strip them on Enter; they do not change what comes next.
    near = "\n".join(line.rstrip() for line in above[-_KEY_LINES_ABOVE:])
    return (uri, near, f"{right}\n{below.rstrip()}")


def place_key(uri: str, cursor: CursorContext) -> PlaceKey:
    """The type-ahead place of a request: lines just above, right of the cursor, line below."""
    below = cursor.below[0] if cursor.below else ""
    return _place(uri, cursor.above, cursor.right, below)


@dataclass(frozen=True)
class TypeAheadHit:
    text: str  # the rest of the suggestion, from the cursor
    origin: str  # "model" or "prefetch": what made the suggestion


class TypeAheadCache:
    """Suggestions by place and by the text left of the cursor on its line."""

    def __init__(self, places: int) -> None:
        self._places: OrderedDict[PlaceKey, dict[str, tuple[str, str]]] = OrderedDict()
        self._size = max(1, places)

    def put(self, key: PlaceKey, left: str, text: str, origin: str = "model") -> None:
        entries = self._places.setdefault(key, {})
        self._places.move_to_end(key)
        entries[left] = (text, origin)
        if len(entries) > 128:
            entries.pop(next(iter(entries)))
        if len(self._places) > self._size:
            self._places.popitem(last=False)

    def put_suggestion(
        self, uri: str, cursor: CursorContext, text: str, origin: str = "model"
    ) -> None:
        """`text` suggested at `cursor`, also kept for after each of its line breaks.

        A user who types the suggested lines presses Enter: the next line's request
        then comes from a new place (the typed line is above it), where the rest of
        the suggestion still applies.
        """
        key = place_key(uri, cursor)
        left = cursor.line_prefix
        self.put(key, left, text, origin)
        lines = text.split("\n")
        if len(lines) < 2:
            return
        above = [*cursor.above[-_KEY_LINES_ABOVE:], left + lines[0]]
        right_below = key[2]
        for i in range(1, len(lines)):
            rest = "\n".join(lines[i:])
            if rest.strip():
                near = _place(uri, above, "", "")[1]
                self.put((uri, near, right_below), "", rest, origin)
            above.append(lines[i])

    def get(self, key: PlaceKey, left: str) -> TypeAheadHit | None:
        """The rest of a cached suggestion the user has been typing, if any."""
        entries = self._places.get(key)
        if not entries:
            return None
        if left in entries:
            text, origin = entries[left]
            return TypeAheadHit(text, origin)
        best: tuple[int, TypeAheadHit] | None = None
        for old_left, (text, origin) in entries.items():
            if len(old_left) < len(left) and left.startswith(old_left):
                typed = left[len(old_left) :]
                rest = text[len(typed) :]
                if (
                    text.startswith(typed)
                    and rest.strip()
                    and (best is None or len(old_left) > best[0])
                ):
                    best = (len(old_left), TypeAheadHit(rest, origin))
        return best[1] if best else None
