"""A client that blocks on codeAction/resolve, as Helix does.

Helix sends codeAction/resolve and reads nothing else from the server until
the answer comes (or its timeout passes). The server asks for a progress
token (window/workDoneProgress/create) before it computes the edit, so it
must not wait for that answer without bound. Here the client answers the
create request only when the test ends; the resolve must still be answered
within the refactor's deadline. (clients/helix/scripts/helix-tmux.sh shows
the same in the real Helix.)
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_lsp
from lsprotocol import types
from pygls.exceptions import JsonRpcException
from pygls.protocol import default_converter
from pytest_lsp import ClientServerConfig, LanguageClient
from pytest_lsp.client import DEFAULT_CLIENT_FEATURES

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SOURCE = "import math\n\n\ndef area(radius):\n    return math.pi * radius * radius\n"
URI = "file:///work/shapes.py"
DEADLINE_MS = 3000


def helix_like_capabilities() -> types.ClientCapabilities:
    return types.ClientCapabilities(
        text_document=types.TextDocumentClientCapabilities(
            code_action=types.CodeActionClientCapabilities(
                code_action_literal_support=types.ClientCodeActionLiteralOptions(
                    code_action_kind=types.ClientCodeActionKindOptions(
                        value_set=[types.CodeActionKind.Refactor]
                    )
                ),
                resolve_support=types.ClientCodeActionResolveOptions(properties=["edit"]),
                data_support=True,
            ),
        ),
        window=types.WindowClientCapabilities(work_done_progress=True),
    )


def blocking_client() -> LanguageClient:
    """pytest-lsp's client, except that it answers window/workDoneProgress/create
    only once `client.release` is set."""
    client = LanguageClient(converter_factory=default_converter)
    client.release = asyncio.Event()  # type: ignore[attr-defined]
    client.create_requests = []  # type: ignore[attr-defined]
    features = dict(DEFAULT_CLIENT_FEATURES)
    features.pop(types.WINDOW_WORK_DONE_PROGRESS_CREATE)

    async def create(params: types.WorkDoneProgressCreateParams) -> None:
        client.create_requests.append(params.token)  # type: ignore[attr-defined]
        await client.release.wait()  # type: ignore[attr-defined]

    features[types.WINDOW_WORK_DONE_PROGRESS_CREATE] = create
    for method, handler in features.items():
        client.feature(method)(handler)
    return client


@pytest_lsp.fixture(
    config=ClientServerConfig(
        server_command=[sys.executable, "-m", "exlsp.server", "serve"],
        client_factory=blocking_client,
    )
)
async def client(lsp_client: LanguageClient, trained_model: Path) -> AsyncIterator[None]:
    await lsp_client.initialize_session(
        types.InitializeParams(
            capabilities=helix_like_capabilities(),
            initialization_options={
                "model": {"path": str(trained_model), "device": "cpu", "threads": 1},
                "codeActions": {"deadlineMs": DEADLINE_MS, "maxTokens": 48},
                "index": {"enabled": False},
            },
        )
    )
    limit = time.monotonic() + 180
    while (await lsp_client.protocol.send_request_async("exlsp/stats", {})).state != "ready":
        assert time.monotonic() < limit, "the model did not load"
        await asyncio.sleep(0.2)
    lsp_client.text_document_did_open(
        types.DidOpenTextDocumentParams(types.TextDocumentItem(URI, "python", 1, SOURCE))
    )
    yield
    lsp_client.release.set()  # type: ignore[attr-defined]
    await lsp_client.shutdown_session()


async def test_resolve_does_not_wait_for_the_progress_token(client: LanguageClient) -> None:
    actions = await client.text_document_code_action_async(
        types.CodeActionParams(
            text_document=types.TextDocumentIdentifier(URI),
            range=types.Range(types.Position(3, 0), types.Position(3, 1)),
            context=types.CodeActionContext(diagnostics=[]),
        )
    )
    assert actions
    docstring = next(a for a in actions if a.title == "Add a docstring to area")
    assert isinstance(docstring, types.CodeAction)
    t0 = time.monotonic()
    try:
        resolved = await asyncio.wait_for(client.code_action_resolve_async(docstring), 30)
    except JsonRpcException as e:  # the tiny model's answer may be refused; it is an answer
        assert e.message.startswith("exlsp:"), e.message
    else:
        assert resolved.edit is not None
    elapsed = time.monotonic() - t0
    # The server did ask for a token, and went on without its answer.
    assert client.create_requests  # type: ignore[attr-defined]
    assert elapsed < DEADLINE_MS / 1000 + 5, elapsed
