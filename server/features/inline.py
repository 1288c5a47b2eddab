"""textDocument/inlineCompletion: ghost text."""

from __future__ import annotations

from lsprotocol import types

from exlsp.completion.types import Trigger
from exlsp.server.lsp import ExlspServer

_TRIGGERS = {
    types.InlineCompletionTriggerKind.Invoked: Trigger.INVOKED,
    types.InlineCompletionTriggerKind.Automatic: Trigger.AUTOMATIC,
}


def register(server: ExlspServer) -> None:
    @server.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions())
    async def inline_completion(
        ls: ExlspServer, params: types.InlineCompletionParams
    ) -> types.InlineCompletionList:
        view = ls.document_view(params.text_document.uri, params.position)
        trigger = _TRIGGERS.get(params.context.trigger_kind, Trigger.AUTOMATIC)
        result = await ls.complete(view, params.position, trigger)
        # The position as the client sent it: the suggestion is inserted at the cursor.
        at = types.Position(params.position.line, params.position.character)
        return types.InlineCompletionList(
            items=[
                types.InlineCompletionItem(insert_text=s.text, range=types.Range(at, at))
                for s in result.suggestions
            ]
        )
