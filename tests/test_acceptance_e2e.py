"""End to end: inline items carry the accept command; accepts land in the local file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import pytest_lsp
from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient

from exlsp.completion.acceptance import load
from tests.test_lsp_e2e import (
    SERVER,
    SOURCE,
    capabilities,
    init_options,
    inline,
    open_doc,
    wait_ready,
)

pytestmark = pytest.mark.e2e

# The server's environment is fixed when the fixture is declared: one directory per run.
STATE = Path(tempfile.mkdtemp(prefix="exlsp-state-"))


@pytest_lsp.fixture(
    config=ClientServerConfig(
        server_command=SERVER, server_env={**os.environ, "EXLSP_STATE_DIR": str(STATE)}
    )
)
async def client(lsp_client: LanguageClient, trained_model: Path):  # type: ignore[no-untyped-def]
    result = await lsp_client.initialize_session(
        types.InitializeParams(
            capabilities=capabilities("utf-16"),
            initialization_options=init_options(trained_model),
        )
    )
    lsp_client.negotiated = result  # type: ignore[attr-defined]
    assert (await wait_ready(lsp_client))["state"] == "ready"
    lsp_client.ended = False  # type: ignore[attr-defined]
    yield  # the test ends the session: the statistics are flushed at shutdown
    if not lsp_client.ended:  # type: ignore[attr-defined]
        await lsp_client.shutdown_session()


async def test_accepts_are_counted_in_the_local_file(client: LanguageClient) -> None:
    caps = client.negotiated.capabilities  # type: ignore[attr-defined]
    assert "exlsp.accepted" in caps.execute_command_provider.commands
    uri = open_doc(client, SOURCE + "    ret")
    line = SOURCE.count("\n")
    items: list[types.InlineCompletionItem] = []
    for character in (7, 4, 0):  # a few places, until the model says something
        items += (await inline(client, uri, line, character)).items
    assert len(items) >= 2
    ids: list[Any] = []
    for item in items:
        assert item.command is not None and item.command.command == "exlsp.accepted"
        assert item.command.arguments and isinstance(item.command.arguments[0], str)
        ids.append(item.command.arguments[0])
    assert len(set(ids)) == len(ids)
    await client.workspace_execute_command_async(
        types.ExecuteCommandParams(command="exlsp.accepted", arguments=[ids[0]])
    )
    client.protocol.notify("exlsp/didPartiallyAccept", {"id": ids[1], "acceptedLength": 2})
    # Bad input is ignored, the server keeps running.
    client.protocol.notify("exlsp/didPartiallyAccept", {"id": 5, "acceptedLength": "x"})
    await client.workspace_execute_command_async(
        types.ExecuteCommandParams(command="exlsp.accepted", arguments=[{"no": "id"}])
    )
    assert (await wait_ready(client))["state"] == "ready"
    client.ended = True  # type: ignore[attr-defined]
    await client.shutdown_session()
    counts = load(STATE / "stats.json")
    [(model, language)] = counts
    assert language == "python"
    got = counts[(model, language)]
    assert got.shown == len(items)
    assert got.accepted == 1
    assert got.partiallyAccepted == 1
    assert got.charsAccepted > 0
