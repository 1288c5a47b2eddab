"""single_line: in single-line mode, cut at the first newline."""

from __future__ import annotations

from exlsp.completion.postprocess.context import FilterContext


def single_line(text: str, ctx: FilterContext) -> str:
    """In single-line mode, cut at the first newline."""
    if ctx.multiline:
        return text
    newline = text.find("\n")
    return text if newline < 0 else text[:newline]
