"""textDocument/hover: a short explanation of the symbol or definition under the cursor."""

from __future__ import annotations

from collections.abc import Sequence

from lsprotocol import types

from exlsp.completion.assist.assistant import HoverConfig
from exlsp.completion.assist.syntax import Span
from exlsp.server.documents import line_body, to_units
from exlsp.server.lsp import ExlspServer


def hover_config(ls: ExlspServer) -> HoverConfig:
    config = getattr(ls.config, "hover", None)
    return config if isinstance(config, HoverConfig) else HoverConfig()


def lsp_range(lines: Sequence[str], span: Span, encoding: str) -> types.Range:
    """A character span as an LSP range in the negotiated encoding, clamped to the document."""

    def position(line: int, char: int) -> types.Position:
        if line >= len(lines):
            line = len(lines) - 1
            char = len(line_body(lines[line]))
        return types.Position(line, to_units(line_body(lines[line]), char, encoding))

    return types.Range(
        position(span.start_line, span.start_char), position(span.end_line, span.end_char)
    )


def prefers_markdown(ls: ExlspServer) -> bool:
    caps = ls.client_capabilities.text_document
    formats = caps.hover.content_format if caps and caps.hover else None
    if not formats:
        return True  # the spec's default when the client says nothing
    return formats[0] == types.MarkupKind.Markdown


def register(server: ExlspServer) -> None:
    @server.feature(types.TEXT_DOCUMENT_HOVER)
    async def hover(ls: ExlspServer, params: types.HoverParams) -> types.Hover | None:
        config = hover_config(ls)
        if not config.enabled:
            return None
        view = ls.document_view(params.text_document.uri, params.position)
        assistant = ls.assistant
        if assistant is None or ls.secret_document(view.uri):
            return None
        explanation = await assistant.explain(
            view.lines, view.language, view.line, view.character, config
        )
        if explanation is None:
            return None
        markdown = prefers_markdown(ls)
        return types.Hover(
            contents=types.MarkupContent(
                kind=types.MarkupKind.Markdown if markdown else types.MarkupKind.PlainText,
                value=explanation.markdown() if markdown else explanation.plaintext(),
            ),
            range=lsp_range(view.lines, explanation.span, ls.encoding),
        )
