"""trim_trailing_whitespace: strip trailing blanks and trailing blank lines."""

from __future__ import annotations

from exlsp.completion.postprocess.context import FilterContext


def trim_trailing_whitespace(text: str, ctx: FilterContext) -> str:
    """Strip trailing whitespace of every line and drop trailing blank lines.

    A text of whitespace only becomes "". One exception: when the completion
    starts on a new line (a block body) and the rest of the cursor line starts
    with a closing bracket (``{█}``, ``(█)``), the text ends with a line break
    and the cursor line's indentation, so that closer lands on its own line,
    under the line that opened it, instead of after the last statement.
    """
    lines = text.split("\n")
    trimmed = [line.rstrip() for line in lines]
    while len(trimmed) > 1 and not trimmed[-1]:
        trimmed.pop()
    result = "\n".join(trimmed)
    if not result.strip():
        return ""
    facts = ctx.facts
    if facts.suffix_starts_with_closer and len(trimmed) > 1 and not trimmed[0]:
        result += "\n" + facts.prefix_indent
    return result
