"""repetition: stop on degenerate loops, keeping the first occurrence."""

from __future__ import annotations

from exlsp.completion.postprocess.context import FilterContext

# Within a line: a unit of at least _MIN_UNIT characters repeated _MIN_REPEATS times.
_MIN_UNIT = 3
_MAX_UNIT = 64
_MIN_REPEATS = 4
_MAX_BLOCK_LINES = 4


def _first_line_loop(text: str, lines: list[str], ctx: FilterContext) -> tuple[int, int] | None:
    """The earliest complete line that ends a repeated line or block: (evidence end, cut)."""
    count = len(lines) if ctx.text_complete else len(lines) - 1
    if count < 2:
        return None
    keys = [line.rstrip() for line in lines[:count]]
    keys[0] = (ctx.line_prefix + lines[0]).rstrip()
    for i in range(1, count):
        key = keys[i]
        for size in range(1, min(_MAX_BLOCK_LINES, (i + 1) // 2) + 1):
            if key != keys[i - size]:
                continue
            block = keys[i - size + 1 : i + 1]
            if any(block) and block == keys[i - 2 * size + 1 : i - size + 1]:
                first = i - size
                first_end = sum(map(len, lines[: first + 1])) + first
                evidence_end = first_end + sum(map(len, lines[first + 1 : i + 1])) + size
                if i < len(lines) - 1:
                    evidence_end += 1  # the newline that completes line i
                return evidence_end, first_end
    return None


def _first_inline_loop(text: str, longest_line: int) -> tuple[int, int] | None:
    """The earliest end of a unit repeated `_MIN_REPEATS` times in one line: (end, cut).

    For each unit length k, the run u^4 is a stretch of 3k characters equal to
    the characters k further on. Comparing the text with itself shifted by k
    is done on big integers (one XOR per k) and the stretch found with
    ``bytes.find``, which keeps this in C. Newlines are encoded differently in
    the two copies, so no stretch crosses a line.
    """
    max_unit = min(_MAX_UNIT, longest_line // _MIN_REPEATS)
    if max_unit < _MIN_UNIT:
        return None
    encoding, width = ("latin-1", 1) if text.isascii() else ("utf-32-be", 4)
    left = int.from_bytes(text.replace("\n", "\x01").encode(encoding), "big")
    right_bytes = text.replace("\n", "\x02").encode(encoding)
    right = int.from_bytes(right_bytes, "big")
    size = len(right_bytes)
    best: tuple[int, int] | None = None
    for unit in range(_MIN_UNIT, max_unit + 1):
        if best is not None and _MIN_REPEATS * unit >= best[0]:
            break
        equal = ((left >> (8 * width * unit)) ^ right).to_bytes(size, "big")
        stretch = b"\0" * ((_MIN_REPEATS - 1) * unit * width)
        search_from = unit * width
        while True:
            found = equal.find(stretch, search_from)
            if found < 0:
                break
            if found % width:
                search_from = found + 1
                continue
            start = found // width - unit
            end = start + _MIN_REPEATS * unit
            if best is not None and end >= best[0]:
                break
            if len(set(text[start : start + unit]) - {" ", "\t"}) < 2:
                # Rulers and padding ("-----", "    ") are not loops; every run
                # inside this stretch is a rotation of the same unit: skip it.
                rest = equal[found:]
                search_from = found + len(rest) - len(rest.lstrip(b"\0"))
                search_from += -search_from % width
                continue
            best = (end, start + unit)
            break
    return best


def repetition(text: str, ctx: FilterContext) -> str:
    """Stop on degenerate loops, keeping the first occurrence.

    The same non-blank line twice in a row, a block of 2-4 lines repeated right
    after itself (complete lines only), or within a line a unit of at least 3
    characters (not a ruler of one character) repeated 4 times. Of all loops,
    the one whose evidence ends first decides, so a longer text cuts the same.
    """
    lines = text.split("\n")
    line_loop = _first_line_loop(text, lines, ctx)
    limit = len(text) if line_loop is None else line_loop[0]
    inline_loop = _first_inline_loop(text[:limit], max(map(len, lines)))
    loop = line_loop
    if inline_loop is not None and (loop is None or inline_loop[0] <= loop[0]):
        loop = inline_loop
    return text if loop is None else text[: loop[1]]
