"""Hover and refactor code actions end to end over stdio with the trained tiny model."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_lsp
from lsprotocol import types
from pygls.exceptions import JsonRpcException
from pytest_lsp import ClientServerConfig, LanguageClient

from exlsp.completion.assist.syntax import parse
from tests.test_lsp_e2e import get_stats, plain

pytestmark = pytest.mark.e2e

SERVER = [sys.executable, "-m", "exlsp.server", "serve"]

SOURCE = (
    "import math\n"
    "\n"
    "\n"
    "def greet(name):\n"
    '    message = "héllo 😀 " + name\n'
    "    return message\n"
    "\n"
    "\n"
    "def area(radius):\n"
    "    squared = radius * radius\n"
    "    return math.pi * squared\n"
    "\n"
    "\n"
    "def total(shapes):\n"
    "    return sum(area(s) for s in shapes)\n"
)
URI = "file:///work/shapes.py"


def capabilities(resolve: bool = True, markdown: bool = True) -> types.ClientCapabilities:
    kinds = [types.MarkupKind.Markdown, types.MarkupKind.PlainText]
    return types.ClientCapabilities(
        general=types.GeneralClientCapabilities(position_encodings=["utf-16"]),
        text_document=types.TextDocumentClientCapabilities(
            inline_completion=types.InlineCompletionClientCapabilities(),
            synchronization=types.TextDocumentSyncClientCapabilities(),
            hover=types.HoverClientCapabilities(content_format=kinds if markdown else kinds[::-1]),
            code_action=types.CodeActionClientCapabilities(
                code_action_literal_support=types.ClientCodeActionLiteralOptions(
                    code_action_kind=types.ClientCodeActionKindOptions(
                        value_set=[types.CodeActionKind.Refactor]
                    )
                ),
                resolve_support=(
                    types.ClientCodeActionResolveOptions(properties=["edit"]) if resolve else None
                ),
                data_support=True,
            ),
        ),
        window=types.WindowClientCapabilities(work_done_progress=True),
        workspace=types.WorkspaceClientCapabilities(configuration=False, apply_edit=True),
    )


async def wait_ready(client: LanguageClient, timeout: float = 120) -> None:
    limit = time.monotonic() + timeout
    while time.monotonic() < limit:
        stats = await client.protocol.send_request_async("exlsp/stats", {})
        if stats.state in ("ready", "error"):
            assert stats.state == "ready", stats
            return
        await asyncio.sleep(0.1)
    raise TimeoutError("model did not load")


async def start(client: LanguageClient, model: Path, **caps: bool) -> None:
    client.applied = []  # type: ignore[attr-defined]

    @client.feature(types.WORKSPACE_APPLY_EDIT)
    def apply_edit(params: types.ApplyWorkspaceEditParams) -> types.ApplyWorkspaceEditResult:
        client.applied.append(params.edit)  # type: ignore[attr-defined]
        return types.ApplyWorkspaceEditResult(applied=True)

    await client.initialize_session(
        types.InitializeParams(
            capabilities=capabilities(**caps),
            initialization_options={
                "model": {"path": str(model), "device": "cpu", "threads": 1},
                "completion": {"deadlineMs": 1500, "maxTokens": 24},
            },
        )
    )
    await wait_ready(client)
    client.text_document_did_open(
        types.DidOpenTextDocumentParams(types.TextDocumentItem(URI, "python", 1, SOURCE))
    )


@pytest_lsp.fixture(config=ClientServerConfig(server_command=SERVER))
async def client(lsp_client: LanguageClient, trained_model: Path):  # type: ignore[no-untyped-def]
    await start(lsp_client, trained_model)
    yield
    await lsp_client.shutdown_session()


@pytest_lsp.fixture(config=ClientServerConfig(server_command=SERVER))
async def plain_client(lsp_client: LanguageClient, trained_model: Path):  # type: ignore[no-untyped-def]
    """A client that prefers plain text and cannot resolve code action edits."""
    await start(lsp_client, trained_model, resolve=False, markdown=False)
    yield
    await lsp_client.shutdown_session()


def hover_params(line: int, character: int) -> types.HoverParams:
    return types.HoverParams(types.TextDocumentIdentifier(URI), types.Position(line, character))


def action_params(start: tuple[int, int], end: tuple[int, int]) -> types.CodeActionParams:
    return types.CodeActionParams(
        text_document=types.TextDocumentIdentifier(URI),
        range=types.Range(types.Position(*start), types.Position(*end)),
        context=types.CodeActionContext(diagnostics=[]),
    )


def apply_text_edits(text: str, edits: list[types.TextEdit]) -> str:
    """Apply edits (UTF-16 positions, as negotiated) to `text`."""
    lines = text.split("\n")

    def offset(pos: types.Position) -> int:
        body = lines[pos.line].encode("utf-16-le")[: pos.character * 2].decode("utf-16-le")
        return sum(len(line) + 1 for line in lines[: pos.line]) + len(body)

    for edit in sorted(edits, key=lambda e: (e.range.start.line, e.range.start.character))[::-1]:
        text = text[: offset(edit.range.start)] + edit.new_text + text[offset(edit.range.end) :]
    return text


def edits_of(edit: types.WorkspaceEdit) -> list[types.TextEdit]:
    if edit.document_changes:
        out: list[types.TextEdit] = []
        for change in edit.document_changes:
            assert isinstance(change, types.TextDocumentEdit)
            assert change.text_document.uri == URI
            out += [e for e in change.edits if isinstance(e, types.TextEdit)]
        return out
    assert edit.changes is not None
    return list(edit.changes[URI])


def assert_valid_range(r: types.Range) -> None:
    lines = SOURCE.split("\n")
    for p in (r.start, r.end):
        assert 0 <= p.line < len(lines)
        assert 0 <= p.character <= len(lines[p.line].encode("utf-16-le")) // 2
    assert (r.start.line, r.start.character) <= (r.end.line, r.end.character)


async def assist_jobs(client: LanguageClient) -> int:
    """Generation jobs the hover and code action model has run so far."""
    return int((await get_stats(client))["assist"]["jobs"])


async def test_hover_explains_within_the_deadline(client: LanguageClient) -> None:
    hover = await client.text_document_hover_async(hover_params(14, 16))  # `area` in total()
    # The tiny model writes a few words within the deadline (greedy: the same ones
    # every run); an answer of nothing would pass every check below unseen.
    assert hover is not None
    assert isinstance(hover.contents, types.MarkupContent)
    assert hover.contents.kind == types.MarkupKind.Markdown
    assert hover.contents.value.startswith("**area (function)**")
    assert hover.range == types.Range(types.Position(14, 15), types.Position(14, 19))
    # Asked again: answered from the cache (no new model job), the same.
    jobs = await assist_jobs(client)
    again = await client.text_document_hover_async(hover_params(8, 6))
    assert again is not None and again.contents == hover.contents
    # Outside any definition: nothing, without asking the model.
    assert await client.text_document_hover_async(hover_params(1, 0)) is None
    assert await assist_jobs(client) == jobs


async def test_hover_respects_plaintext(plain_client: LanguageClient) -> None:
    hover = await plain_client.text_document_hover_async(hover_params(4, 6))
    assert hover is not None  # see test_hover_explains_within_the_deadline
    assert isinstance(hover.contents, types.MarkupContent)
    assert hover.contents.kind == types.MarkupKind.PlainText
    assert hover.contents.value.startswith("greet (function)")
    assert hover.range is not None
    assert_valid_range(hover.range)


async def test_code_actions_are_listed_at_once_with_their_kinds(client: LanguageClient) -> None:
    jobs = await assist_jobs(client)
    actions = await client.text_document_code_action_async(action_params((9, 4), (10, 12)))
    assert await assist_jobs(client) == jobs  # listed without a model call
    assert actions is not None
    by_kind = {a.kind for a in actions if isinstance(a, types.CodeAction)}
    assert by_kind == {types.CodeActionKind.RefactorRewrite, types.CodeActionKind.RefactorExtract}
    titles = [a.title for a in actions]
    assert "Add a docstring to area" in titles
    for a in actions:
        assert isinstance(a, types.CodeAction)
        assert a.edit is None and a.command is None  # computed on resolve
    only = types.CodeActionParams(
        text_document=types.TextDocumentIdentifier(URI),
        range=types.Range(types.Position(9, 4), types.Position(10, 12)),
        context=types.CodeActionContext(
            diagnostics=[], only=[types.CodeActionKind.RefactorExtract]
        ),
    )
    extract = await client.text_document_code_action_async(only)
    assert extract is not None and [a.kind for a in extract] == [  # type: ignore[union-attr]
        types.CodeActionKind.RefactorExtract
    ]
    assert not await client.text_document_code_action_async(action_params((0, 0), (0, 3)))


async def test_resolve_gives_a_parsing_edit_or_a_clear_refusal(client: LanguageClient) -> None:
    actions = await client.text_document_code_action_async(action_params((9, 4), (9, 4)))
    assert actions is not None
    chosen = {a.title: a for a in actions if isinstance(a, types.CodeAction)}
    docstring = chosen["Add a docstring to area"]
    try:
        resolved = await client.code_action_resolve_async(docstring)
    except JsonRpcException as e:
        assert e.message.startswith("exlsp: the model"), e.message
    else:
        assert resolved.edit is not None
        new_text = apply_text_edits(SOURCE, edits_of(resolved.edit))
        assert '"""' in new_text
        doc = parse([line + "\n" for line in new_text.split("\n")], "python")
        assert doc is not None and doc.error_spans() == []
        assert new_text.replace(" ", "").count("defarea(radius):") == 1
    # The tiny model is a base model: rewrites need a chat template, and say so.
    with pytest.raises(JsonRpcException) as err:
        await client.code_action_resolve_async(chosen["Simplify area"])
    assert "instruction-tuned" in err.value.message


async def raw_request(client: LanguageClient, method: str, params: Any) -> Any:
    """The raw JSON answer (the client's typed parsing takes a CodeAction with a
    command for a bare Command)."""
    from concurrent.futures import Future

    from pygls.protocol import JsonRPCRequestMessage

    msg_id = f"raw-{time.monotonic_ns()}"
    future: Future[Any] = Future()
    client.protocol._request_futures[msg_id] = future
    client.protocol._send_data(
        JsonRPCRequestMessage(id=msg_id, method=method, params=params, jsonrpc="2.0")
    )
    return plain(await asyncio.wrap_future(future))


async def test_command_path_applies_through_the_editor(plain_client: LanguageClient) -> None:
    actions = await raw_request(
        plain_client, types.TEXT_DOCUMENT_CODE_ACTION, action_params((4, 4), (4, 4))
    )
    docstring = next(a for a in actions if a["title"] == "Add a docstring to greet")
    assert docstring["kind"] == "refactor.rewrite" and "edit" not in docstring
    command = docstring["command"]
    assert command["command"] == "exlsp.applyRefactor"
    try:
        applied = await plain_client.workspace_execute_command_async(
            types.ExecuteCommandParams(command=command["command"], arguments=command["arguments"])
        )
    except JsonRpcException as e:
        assert e.message.startswith("exlsp: the model"), e.message
        assert plain_client.applied == []  # type: ignore[attr-defined]
    else:
        assert applied is True
        [edit] = plain_client.applied  # type: ignore[attr-defined]
        new_text = apply_text_edits(SOURCE, edits_of(edit))
        doc = parse([line + "\n" for line in new_text.split("\n")], "python")
        assert doc is not None and doc.error_spans() == []
    # Progress was reported (the client supports it) and ended.
    reports = list(plain_client.progress_reports.values())
    assert reports and isinstance(reports[-1][-1], types.WorkDoneProgressEnd)


async def test_stale_action_is_refused(client: LanguageClient) -> None:
    actions = await client.text_document_code_action_async(action_params((9, 4), (9, 4)))
    assert actions is not None
    client.text_document_did_change(
        types.DidChangeTextDocumentParams(
            text_document=types.VersionedTextDocumentIdentifier(uri=URI, version=2),
            content_changes=[types.TextDocumentContentChangeWholeDocument(text=SOURCE + "\n")],
        )
    )
    with pytest.raises(JsonRpcException) as err:
        await client.code_action_resolve_async(actions[0])  # type: ignore[arg-type]
    assert err.value.code == types.LSPErrorCodes.ContentModified


async def test_cancelled_hover_answers_minus_32800(client: LanguageClient) -> None:
    first = asyncio.ensure_future(
        client.protocol.send_request_async(
            types.TEXT_DOCUMENT_HOVER, hover_params(9, 6), msg_id="hover-1"
        )
    )
    await asyncio.sleep(0.05)
    client.cancel_request(types.CancelParams(id="hover-1"))
    with pytest.raises(JsonRpcException) as err:
        await asyncio.wait_for(first, 10)
    assert err.value.code == -32800
    # The server goes on answering.
    assert await client.text_document_hover_async(hover_params(1, 0)) is None


async def test_completion_during_a_hover_is_answered_first(client: LanguageClient) -> None:
    inline = types.InlineCompletionParams(
        text_document=types.TextDocumentIdentifier(URI),
        position=types.Position(10, 4),
        context=types.InlineCompletionContext(
            trigger_kind=types.InlineCompletionTriggerKind.Automatic
        ),
    )
    # Different definitions, so no hover comes from the cache.
    for line, char in ((4, 6), (9, 6), (14, 6)):
        done: list[str] = []
        hover = asyncio.ensure_future(client.text_document_hover_async(hover_params(line, char)))
        hover.add_done_callback(lambda _, done=done: done.append("hover"))
        await asyncio.sleep(0.1)  # the hover's generation is under way
        if hover.done():
            continue  # finished too soon to overlap: try a longer one
        completion = asyncio.ensure_future(client.text_document_inline_completion_async(inline))
        completion.add_done_callback(lambda _, done=done: done.append("completion"))
        result = await asyncio.wait_for(completion, 10)
        assert isinstance(result, types.InlineCompletionList)
        answer: Any = await asyncio.wait_for(hover, 10)
        # The hover job yielded to the completion and resumed after it.
        assert done == ["completion", "hover"]
        assert answer is None or isinstance(answer.contents, types.MarkupContent)
        return
    pytest.fail("every hover finished within 100 ms: nothing to preempt")
