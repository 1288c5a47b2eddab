"""The index through the server: a completion's prompt holds a snippet retrieved from
another file that defines the identifier used at the cursor; progress is reported."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_lsp
from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient

from tests.test_lsp_e2e import get_stats, inline, open_doc, record_notifications

pytestmark = pytest.mark.e2e

UTIL = '''"""Geometry helpers."""


def frobnicate_widget(width, height, margin=4):
    """Scale a widget by its margin."""
    return (width + 2 * margin) * (height + 2 * margin)


class Gizmo:
    def spin(self, turns):
        return turns * 360
'''

MAIN = "from util import frobnicate_widget\n\n\ndef layout(w, h):\n    return frobnicate_w"

SECRET = "API_TOKEN=never-index-this-4411\n"


@pytest_lsp.fixture(
    config=ClientServerConfig(server_command=[sys.executable, "-m", "exlsp.server", "serve"])
)
async def client(lsp_client: LanguageClient, tmp_path: Path, trained_model: Path):  # type: ignore[no-untyped-def]
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "util.py").write_text(UTIL)
    (ws / "main.py").write_text(MAIN)
    (ws / ".env").write_text(SECRET)
    record_notifications(lsp_client)
    lsp_client.progress_events = []  # type: ignore[attr-defined]
    await lsp_client.initialize_session(
        types.InitializeParams(
            capabilities=types.ClientCapabilities(
                text_document=types.TextDocumentClientCapabilities(
                    inline_completion=types.InlineCompletionClientCapabilities()
                ),
                window=types.WindowClientCapabilities(work_done_progress=True),
            ),
            root_uri=ws.as_uri(),
            initialization_options={
                "model": {"path": str(trained_model), "device": "cpu", "threads": 1},
                "completion": {"deadlineMs": 1500, "maxTokens": 16},
                "index": {
                    "embeddingModel": "none",
                    "databaseDir": str(tmp_path / "db"),
                    "debounceMs": 50,
                },
            },
        )
    )
    lsp_client.workspace_dir = ws  # type: ignore[attr-defined]
    yield
    await lsp_client.shutdown_session()


async def wait_indexed(client: LanguageClient, timeout: float = 60) -> dict[str, Any]:
    limit = time.monotonic() + timeout
    while time.monotonic() < limit:
        stats = await get_stats(client)
        index = stats.get("index")
        if stats["state"] == "ready" and index and index["state"] == "idle" and index["chunks"]:
            return stats
        await asyncio.sleep(0.2)
    raise TimeoutError(f"index not ready: {await get_stats(client)}")


async def test_prompt_holds_the_definition_from_another_file(client: LanguageClient) -> None:
    stats = await wait_indexed(client)
    assert stats["index"]["files"] == 2  # util.py and main.py; .env is never read
    ws = client.workspace_dir  # type: ignore[attr-defined]
    uri = open_doc(client, MAIN, uri=(ws / "main.py").as_uri())
    line = MAIN.count("\n")
    await inline(client, uri, line, len(MAIN.split("\n")[-1]))
    stats = await get_stats(client)
    prompt = stats["lastPromptText"]["full"]
    assert "def frobnicate_widget(width, height, margin=4):" in prompt
    assert "<|file_sep|>util.py\n" in prompt
    # The current file is named as the snippets are: relative to the workspace.
    assert "<|file_sep|>main.py\n" in prompt and str(ws) not in prompt
    assert "never-index-this" not in prompt
    assert stats["last"]["snippetTokens"] > 0
    # Indexing reported $/progress to the client (begin ... end).
    kinds = [p.kind for reports in client.progress_reports.values() for p in reports]
    assert "begin" in kinds and "end" in kinds


@pytest_lsp.fixture(
    config=ClientServerConfig(server_command=[sys.executable, "-m", "exlsp.server", "serve"])
)
async def watching_client(lsp_client: LanguageClient, tmp_path: Path, trained_model: Path):  # type: ignore[no-untyped-def]
    """A client that watches files itself (dynamic registration of didChangeWatchedFiles)."""
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "util.py").write_text(UTIL)
    lsp_client.registrations = []  # type: ignore[attr-defined]

    @lsp_client.feature(types.CLIENT_REGISTER_CAPABILITY)
    def register(params: types.RegistrationParams) -> None:
        lsp_client.registrations.extend(params.registrations)  # type: ignore[attr-defined]

    await lsp_client.initialize_session(
        types.InitializeParams(
            capabilities=types.ClientCapabilities(
                workspace=types.WorkspaceClientCapabilities(
                    did_change_watched_files=types.DidChangeWatchedFilesClientCapabilities(
                        dynamic_registration=True
                    )
                ),
            ),
            root_uri=ws.as_uri(),
            initialization_options={
                "model": {"path": str(trained_model), "device": "cpu", "threads": 1},
                "index": {
                    "embeddingModel": "none",
                    "databaseDir": str(tmp_path / "db"),
                    "debounceMs": 50,
                },
            },
        )
    )
    lsp_client.workspace_dir = ws  # type: ignore[attr-defined]
    yield
    await lsp_client.shutdown_session()


async def test_file_events_come_from_the_client_when_it_watches(
    watching_client: LanguageClient,
) -> None:
    client = watching_client
    stats = await wait_indexed(client)
    assert stats["index"]["files"] == 1
    methods = [r.method for r in client.registrations]  # type: ignore[attr-defined]
    assert methods == [types.WORKSPACE_DID_CHANGE_WATCHED_FILES]
    # The server watches nothing itself: a new file is seen only once the client says so.
    ws = client.workspace_dir  # type: ignore[attr-defined]
    (ws / "added.py").write_text("def freshly_added_helper():\n    return 1\n")
    await asyncio.sleep(1.5)
    assert (await get_stats(client))["index"]["files"] == 1
    client.workspace_did_change_watched_files(
        types.DidChangeWatchedFilesParams(
            changes=[
                types.FileEvent(uri=(ws / "added.py").as_uri(), type=types.FileChangeType.Created)
            ]
        )
    )
    limit = time.monotonic() + 30
    while (await get_stats(client))["index"]["files"] != 2:
        assert time.monotonic() < limit, await get_stats(client)
        await asyncio.sleep(0.1)


@pytest_lsp.fixture(
    config=ClientServerConfig(server_command=[sys.executable, "-m", "exlsp.server", "serve"])
)
async def embedding_client(lsp_client: LanguageClient, tmp_path: Path, trained_model: Path):  # type: ignore[no-untyped-def]
    """The default index (with the embedding model) on a one-file workspace: the index
    loads its embedder at once, while the completion model is still loading."""
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "util.py").write_text(UTIL)
    await lsp_client.initialize_session(
        types.InitializeParams(
            capabilities=types.ClientCapabilities(),
            root_uri=ws.as_uri(),
            initialization_options={
                "model": {"path": str(trained_model), "device": "cpu", "threads": 1},
                "index": {"databaseDir": str(tmp_path / "db")},
            },
        )
    )
    yield
    await lsp_client.shutdown_session()


async def test_the_model_and_the_embedder_load_side_by_side(
    embedding_client: LanguageClient,
) -> None:
    limit = time.monotonic() + 180
    while (stats := await get_stats(embedding_client))["state"] not in ("ready", "error"):
        assert time.monotonic() < limit, stats
        await asyncio.sleep(0.1)
    assert stats["state"] == "ready", stats["error"]
    while not (stats.get("index") or {}).get("chunks_with_vectors"):
        assert time.monotonic() < limit, stats
        await asyncio.sleep(0.2)
        stats = await get_stats(embedding_client)
