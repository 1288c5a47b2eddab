"""textDocument/completion: the suggestion as a completion item, for editors without
ghost text (Helix). The item's edit starts at the beginning of the word already
typed, so accepting it replaces that word instead of repeating it.
"""

from __future__ import annotations

from lsprotocol import types

from exlsp.completion.types import CursorContext, Trigger
from exlsp.server.documents import to_units
from exlsp.server.features.inline import word_before
from exlsp.server.lsp import ExlspServer


def _documentation(ls: ExlspServer, language: str, code: str) -> types.MarkupContent | str:
    """The whole suggestion, as Markdown where the client renders it."""
    caps = ls.client_capabilities.text_document
    item = caps.completion.completion_item if caps and caps.completion else None
    formats = (item.documentation_format if item else None) or []
    if types.MarkupKind.Markdown in formats:
        return types.MarkupContent(types.MarkupKind.Markdown, f"```{language}\n{code}\n```")
    return code  # plain text: allowed whatever formats the client lists


def register(server: ExlspServer) -> None:
    @server.feature(types.TEXT_DOCUMENT_COMPLETION, types.CompletionOptions())
    async def completion(ls: ExlspServer, params: types.CompletionParams) -> types.CompletionList:
        view = ls.document_view(params.text_document.uri, params.position)
        invoked = (
            params.context is not None
            and params.context.trigger_kind == types.CompletionTriggerKind.Invoked
        )
        result = await ls.complete(
            view, params.position, Trigger.INVOKED if invoked else Trigger.AUTOMATIC
        )
        if not result.suggestions:
            return types.CompletionList(is_incomplete=True, items=[])
        # The cursor as the engine cut it for this request.
        cursor = result.cursor or CursorContext.at(view)
        left = cursor.left
        word = word_before(left)
        start_units = to_units(cursor.line, len(left) - len(word), ls.encoding)
        start = types.Position(params.position.line, start_units)
        end = types.Position(params.position.line, params.position.character)
        items = []
        for s in result.suggestions:
            first = s.text.split("\n", 1)[0].strip() or s.text.strip()
            items.append(
                types.CompletionItem(
                    label=(word + first)[:80] or first[:80],
                    kind=types.CompletionItemKind.Snippet,
                    detail="exlsp",
                    documentation=_documentation(ls, view.language, left + s.text),
                    filter_text=word + s.text,
                    sort_text="0",
                    preselect=True,
                    insert_text_format=types.InsertTextFormat.PlainText,
                    text_edit=types.TextEdit(range=types.Range(start, end), new_text=word + s.text),
                )
            )
        # Incomplete: the client asks again as the user types.
        return types.CompletionList(is_incomplete=True, items=items)
