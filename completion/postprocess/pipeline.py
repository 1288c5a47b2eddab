"""Post-processing: raw model output at the cursor -> the suggestion shown as ghost text.

A pipeline of small pure filters ``(text, ctx) -> text``. The same pipeline runs
while the model streams, to stop generation early, so every cutting filter is
*monotone*: it only cuts on evidence that more tokens cannot change (a complete
line, a line whose indentation is already fixed by a non-blank character, a
closing bracket, a newline in single-line mode). A cut decided on a partial
text is then the same cut on every longer text that extends it.

``FilterContext.text_complete`` tells a filter whether the text it gets is the
whole completion (its last line complete) or a streamed prefix; a filter
called on its own sees the default, ``True``. `postprocess` sets it: while
streaming, ``False`` until some filter has cut (what is left after a cut is
settled, so later filters may treat it as whole). The final pass keeps the
streaming pass's cut when there is one, so stopping the generation at the
first cut never changes the suggestion; otherwise it runs the cutting filters
again on the complete text.

Cleanup filters (`FINAL_ONLY`) change text in ways more tokens could undo, so
they run in the final pass only, after every cut.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from exlsp.completion.postprocess.context import FilterContext
from exlsp.completion.postprocess.drop_only_closers import drop_only_closers
from exlsp.completion.postprocess.repetition import repetition
from exlsp.completion.postprocess.scope_end import scope_end
from exlsp.completion.postprocess.single_line import single_line
from exlsp.completion.postprocess.suffix_overlap import suffix_overlap
from exlsp.completion.postprocess.trim_trailing_whitespace import trim_trailing_whitespace
from exlsp.completion.postprocess.unmatched_bracket import unmatched_bracket

FILTERS: tuple[tuple[str, Callable[[str, FilterContext], str]], ...] = (
    ("single_line", single_line),
    ("scope_end", scope_end),
    ("suffix_overlap", suffix_overlap),
    ("unmatched_bracket", unmatched_bracket),
    ("repetition", repetition),
    ("trim_trailing_whitespace", trim_trailing_whitespace),
    ("drop_only_closers", drop_only_closers),
)
# Cleanup that more tokens could undo: the final pass only, after every cut.
FINAL_ONLY = frozenset({"trim_trailing_whitespace", "drop_only_closers"})
_CUTTING_FILTERS = tuple(item for item in FILTERS if item[0] not in FINAL_ONLY)
_CLEANUP_FILTERS = tuple(item for item in FILTERS if item[0] in FINAL_ONLY)


@dataclass(frozen=True)
class Processed:
    text: str
    truncated: bool  # a filter cut text away: while streaming, the generation may stop now
    by: str | None  # name of the first filter that changed the text


def _cut(raw: str, ctx: FilterContext, complete: bool) -> tuple[str, str | None]:
    """Run the cutting filters; `complete`: the last line of `raw` is complete."""
    text = raw
    by: str | None = None
    for name, apply in _CUTTING_FILTERS:
        out = apply(text, ctx.with_text_complete(complete))
        if out != text:
            if by is None:
                by = name
            text = out
            complete = True  # what is left after a cut is settled
    return text, by


def postprocess(raw: str, ctx: FilterContext, *, final: bool = True) -> Processed:
    """Run the pipeline on `raw`.

    ``final=False`` (streaming): only the cutting filters run, treating the
    last line as unfinished; `truncated` is True iff one cut, and then the
    generation may stop: the same cut follows from any longer text.

    ``final=True``: when the streaming pass cuts, its cut stands (so stopping
    early never changes the result); otherwise the cutting filters run again
    on the text as complete, last line included. Then the cleanup filters run.
    `truncated` / `by` report the first filter that changed the text.
    """
    if not raw:  # nothing to filter (the facts about the context are not needed)
        return Processed(text="", truncated=False, by=None)
    text, by = _cut(raw, ctx, complete=False)
    if not final:
        return Processed(text=text, truncated=by is not None, by=by)
    if by is None:
        text, by = _cut(raw, ctx, complete=True)
    done = ctx.with_text_complete(True)
    for name, apply in _CLEANUP_FILTERS:
        out = apply(text, done)
        if out != text:
            if by is None:
                by = name
            text = out
    return Processed(text=text, truncated=by is not None, by=by)
