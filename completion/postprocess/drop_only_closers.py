"""drop_only_closers: drop a completion that only repeats the closers the line has."""

from __future__ import annotations

from exlsp.completion.postprocess.context import FilterContext

_CLOSING_CHARS = frozenset(")]}\"'`;,")


def drop_only_closers(text: str, ctx: FilterContext) -> str:
    """Drop a completion that is empty, blank, or only closers the cursor line already has."""
    body = "".join(text.split())
    if not body:
        return ""
    if all(ch in _CLOSING_CHARS for ch in body) and "".join(ctx.line_suffix.split()).startswith(
        body
    ):
        return ""
    return text
