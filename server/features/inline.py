"""textDocument/inlineCompletion: ghost text.

Each item replaces the word already typed left of the cursor (LSP 3.18 prefers
replacements over insertions): its range starts where that word starts and its
`insertText` begins with the word. A client that accepts just after a keystroke,
or types through the ghost text, then cannot leave typed characters behind or
repeat them.
"""

from __future__ import annotations

import re

from lsprotocol import types

from exlsp.completion.types import (
    CompletionResult,
    CursorContext,
    DocumentView,
    Suggestion,
    Trigger,
)
from exlsp.server.documents import line_body, to_units
from exlsp.server.features.acceptance import ACCEPTED_COMMAND, acceptance
from exlsp.server.lsp import ExlspServer

_TRIGGERS = {
    types.InlineCompletionTriggerKind.Invoked: Trigger.INVOKED,
    types.InlineCompletionTriggerKind.Automatic: Trigger.AUTOMATIC,
}

_WORD_TAIL = re.compile(r"[\w$]+$")


def word_before(left: str) -> str:
    """The identifier characters at the end of `left` (the cursor line left of the cursor)."""
    m = _WORD_TAIL.search(left)
    return m.group(0) if m else ""


def _cursor_line(view: DocumentView, cursor: CursorContext | None) -> str:
    """The cursor line without its ending: the request's cut where there is one."""
    if cursor is not None:
        return cursor.line
    return line_body(view.lines[view.line]) if view.lines else ""


def typed_word(view: DocumentView, cursor: CursorContext | None = None) -> str:
    """The identifier characters left of the cursor on its line."""
    return word_before(_cursor_line(view, cursor)[: view.character])


def inline_items(
    view: DocumentView,
    position: types.Position,
    suggestions: list[Suggestion],
    encoding: str,
    ids: list[str] | None = None,
    cursor: CursorContext | None = None,
) -> list[types.InlineCompletionItem]:
    """The suggestions as items whose range covers the word typed before the cursor.

    An item with an id (from the acceptance statistics) carries the command that
    reports its acceptance. `cursor`: the request's, as the engine cut it.
    """
    body = _cursor_line(view, cursor)
    word = word_before(body[: view.character])
    start = types.Position(position.line, to_units(body, view.character - len(word), encoding))
    # The end as the client sent it: the cursor, in its own units.
    end = types.Position(position.line, position.character)
    return [
        types.InlineCompletionItem(
            insert_text=word + s.text,
            filter_text=word + s.text,
            range=types.Range(start, end),
            command=types.Command("exlsp: suggestion accepted", ACCEPTED_COMMAND, arguments=[sid])
            if sid
            else None,
        )
        for s, sid in zip(suggestions, ids or [""] * len(suggestions), strict=True)
    ]


def register(server: ExlspServer) -> None:
    @server.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions())
    async def inline_completion(
        ls: ExlspServer, params: types.InlineCompletionParams
    ) -> types.InlineCompletionList:
        view = ls.document_view(params.text_document.uri, params.position)
        trigger = _TRIGGERS.get(params.context.trigger_kind, Trigger.AUTOMATIC)
        result = await ls.complete(view, params.position, trigger)
        ids = _count_shown(ls, view, result)
        return types.InlineCompletionList(
            items=inline_items(
                view, params.position, result.suggestions, ls.encoding, ids, result.cursor
            )
        )


def _count_shown(ls: ExlspServer, view: DocumentView, result: CompletionResult) -> list[str]:
    """Each suggestion counted as shown; its id for the accept command."""
    stats = acceptance(ls)
    service = ls.service
    if stats is None or service is None or not result.suggestions:
        return []
    model = service.backend.info.path if service.backend else ls.config.model.path
    word = len(typed_word(view, result.cursor))
    return [
        stats.shown(model, view.language, word, len(s.text), result.stats.total_ms)
        for s in result.suggestions
    ]
