"""Text synchronization: open, incremental change, close."""

from __future__ import annotations

import logging

from lsprotocol import types

from exlsp.server.lsp import ExlspServer

log = logging.getLogger(__name__)


def register(server: ExlspServer) -> None:
    @server.feature(types.TEXT_DOCUMENT_DID_OPEN)
    def did_open(ls: ExlspServer, params: types.DidOpenTextDocumentParams) -> None:
        d = params.text_document
        ls.documents.open(d.uri, d.language_id, d.version, d.text)

    @server.feature(types.TEXT_DOCUMENT_DID_CHANGE)
    def did_change(ls: ExlspServer, params: types.DidChangeTextDocumentParams) -> None:
        doc = ls.documents.get(params.text_document.uri)
        if doc is None:
            log.warning("change to a document that is not open: %s", params.text_document.uri)
            return
        edited: tuple[int, int] | None = None  # first and last line touched
        for change in params.content_changes:
            if isinstance(change, types.TextDocumentContentChangePartial):
                r = change.range
                doc.apply_change(
                    (r.start.line, r.start.character),
                    (r.end.line, r.end.character),
                    change.text,
                    ls.encoding,
                )
                first = min(r.start.line, len(doc.lines) - 1)
                last = min(first + change.text.count("\n"), len(doc.lines) - 1)
                edited = (
                    (first, last)
                    if edited is None
                    else (min(edited[0], first), max(edited[1], last))
                )
            else:
                doc.apply_change(None, None, change.text, ls.encoding)
                edited = None
                doc.check_secret()
        doc.version = params.text_document.version
        if edited is not None:
            doc.check_secret(*edited)
        if ls.index is not None and edited is not None and doc.secret is None:
            # Recently edited code of this document is context for completions in others.
            lo, hi = max(0, edited[0] - 3), min(len(doc.lines), edited[1] + 4)
            ls.index.note_edit(doc.uri, "".join(doc.lines[lo:hi]), edited[0])

    @server.feature(types.TEXT_DOCUMENT_DID_CLOSE)
    def did_close(ls: ExlspServer, params: types.DidCloseTextDocumentParams) -> None:
        uri = params.text_document.uri
        ls.documents.close(uri)
        if ls.index is not None:
            ls.index.forget_document(uri)
        if ls.service is not None and ls.service.engine is not None:
            ls.service.engine.forget(uri)
