"""End to end over stdio: a real LSP client, `exlsp serve`, the trained tiny model."""

from __future__ import annotations

import asyncio
import random
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_lsp
from lsprotocol import types
from pygls.exceptions import JsonRpcException
from pytest_lsp import ClientServerConfig, LanguageClient

pytestmark = pytest.mark.e2e

SERVER = [sys.executable, "-m", "exlsp.server", "serve"]

# Non-ASCII before the cursor: 'é' is 2 UTF-8 bytes / 1 UTF-16 unit, '😀' 4 bytes / 2 units.
SOURCE = (
    "import math\n"
    "\n"
    "\n"
    "def greet(name):\n"
    '    """Say héllo 😀 to someone."""\n'
    '    message = "héllo 😀 " + name\n'
    "    return message\n"
    "\n"
    "\n"
    "def area(radius):\n"
    "    \n"
)


def units(text: str, encoding: str) -> int:
    if encoding == "utf-8":
        return len(text.encode("utf-8"))
    if encoding == "utf-16":
        return len(text.encode("utf-16-le")) // 2
    return len(text)


def capabilities(encoding: str) -> types.ClientCapabilities:
    return types.ClientCapabilities(
        general=types.GeneralClientCapabilities(position_encodings=[encoding]),
        text_document=types.TextDocumentClientCapabilities(
            inline_completion=types.InlineCompletionClientCapabilities(),
            completion=types.CompletionClientCapabilities(),
            synchronization=types.TextDocumentSyncClientCapabilities(),
        ),
        workspace=types.WorkspaceClientCapabilities(configuration=False),
    )


def plain(value: Any) -> Any:
    """JSON objects arrive as named tuples on the client side: back to dicts."""
    if hasattr(value, "_asdict"):
        return {k: plain(v) for k, v in value._asdict().items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


async def get_stats(client: LanguageClient) -> dict[str, Any]:
    return dict(plain(await client.protocol.send_request_async("exlsp/stats", {})))


async def wait_ready(client: LanguageClient, timeout: float = 120) -> dict[str, Any]:
    limit = time.monotonic() + timeout
    while time.monotonic() < limit:
        stats = await get_stats(client)
        if stats["state"] in ("ready", "error"):
            return dict(stats)
        await asyncio.sleep(0.1)
    raise TimeoutError("model did not load")


def init_options(model: Path, **completion: Any) -> dict[str, Any]:
    return {
        "model": {"path": str(model), "device": "cpu", "threads": 1},
        "completion": {"deadlineMs": 1500, "maxTokens": 24, **completion},
    }


@pytest_lsp.fixture(config=ClientServerConfig(server_command=SERVER), params=["utf-8", "utf-16"])
async def client(lsp_client: LanguageClient, request: pytest.FixtureRequest, trained_model: Path):  # type: ignore[no-untyped-def]
    encoding = request.param
    record_notifications(lsp_client)
    result = await lsp_client.initialize_session(
        types.InitializeParams(
            capabilities=capabilities(encoding),
            initialization_options=init_options(trained_model),
        )
    )
    lsp_client.negotiated = result  # type: ignore[attr-defined]
    lsp_client.encoding = encoding  # type: ignore[attr-defined]
    stats = await wait_ready(lsp_client)
    assert stats["state"] == "ready", stats
    yield
    await lsp_client.shutdown_session()


def record_notifications(client: LanguageClient) -> None:
    client.partials = []  # type: ignore[attr-defined]
    client.statuses = []  # type: ignore[attr-defined]

    @client.feature("exlsp/partialCompletion")
    def partial(params: Any) -> None:
        client.partials.append(plain(params))  # type: ignore[attr-defined]

    @client.feature("exlsp/status")
    def status(params: Any) -> None:
        client.statuses.append(plain(params))  # type: ignore[attr-defined]


def open_doc(
    client: LanguageClient, text: str, uri: str = "file:///work/demo.py", language: str = "python"
) -> str:
    client.text_document_did_open(
        types.DidOpenTextDocumentParams(types.TextDocumentItem(uri, language, 1, text))
    )
    return uri


async def inline(
    client: LanguageClient, uri: str, line: int, character: int, msg_id: str | None = None
) -> types.InlineCompletionList:
    params = types.InlineCompletionParams(
        text_document=types.TextDocumentIdentifier(uri),
        position=types.Position(line, character),
        context=types.InlineCompletionContext(
            trigger_kind=types.InlineCompletionTriggerKind.Automatic
        ),
    )
    if msg_id is None:
        return await client.text_document_inline_completion_async(params)
    return await client.protocol.send_request_async(
        types.TEXT_DOCUMENT_INLINE_COMPLETION, params, msg_id=msg_id
    )


async def send_raw(client: LanguageClient, method: str, params: dict[str, Any]) -> Any:
    """A request sent as given, without the client's own type checks."""
    from concurrent.futures import Future

    from pygls.protocol import JsonRPCRequestMessage

    msg_id = f"raw-{time.monotonic_ns()}"
    future: Future[Any] = Future()
    client.protocol._request_futures[msg_id] = future
    client.protocol._send_data(
        JsonRPCRequestMessage(id=msg_id, method=method, params=params, jsonrpc="2.0")
    )
    return await asyncio.wrap_future(future)


async def test_handshake_and_capabilities(client: LanguageClient) -> None:
    caps = client.negotiated.capabilities  # type: ignore[attr-defined]
    assert caps.inline_completion_provider is not None
    assert caps.completion_provider is not None
    assert caps.position_encoding == client.encoding  # type: ignore[attr-defined]
    sync = caps.text_document_sync
    assert sync.change == types.TextDocumentSyncKind.Incremental
    assert client.negotiated.server_info.name == "exlsp"  # type: ignore[attr-defined]


async def test_inline_completion_with_non_ascii_text(client: LanguageClient) -> None:
    enc = client.encoding  # type: ignore[attr-defined]
    uri = open_doc(client, SOURCE)
    line = 5
    body = SOURCE.split("\n")[line]
    char_index = len('    message = "héllo 😀 "')
    character = units(body[:char_index], enc)
    result = await inline(client, uri, line, character)
    assert isinstance(result, types.InlineCompletionList)
    stats = await get_stats(client)
    # The server saw the cursor exactly where the client put it.
    assert stats["lastRequest"] == {"line": line, "character": char_index}
    for item in result.items:
        assert item.range is not None
        assert item.range.start == item.range.end == types.Position(line, character)
        assert isinstance(item.insert_text, str) and item.insert_text

    # An incremental edit after the non-ASCII text lands where the client means it.
    client.text_document_did_change(
        types.DidChangeTextDocumentParams(
            text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=2),
            content_changes=[
                types.TextDocumentContentChangePartial(
                    range=types.Range(
                        types.Position(line, character), types.Position(line, character)
                    ),
                    text="Z",
                )
            ],
        )
    )
    after = await inline(client, uri, line, character + 1)
    stats = await get_stats(client)
    assert stats["lastRequest"] == {"line": line, "character": char_index + 1}
    assert stats["lastPromptText"]["middle"].endswith('"héllo 😀 "Z')
    # The typed word "Z" is part of each item: its range starts before it.
    for item in after.items:
        assert item.range == types.Range(
            types.Position(line, character), types.Position(line, character + 1)
        )
        assert isinstance(item.insert_text, str) and item.insert_text.startswith("Z")


async def test_the_trained_model_suggests_code(client: LanguageClient) -> None:
    uri = open_doc(client, SOURCE)
    result = await inline(client, uri, 10, 4)
    stats = await get_stats(client)
    assert stats["last"]["source"] == "model"
    assert stats["last"]["generatedTokens"] > 0
    assert result.items and result.items[0].insert_text.strip()
    # The text streamed as partial notifications before the response.
    partials = client.partials  # type: ignore[attr-defined]
    assert partials and partials[-1]["uri"] == uri
    assert result.items[0].insert_text.startswith(partials[0]["text"].rstrip()[:1])
    assert client.statuses[0]["state"] == "loading"  # type: ignore[attr-defined]
    assert any(s["state"] == "ready" for s in client.statuses)  # type: ignore[attr-defined]


async def test_completion_fallback_edit_covers_the_typed_word(client: LanguageClient) -> None:
    enc = client.encoding  # type: ignore[attr-defined]
    text = SOURCE + "    réturn_valüe = ret"
    uri = open_doc(client, text)
    line = text.count("\n")
    body = text.split("\n")[line]
    character = units(body, enc)
    result = await client.text_document_completion_async(
        types.CompletionParams(types.TextDocumentIdentifier(uri), types.Position(line, character))
    )
    assert isinstance(result, types.CompletionList)
    assert result.is_incomplete
    for item in result.items:
        edit = item.text_edit
        assert isinstance(edit, types.TextEdit)
        word_start = units(body[: len(body) - len("ret")], enc)
        assert edit.range.start == types.Position(line, word_start)
        assert edit.range.end == types.Position(line, character)
        assert edit.new_text.startswith("ret")


async def test_cancelled_request_answers_minus_32800(client: LanguageClient) -> None:
    uri = open_doc(client, SOURCE)
    first = asyncio.ensure_future(inline(client, uri, 10, 4, msg_id="first"))
    await asyncio.sleep(0.01)
    client.cancel_request(types.CancelParams(id="first"))
    last = await inline(client, uri, 10, 4, msg_id="last")
    with pytest.raises(JsonRpcException) as err:
        await first
    assert err.value.code == -32800
    assert isinstance(last, types.InlineCompletionList)


async def test_typing_100_keystrokes_with_cancel_previous(client: LanguageClient) -> None:
    uri = open_doc(client, SOURCE)
    line, col = 10, 4
    typed = "r = radius * radius * math.pi\n    return r * 2 if r > 0 else 0  # done!\n    x ="
    typed = (typed * 2)[:100]
    futures: list[tuple[str, asyncio.Future[Any]]] = []
    version = 1
    for i, ch in enumerate(typed):
        version += 1
        client.text_document_did_change(
            types.DidChangeTextDocumentParams(
                text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=version),
                content_changes=[
                    types.TextDocumentContentChangePartial(
                        range=types.Range(types.Position(line, col), types.Position(line, col)),
                        text=ch,
                    )
                ],
            )
        )
        if ch == "\n":
            line, col = line + 1, 0
        else:
            col += 1
        if futures:
            client.cancel_request(types.CancelParams(id=futures[-1][0]))
        msg_id = f"k{i}"
        futures.append((msg_id, asyncio.ensure_future(inline(client, uri, line, col, msg_id))))
        await asyncio.sleep(0.03)  # ~33 keystrokes a second
    outcomes = []
    for _msg_id, fut in futures:
        try:
            outcomes.append(await asyncio.wait_for(fut, 30))
        except JsonRpcException as e:
            outcomes.append(e.code)
    assert len(outcomes) == 100
    assert all(o == -32800 or isinstance(o, types.InlineCompletionList) for o in outcomes)
    assert isinstance(outcomes[-1], types.InlineCompletionList)
    # The server's copy of the document matches what was typed.
    stats = await get_stats(client)
    assert stats["lastRequest"]["line"] == line


async def test_bad_input_is_answered_and_the_server_survives(client: LanguageClient) -> None:
    rng = random.Random(0)
    # Unknown document.
    with pytest.raises(JsonRpcException) as err:
        await inline(client, "file:///nowhere.py", 0, 0)
    assert err.value.code == -32602
    uri = open_doc(client, SOURCE)
    # A line past the end.
    with pytest.raises(JsonRpcException) as err:
        await inline(client, uri, 500, 0)
    assert err.value.code == -32602
    # A character past the end of a line is clamped to the line end (LSP says so).
    assert isinstance(await inline(client, uri, 3, 999), types.InlineCompletionList)
    # Params that do not deserialize.
    with pytest.raises(JsonRpcException) as err:
        await send_raw(
            client, types.TEXT_DOCUMENT_INLINE_COMPLETION, {"textDocument": {"uri": uri}}
        )
    assert err.value.code == -32602
    # A 5 MB document, binary junk and a 1 MB single line.
    big = "".join(f"value_{i} = compute({i}, 'x' * {i % 7})\n" for i in range(140_000))
    assert len(big) > 5_000_000
    junk = bytes(rng.randrange(256) for _ in range(200_000)).decode("latin-1")
    one_line = "x = '" + "a" * 1_000_000 + "'"
    for name, text, (ln, ch) in [
        ("big", big, (70_000, 10)),
        ("junk", junk, (0, 50)),
        ("line", one_line, (0, 900_000)),
    ]:
        doc = open_doc(client, text, uri=f"file:///work/{name}.py")
        t0 = time.monotonic()
        result = await inline(client, doc, ln, ch)
        assert isinstance(result, types.InlineCompletionList)
        assert time.monotonic() - t0 < 20
    # Still answering normally.
    assert isinstance(await inline(client, uri, 10, 4), types.InlineCompletionList)


@pytest_lsp.fixture(config=ClientServerConfig(server_command=SERVER))
async def broken_client(lsp_client: LanguageClient, tmp_path: Path):  # type: ignore[no-untyped-def]
    record_notifications(lsp_client)
    await lsp_client.initialize_session(
        types.InitializeParams(
            capabilities=capabilities("utf-16"),
            initialization_options={
                "model": {"path": str(tmp_path / "missing-model")},
                "completion": {"maxTokens": "lots"},
            },
        )
    )
    yield
    await lsp_client.shutdown_session()


async def test_missing_model_and_bad_setting_do_not_kill_the_server(
    broken_client: LanguageClient,
) -> None:
    stats = await wait_ready(broken_client)
    assert stats["state"] == "error"
    assert "missing-model" in stats["error"]
    uri = open_doc(broken_client, SOURCE)
    result = await inline(broken_client, uri, 10, 4)
    assert not result.items
    shown = [m.message for m in broken_client.messages]
    assert sum("could not be loaded" in m for m in shown) == 1
    assert any("completion.maxTokens" in m for m in shown)
    # Asking again does not pop up the same message again.
    await inline(broken_client, uri, 10, 4)
    assert sum("could not be loaded" in m.message for m in broken_client.messages) == 1
