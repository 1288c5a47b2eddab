"""End to end through the model host: several `exlsp serve` processes, one host,
the trained tiny model on the CPU. Each test has a runtime folder of its own, so
no host is shared with another test or the user's; every host is stopped at the end."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from lsprotocol import types
from pytest_lsp import LanguageClient, make_test_lsp_client

from exlsp.completion.host import control
from tests.conftest import stop_all_hosts
from tests.test_lsp_e2e import capabilities, get_stats, inline, open_doc, wait_ready

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SOURCE_A = "def area(radius):\n    return 3.14 * radius\n\n\ndef total(values):\n    \n"
SOURCE_B = (
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n"
    "    def push(self, x):\n        \n"
)


@pytest.fixture
async def servers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trained_model: Path
) -> AsyncIterator[Callable[..., Any]]:
    """Starts `exlsp serve` processes that use the model host; stops them and the hosts."""
    runtime = tmp_path / "run"
    monkeypatch.setenv("EXLSP_RUNTIME_DIR", str(runtime))
    env = {**os.environ, "EXLSP_RUNTIME_DIR": str(runtime), "EXLSP_MODEL_HOST": "auto"}
    started: list[LanguageClient] = []

    async def start(**model: Any) -> LanguageClient:
        client = make_test_lsp_client()
        await client.start_io(sys.executable, "-m", "exlsp.server", "serve", env=env)
        started.append(client)
        await client.initialize_session(
            types.InitializeParams(
                capabilities=capabilities("utf-16"),
                initialization_options={
                    "model": {"path": str(trained_model), "device": "cpu", "threads": 1, **model},
                    "completion": {"deadlineMs": 3000, "maxTokens": 16, "prefetch": False},
                    "index": {"enabled": False},
                },
            )
        )
        stats = await wait_ready(client, timeout=180)
        assert stats["state"] == "ready", stats
        return client

    yield start
    for client in started:
        try:
            await asyncio.wait_for(client.shutdown_session(), 20)
        except Exception:
            await client.stop()
    stop_all_hosts()


async def complete(client: LanguageClient, uri: str, line: int, character: int) -> dict[str, Any]:
    """One automatic inline completion; the server's figures of it."""
    await inline(client, uri, line, character)
    return dict((await get_stats(client))["last"])


def host_stats() -> dict[str, Any]:
    hosts = control.running_hosts()
    assert len(hosts) == 1, hosts
    return hosts[0]


async def test_three_servers_one_host_one_model_load(servers: Callable[..., Any]) -> None:
    clients = [await servers() for _ in range(3)]
    for n, client in enumerate(clients):
        uri = open_doc(client, SOURCE_A, f"file:///work/a{n}.py")
        last = await complete(client, uri, 5, 4)
        assert last["source"] == "model", last
        assert last["generatedTokens"] > 0, last
    host = host_stats()
    assert host["loads"] == 1
    assert len(host["sessions"]) == 3
    assert all(s["requests"] >= 1 for s in host["sessions"])
    # A second configuration: a host of its own.
    await servers(threads=2)
    assert len(control.running_hosts()) == 2


async def type_keys(
    client: LanguageClient, uri: str, line: int, start: int, text: str, version: int
) -> dict[str, Any]:
    """Types `text` at (line, start) one character at a time, as an editor does."""
    client.text_document_did_change(
        types.DidChangeTextDocumentParams(
            text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=version),
            content_changes=[
                types.TextDocumentContentChangePartial(
                    range=types.Range(types.Position(line, start), types.Position(line, start)),
                    text=text,
                )
            ],
        )
    )
    return await complete(client, uri, line, start + len(text))


async def test_alternating_typing_keeps_each_session_cache(servers: Callable[..., Any]) -> None:
    a, b = await servers(), await servers()
    uri_a = open_doc(a, SOURCE_A, "file:///work/a.py")
    uri_b = open_doc(b, SOURCE_B, "file:///work/b.py")
    await complete(a, uri_a, 5, 4)
    await complete(b, uri_b, 5, 8)
    # Keys the model would not suggest, so that each one needs the model.
    model_runs = []
    for n, key in enumerate("qzjxkv"):
        for client, uri, line, col in ((a, uri_a, 5, 4), (b, uri_b, 5, 8)):
            last = await type_keys(client, uri, line, col + n, key, n + 2)
            if last["source"] == "model":
                model_runs.append(last)
    assert len(model_runs) >= 8, model_runs
    assert all(r["prefilledTokens"] <= 16 for r in model_runs), [
        (r["promptTokens"], r["prefilledTokens"]) for r in model_runs
    ]


async def test_kill_9_of_the_host_while_typing(servers: Callable[..., Any]) -> None:
    a, b = await servers(), await servers()
    uri_a = open_doc(a, SOURCE_A, "file:///work/a.py")
    uri_b = open_doc(b, SOURCE_B, "file:///work/b.py")
    assert (await complete(a, uri_a, 5, 4))["source"] == "model"
    old = host_stats()["pid"]
    os.kill(old, signal.SIGKILL)
    # Both keep answering: empty, with no error to the editor.
    for client, uri, line, col in ((a, uri_a, 5, 4), (b, uri_b, 5, 8)):
        result = await asyncio.wait_for(inline(client, uri, line, col), 10)
        assert result is None or isinstance(result, types.InlineCompletionList | list)
    # An edit while the host is away is kept.
    await type_keys(a, uri_a, 5, 4, "result = ", 2)
    limit = time.monotonic() + 120
    while True:
        last = await complete(a, uri_a, 5, 13)
        if last["source"] == "model":
            break
        assert time.monotonic() < limit, "suggestions did not resume"
        await asyncio.sleep(0.5)
    prompt = (await get_stats(a))["lastPromptText"]
    assert "result = " in prompt["full"]
    assert host_stats()["pid"] != old
    limit = time.monotonic() + 60
    while (await complete(b, uri_b, 5, 8))["source"] != "model":
        assert time.monotonic() < limit, "the second server did not resume"
        await asyncio.sleep(0.5)
    assert host_stats()["loads"] == 1  # the new host loaded once, for both
    for client in (a, b):
        shown = [m.message for m in client.messages if "model host" in m.message]
        assert len(shown) == 1, shown
