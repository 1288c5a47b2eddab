"""suffix_overlap: drop text that repeats what follows the cursor."""

from __future__ import annotations

from exlsp.completion.postprocess.context import FilterContext, from_line_start, starts_a_repeat


def _repeat_of_lines_below(text: str, ctx: FilterContext) -> int | None:
    """Where `text` starts repeating the code below the cursor, if it does.

    A complete generated line equal to the first non-blank line below (with its
    indentation) starts a repeat when the next non-blank generated line equals
    the second non-blank line below, or when nothing follows it in a complete
    text, or when there is no second line below. One equal line alone is not
    enough: a statement often occurs twice in a row of code (``x.append(c)`` in
    two branches). While the next line is unfinished the answer waits.
    """
    facts = ctx.facts
    below = facts.lines_below
    spans: list[tuple[int, int, bool]] = []  # (start, end, complete) of each line
    start = 0
    while True:
        newline = text.find("\n", start)
        if newline < 0:
            spans.append((start, len(text), ctx.text_complete))
            break
        spans.append((start, newline, True))
        start = newline + 1
    for i, (start, end, complete) in enumerate(spans):
        if not complete:
            return None
        line = text[start:end]
        if i == 0:
            if not facts.prefix_blank:
                continue
            line = ctx.line_prefix + line
        if line.rstrip() != below[0]:
            continue
        if len(below) < 2:
            return start
        for next_start, next_end, next_complete in spans[i + 1 :]:
            following = text[next_start:next_end]
            if not following.strip() and next_complete:
                continue  # blank lines never decide
            if not next_complete:
                return None
            if following.rstrip() == below[1]:
                return start
            break
        else:
            return start
    return None


def suffix_overlap(text: str, ctx: FilterContext) -> str:
    """Drop text that repeats what follows the cursor.

    (b) In multi-line mode, cut where the generated lines start repeating the
    code below the cursor: a complete line equal, indentation included, to the
    first non-blank line below, confirmed by the next one (see
    `_repeat_of_lines_below`). The first generated line counts when the cursor
    line was blank.
    (a) Once the text is complete: if its last non-blank line ends with the
    stripped rest of the cursor line, cut that repetition, so accepting does not
    duplicate it (the end of the first line, in single-line mode) -- provided
    the text before it leaves brackets and strings as it found them (in
    ``print(█)``, the ``)`` of ``len(x)`` is not a repeat), and a suffix that
    starts with a word character starts a word there.
    """
    facts = ctx.facts
    if ctx.multiline and facts.next_line is not None:
        cut = _repeat_of_lines_below(text, ctx)
        if cut is not None:
            return text[:cut]

    suffix = facts.suffix_text
    if ctx.text_complete and suffix:
        body = text.rstrip()
        cut = len(body) - len(suffix)
        if (
            body.endswith(suffix)
            and cut >= body.rfind("\n") + 1
            and starts_a_repeat(body, cut, suffix, facts)
        ):
            return text[: from_line_start(body, cut, ctx)]
    return text
