"""textDocument/codeAction: refactors from the model, offered at once, computed on demand.

Listing runs no model: it names what can be done at the selection. The edit is
computed when the user picks an action: in `codeAction/resolve` when the client
resolves edits, otherwise by the `exlsp.applyRefactor` command, which sends the
edit with `workspace/applyEdit`. Nothing is applied without that choice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Sequence
from typing import Any

from lsprotocol import types
from pygls.exceptions import JsonRpcException

from exlsp.completion.assist.assistant import CodeActionsConfig
from exlsp.completion.assist.edits import RefactorRefused, TextEdit, available_refactors
from exlsp.completion.assist.syntax import Span, parse
from exlsp.server.documents import Document, PositionError
from exlsp.server.features.hover import lsp_range
from exlsp.server.lsp import ExlspServer

log = logging.getLogger(__name__)

COMMAND = "exlsp.applyRefactor"
_KINDS = {False: types.CodeActionKind.RefactorRewrite, True: types.CodeActionKind.RefactorExtract}
# How long a refactor waits for the client to accept its progress token.
PROGRESS_CREATE_TIMEOUT_S = 0.5


def actions_config(ls: ExlspServer) -> CodeActionsConfig:
    config = getattr(ls.config, "codeActions", None)
    return config if isinstance(config, CodeActionsConfig) else CodeActionsConfig()


def _client_resolves_edits(ls: ExlspServer) -> bool:
    caps = ls.client_capabilities.text_document
    action = caps.code_action if caps else None
    support = action.resolve_support if action else None
    return support is not None and "edit" in support.properties


def _wanted(kind: str, only: Sequence[str] | None) -> bool:
    # `only` names kinds or their parents ("refactor" covers "refactor.rewrite").
    return not only or any(kind == o or kind.startswith(o + ".") for o in only)


def _span(doc: Document, r: dict[str, Any] | types.Range, encoding: str) -> Span:
    if isinstance(r, types.Range):
        s, e = (r.start.line, r.start.character), (r.end.line, r.end.character)
    else:
        s = (r["start"]["line"], r["start"]["character"])
        e = (r["end"]["line"], r["end"]["character"])
    try:
        sl, sc = doc.char_position(*s, encoding)
        el, ec = doc.char_position(*e, encoding)
    except PositionError as err:
        raise JsonRpcException(str(err), code=-32602) from None
    return Span(sl, sc, el, ec)


def list_actions(ls: ExlspServer, params: types.CodeActionParams) -> list[types.CodeAction]:
    if not actions_config(ls).enabled:
        return []
    uri = params.text_document.uri
    doc = ls.documents.get(uri)
    if doc is None or ls.secret_document(uri):
        return []
    parsed = parse(doc.lines, doc.language)
    if parsed is None:
        return []
    selection = _span(doc, params.range, ls.encoding)
    resolves = _client_resolves_edits(ls)
    actions = []
    for offer in available_refactors(parsed, selection):
        kind = _KINDS[offer.extract]
        if not _wanted(kind.value, params.context.only):
            continue
        data = {
            "uri": uri,
            "version": doc.version,
            "refactor": offer.refactor,
            "range": {
                "start": {
                    "line": params.range.start.line,
                    "character": params.range.start.character,
                },
                "end": {"line": params.range.end.line, "character": params.range.end.character},
            },
        }
        action = types.CodeAction(title=offer.title, kind=kind, data=data)
        if not resolves:
            action.command = types.Command(title=offer.title, command=COMMAND, arguments=[data])
        actions.append(action)
    return actions


def _as_dict(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    if hasattr(value, "_asdict"):
        return {k: _as_dict(v) for k, v in value._asdict().items()}
    raise JsonRpcException("this code action carries no data; ask for code actions again", -32602)


class _Progress:
    """Work-done progress for one refactor, only where the client supports it."""

    def __init__(self, ls: ExlspServer, title: str) -> None:
        self.ls = ls
        self.title = title
        self.token: str | None = None

    async def begin(self) -> None:
        caps = self.ls.client_capabilities.window
        if caps is None or not caps.work_done_progress:
            return
        token = f"exlsp-refactor-{uuid.uuid4().hex}"
        try:
            # Shielded: cancelling a task that awaits a client request upsets pygls 2.1.
            # Bounded: Helix reads nothing from the server while it waits for
            # codeAction/resolve, so it answers this request only after giving up.
            await asyncio.wait_for(
                asyncio.shield(self.ls.work_done_progress.create_async(token)),
                PROGRESS_CREATE_TIMEOUT_S,
            )
        except Exception as e:
            log.debug("work done progress refused or unanswered: %r", e)
            return
        self.token = token
        self.ls.work_done_progress.begin(
            token, types.WorkDoneProgressBegin(title=self.title, message="generating")
        )

    def report(self, text: str) -> None:
        if self.token is not None:
            lines = text.count("\n") + 1
            self.ls.work_done_progress.report(
                self.token, types.WorkDoneProgressReport(message=f"{lines} lines")
            )

    def end(self, message: str) -> None:
        if self.token is not None:
            with contextlib.suppress(Exception):
                self.ls.work_done_progress.end(
                    self.token, types.WorkDoneProgressEnd(message=message)
                )
            self.token = None


def _workspace_edit(ls: ExlspServer, doc: Document, edit: TextEdit) -> types.WorkspaceEdit:
    text = edit.text
    if doc.lines and doc.lines[0].endswith("\r\n"):
        text = text.replace("\n", "\r\n")
    span = edit.span
    if span.end_line >= len(doc.lines) and text.endswith("\n"):
        text = text[: -len("\r\n" if text.endswith("\r\n") else "\n")]  # clamped to the end
    change = types.TextEdit(range=lsp_range(doc.lines, span, ls.encoding), new_text=text)
    caps = ls.client_capabilities.workspace
    versioned = caps is not None and caps.workspace_edit and caps.workspace_edit.document_changes
    if versioned:
        ident = types.OptionalVersionedTextDocumentIdentifier(uri=doc.uri, version=doc.version)
        return types.WorkspaceEdit(
            document_changes=[types.TextDocumentEdit(text_document=ident, edits=[change])]
        )
    return types.WorkspaceEdit(changes={doc.uri: [change]})


async def compute_edit(ls: ExlspServer, data: dict[str, Any], title: str) -> types.WorkspaceEdit:
    """The edit for one chosen action; a JSON-RPC error with the reason when refused."""
    uri = data.get("uri", "")
    doc = ls.documents.get(uri)
    if doc is None or doc.version != data.get("version"):
        raise JsonRpcException(
            "the document changed since the action was offered; ask for code actions again",
            code=types.LSPErrorCodes.ContentModified,
        )
    if ls.secret_document(uri):
        raise JsonRpcException(
            f"exlsp: {doc.secret}: not sent to a model", code=types.LSPErrorCodes.RequestFailed
        )
    assistant = ls.assistant
    if assistant is None:
        raise JsonRpcException("the model is not ready yet", code=types.LSPErrorCodes.RequestFailed)
    selection = _span(doc, data["range"], ls.encoding)
    lines = list(doc.lines)  # the document may change while the model works
    progress = _Progress(ls, title)
    await progress.begin()
    outcome = "refused"
    try:
        result = await assistant.refactor(
            str(data.get("refactor")),
            lines,
            doc.language,
            selection,
            actions_config(ls),
            progress.report,
        )
        outcome = "done"
    except RefactorRefused as e:
        raise JsonRpcException(f"exlsp: {e}", code=types.LSPErrorCodes.RequestFailed) from None
    except asyncio.CancelledError:
        outcome = "cancelled"
        raise
    finally:
        progress.end(outcome)
    if doc.version != data.get("version"):
        raise JsonRpcException(
            "the document changed while the edit was computed; nothing was changed",
            code=types.LSPErrorCodes.ContentModified,
        )
    return _workspace_edit(ls, doc, result.edit)


def register(server: ExlspServer) -> None:
    @server.feature(
        types.TEXT_DOCUMENT_CODE_ACTION,
        types.CodeActionOptions(
            code_action_kinds=[
                types.CodeActionKind.RefactorRewrite,
                types.CodeActionKind.RefactorExtract,
            ],
            resolve_provider=True,
        ),
    )
    def code_action(ls: ExlspServer, params: types.CodeActionParams) -> list[types.CodeAction]:
        return list_actions(ls, params)

    @server.feature(types.CODE_ACTION_RESOLVE)
    async def resolve(ls: ExlspServer, action: types.CodeAction) -> types.CodeAction:
        action.edit = await compute_edit(ls, _as_dict(action.data), action.title)
        return action

    @server.command(COMMAND)
    async def apply_refactor(ls: ExlspServer, *args: Any) -> bool:
        if not args:
            raise JsonRpcException(f"{COMMAND} needs the action's data", code=-32602)
        data = _as_dict(args[0])
        edit = await compute_edit(ls, data, "exlsp refactor")
        # Shielded: cancelling a task that awaits a client request upsets pygls 2.1.
        result = await asyncio.shield(
            ls.workspace_apply_edit_async(
                types.ApplyWorkspaceEditParams(edit=edit, label="exlsp refactor")
            )
        )
        if not result.applied:
            ls.show_once(
                f"exlsp: the editor did not apply the refactor: {result.failure_reason or ''}",
                types.MessageType.Warning,
            )
        return bool(result.applied)
