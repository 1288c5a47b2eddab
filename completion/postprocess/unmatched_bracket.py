"""unmatched_bracket: cut before the first closing bracket that matches nothing."""

from __future__ import annotations

from exlsp.completion.postprocess.context import FilterContext, from_line_start, starts_a_repeat
from exlsp.completion.postprocess.scanner import MATCHING_OPENER, OPENERS, code_brackets


def unmatched_bracket(text: str, ctx: FilterContext) -> str:
    """Cut before the first closing bracket that matches nothing.

    Brackets inside simple string literals and comments do not count. A closer
    first matches the completion's own openers, then the openers left unclosed
    in `line_prefix` that `line_suffix` does not already close. The cut may
    move back to drop what the closer ends (see `_unmatched_cut`), and to the
    start of its line when only indentation precedes it.
    """
    facts = ctx.facts
    own: list[str] = []
    outer = list(facts.open_at_cursor)
    state = facts.cursor_state.copy()
    for index, ch in code_brackets(text, facts.syntax, state, ctx.text_complete):
        if ch in OPENERS:
            own.append(ch)
            continue
        wanted = MATCHING_OPENER[ch]
        if own:
            if own[-1] != wanted:
                return text[: _unmatched_cut(text, index, ctx)]
            own.pop()
        elif outer and outer[-1] == wanted:
            outer.pop()
        else:
            return text[: _unmatched_cut(text, index, ctx)]
    return text


def _unmatched_cut(text: str, index: int, ctx: FilterContext) -> int:
    """Where to cut for an unmatched closer at `index`: before it, or before what it ends.

    Before the repeat of the rest of the cursor line (``, 0)`` of ``, 0);``);
    before its whole line when the line so far is how the line below the
    cursor starts (the model is rewriting that line, which `suffix_overlap`
    would drop once complete).
    """
    facts = ctx.facts
    line_start = text.rfind("\n", 0, index) + 1
    if ctx.multiline and facts.next_line is not None and (line_start > 0 or facts.prefix_blank):
        line = (ctx.line_prefix if line_start == 0 else "") + text[line_start : index + 1]
        if facts.next_line.strip().startswith(line.strip()):
            return line_start
    head = facts.suffix_head
    start = index + 1 - len(head)
    if head and text.endswith(head, 0, index + 1) and starts_a_repeat(text, start, head, facts):
        return from_line_start(text, start, ctx)
    return from_line_start(text, index, ctx)
