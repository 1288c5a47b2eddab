"""The workspace boundary, over the LSP: what a repository's settings, an opened secret
file, a changed workspace folder or a second TCP client can and cannot make exlsp do."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_lsp
from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient

from exlsp.server.config import Config, merge
from tests.openai_fake_server import FakeOpenAIServer, streamed
from tests.test_lsp_e2e import get_stats, record_notifications, wait_ready

pytestmark = pytest.mark.e2e

SERVER = [sys.executable, "-m", "exlsp.server", "serve"]
TOKEN = "ghp_" + "T0k3n" * 8  # the user's token in the server's environment (made up)
os.environ["GITHUB_TOKEN"] = TOKEN  # the server process inherits it


@pytest.fixture
def capture() -> Iterator[FakeOpenAIServer]:
    """A server on 127.0.0.1 that records whatever reaches it."""
    server = FakeOpenAIServer()
    server.script = lambda body: streamed("return 42")
    server.base_url = server.start()  # type: ignore[attr-defined]
    yield server
    server.stop()


def inline_params(uri: str, line: int, character: int) -> types.InlineCompletionParams:
    return types.InlineCompletionParams(
        text_document=types.TextDocumentIdentifier(uri),
        position=types.Position(line, character),
        context=types.InlineCompletionContext(
            trigger_kind=types.InlineCompletionTriggerKind.Invoked
        ),
    )


def capabilities(configuration: bool) -> types.ClientCapabilities:
    return types.ClientCapabilities(
        text_document=types.TextDocumentClientCapabilities(
            inline_completion=types.InlineCompletionClientCapabilities(),
            synchronization=types.TextDocumentSyncClientCapabilities(),
        ),
        workspace=types.WorkspaceClientCapabilities(
            configuration=configuration, workspace_folders=True
        ),
    )


# -- 1. settings a repository can carry ------------------------------------------------------


def hostile_settings(capture: FakeOpenAIServer, tmp_path: Path) -> dict[str, Any]:
    url = capture.base_url  # type: ignore[attr-defined]
    return {
        "model": {
            "backend": "openai",
            "baseUrl": url,
            "apiKeyEnv": "GITHUB_TOKEN",
            "fimTemplate": "qwen2.5-coder",
        },
        "index": {
            "enabled": True,
            "databaseDir": str(tmp_path / "victim"),
            "sharedIndex": "s3://attacker/index",
            "storageEndpoint": url,
        },
        "logging": {"file": str(tmp_path / "written.log")},
    }


@pytest_lsp.fixture(config=ClientServerConfig(server_command=SERVER))
async def hostile(lsp_client: LanguageClient, capture: FakeOpenAIServer, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A client whose workspace settings (workspace/configuration) are a repository's."""
    record_notifications(lsp_client)
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "app.py").write_text("def f():\n    return 1\n")
    lsp_client.set_configuration(hostile_settings(capture, tmp_path), section="exlsp")
    await lsp_client.initialize_session(
        types.InitializeParams(
            capabilities=capabilities(configuration=True),
            root_uri=workspace.as_uri(),
            initialization_options={
                "model": {"backend": "instant"},
                "index": {"enabled": False, "embeddingModel": "none"},
            },
        )
    )
    yield
    await lsp_client.shutdown_session()


async def test_workspace_settings_cannot_choose_host_credential_or_paths(  # type: ignore[no-untyped-def]
    hostile, capture, tmp_path: Path
) -> None:
    client: LanguageClient = hostile
    stats = await wait_ready(client, timeout=60)
    assert stats["state"] == "ready", stats
    # The same settings pushed by didChangeConfiguration are dropped the same way.
    client.workspace_did_change_configuration(
        types.DidChangeConfigurationParams(settings={"exlsp": hostile_settings(capture, tmp_path)})
    )
    uri = (tmp_path / "ws" / "app.py").as_uri()
    client.text_document_did_open(
        types.DidOpenTextDocumentParams(
            types.TextDocumentItem(uri, "python", 1, "def f():\n    return 1\n")
        )
    )
    await client.text_document_inline_completion_async(inline_params(uri, 1, 4))
    stats = await get_stats(client)
    assert stats["model"]["backend"] == "instant"
    assert capture.requests == []  # nothing reached the repository's host, no key either
    assert not (tmp_path / "victim").exists()
    assert not (tmp_path / "written.log").exists()
    ignored = [m.message for m in client.messages if "ignored" in m.message]
    assert len(ignored) == 1, ignored  # said once, not per message
    for key in ("model.baseUrl", "model.apiKeyEnv", "index.databaseDir", "logging.file"):
        assert key in ignored[0]
    # Settings that choose nothing of the kind still apply from the workspace.
    assert stats["index"] is not None  # index.enabled came from the workspace


def test_api_key_env_names_only_exlsp_variables() -> None:
    config, errors = merge(Config(), {"model": {"apiKeyEnv": "GITHUB_TOKEN"}})
    assert config.model.apiKeyEnv == "EXLSP_API_KEY" and "EXLSP_" in errors[0]
    config, errors = merge(Config(), {"model": {"apiKeyEnv": "EXLSP_TEAM_KEY"}})
    assert config.model.apiKeyEnv == "EXLSP_TEAM_KEY" and not errors


def test_the_backend_never_reads_another_variable() -> None:
    from exlsp.completion.backends.openai import resolve_api_key
    from exlsp.completion.config import ModelConfig

    assert resolve_api_key(ModelConfig(apiKeyEnv="GITHUB_TOKEN")) == ""


# -- 2. an opened secret file ------------------------------------------------------------------


@pytest_lsp.fixture(config=ClientServerConfig(server_command=SERVER))
async def remote(lsp_client: LanguageClient, capture: FakeOpenAIServer):  # type: ignore[no-untyped-def]
    record_notifications(lsp_client)
    await lsp_client.initialize_session(
        types.InitializeParams(
            capabilities=capabilities(configuration=False),
            initialization_options={
                "model": {
                    "backend": "openai",
                    "baseUrl": capture.base_url,  # type: ignore[attr-defined]
                    "fimTemplate": "qwen2.5-coder",
                },
                # Each request the fake receives is counted: no prefetched ones.
                "completion": {"prefetch": False},
                "index": {"enabled": False},
            },
        )
    )
    yield
    await lsp_client.shutdown_session()


SECRET_VALUE = "s3cr3t-" + "v4lu3" * 4
AWS_KEY_ID = "AKIA" + "Z7Q2" * 4


async def test_a_secret_document_never_reaches_the_remote_server(  # type: ignore[no-untyped-def]
    remote, capture, tmp_path: Path
) -> None:
    client: LanguageClient = remote
    assert (await wait_ready(client, timeout=60))["state"] == "ready"
    (tmp_path / ".env").write_text(f"API_TOKEN={SECRET_VALUE}\n")
    os.symlink(tmp_path / ".env", tmp_path / "env.txt")
    documents = {
        tmp_path / ".env": f"API_TOKEN={SECRET_VALUE}\n",
        tmp_path / "ID_RSA": f"{SECRET_VALUE}\n",
        tmp_path / "env.txt": f"API_TOKEN={SECRET_VALUE}\n",
        tmp_path / "settings.py": f"AWS_ID = '{AWS_KEY_ID}'\nX = '{SECRET_VALUE}'\n",
        tmp_path / "deploy": f"-----BEGIN OPENSSH PRIVATE KEY-----\n{SECRET_VALUE}\n",
    }
    for path, text in documents.items():
        uri = path.as_uri()
        client.text_document_did_open(
            types.DidOpenTextDocumentParams(types.TextDocumentItem(uri, "plaintext", 1, text))
        )
        result = await client.text_document_inline_completion_async(inline_params(uri, 1, 0))
        assert result is not None and not result.items, path.name
    # A secret typed into an ordinary document stops its completions from then on.
    uri = (tmp_path / "app.py").as_uri()
    client.text_document_did_open(
        types.DidOpenTextDocumentParams(types.TextDocumentItem(uri, "python", 1, "x = 1\n"))
    )
    result = await client.text_document_inline_completion_async(inline_params(uri, 1, 0))
    assert [i.insert_text for i in result.items] == ["return 42"]  # the test can see a send
    sent = len(capture.completions)
    client.text_document_did_change(
        types.DidChangeTextDocumentParams(
            text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=2),
            content_changes=[
                types.TextDocumentContentChangePartial(
                    range=types.Range(types.Position(1, 0), types.Position(1, 0)),
                    text=f"key = '{AWS_KEY_ID}'\n",
                )
            ],
        )
    )
    result = await client.text_document_inline_completion_async(inline_params(uri, 2, 0))
    assert not result.items and len(capture.completions) == sent
    wire = json.dumps([r.body for r in capture.requests])
    assert SECRET_VALUE not in wire and AWS_KEY_ID not in wire
    said = [m.message for m in client.messages if "no suggestions in" in m.message]
    assert any(".env" in m for m in said) and any("AWS access key" in m for m in said)


# -- 3. the workspace root ---------------------------------------------------------------------


@pytest_lsp.fixture(config=ClientServerConfig(server_command=SERVER))
async def rooted(lsp_client: LanguageClient, tmp_path: Path):  # type: ignore[no-untyped-def]
    record_notifications(lsp_client)
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "app.py").write_text("def first():\n    return 1\n")
    await lsp_client.initialize_session(
        types.InitializeParams(
            capabilities=capabilities(configuration=False),
            workspace_folders=[types.WorkspaceFolder(workspace.as_uri(), "ws")],
            initialization_options={
                "model": {"backend": "instant"},
                "index": {
                    "enabled": True,
                    "embeddingModel": "none",
                    "databaseDir": str(tmp_path / "db"),
                },
            },
        )
    )
    yield
    await lsp_client.shutdown_session()


async def index_root(client: LanguageClient) -> str | None:
    stats = await get_stats(client)
    return stats["index"]["root"] if stats["index"] else None


async def test_the_index_follows_folder_changes_but_never_to_root_or_home(  # type: ignore[no-untyped-def]
    rooted, tmp_path: Path
) -> None:
    client: LanguageClient = rooted
    await wait_ready(client, timeout=60)
    first = tmp_path / "ws"
    assert await index_root(client) == str(first)
    other = tmp_path / "other"
    other.mkdir()

    def change(added: Path | str, removed: Path) -> None:
        uri = added.as_uri() if isinstance(added, Path) else added
        client.workspace_did_change_workspace_folders(
            types.DidChangeWorkspaceFoldersParams(
                types.WorkspaceFoldersChangeEvent(
                    added=[types.WorkspaceFolder(uri, "x")],
                    removed=[types.WorkspaceFolder(removed.as_uri(), "x")],
                )
            )
        )

    change(other, first)
    for _ in range(100):
        if await index_root(client) == str(other):
            break
        await asyncio.sleep(0.05)
    assert await index_root(client) == str(other)
    for bad in ("file:///", Path.home().as_uri()):
        current = other if bad == "file:///" else Path("/")
        change(bad, current)
        await asyncio.sleep(0.3)
        assert await index_root(client) is None
    refused = [m.message for m in client.messages if "not indexing" in m.message]
    assert len(refused) == 2, refused


# -- 4. TCP -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def frame(message: dict[str, Any]) -> bytes:
    body = json.dumps(message).encode()
    return b"Content-Length: %d\r\n\r\n%s" % (len(body), body)


_buffers: dict[int, bytes] = {}


def read_message(sock: socket.socket) -> dict[str, Any] | None:
    """One JSON-RPC message, or None when the server closed the connection."""
    data = _buffers.pop(sock.fileno(), b"")
    while True:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if sep:
            fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n"))
            length = int(fields[b"Content-Length"])
            if len(rest) >= length:
                _buffers[sock.fileno()] = rest[length:]
                return dict(json.loads(rest[:length]))
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        data += chunk


def answer(sock: socket.socket, msg_id: int) -> dict[str, Any]:
    while True:
        message = read_message(sock)
        assert message is not None, "the server closed the connection"
        if message.get("id") == msg_id and "method" not in message:
            return message


def connect(port: int) -> socket.socket:
    limit = time.monotonic() + 30
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            return sock
        except OSError:
            if time.monotonic() > limit:
                raise
            time.sleep(0.1)


def test_tcp_serves_one_client_and_only_after_initialize() -> None:
    port = free_port()
    server = subprocess.Popen(
        [*SERVER, "--tcp", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        first = connect(port)
        first.sendall(frame({"jsonrpc": "2.0", "id": 1, "method": "exlsp/stats", "params": {}}))
        assert answer(first, 1)["error"]["code"] == -32002  # not initialized: no prompt
        init = {"capabilities": {}, "initializationOptions": {"model": {"backend": "instant"}}}
        first.sendall(frame({"jsonrpc": "2.0", "id": 2, "method": "initialize", "params": init}))
        assert "capabilities" in answer(first, 2)["result"]
        first.sendall(frame({"jsonrpc": "2.0", "method": "initialized", "params": {}}))
        for n in range(100, 400):  # until the model is ready (a shutdown may come any time)
            first.sendall(frame({"jsonrpc": "2.0", "id": n, "method": "exlsp/stats", "params": {}}))
            if answer(first, n)["result"]["state"] == "ready":
                break
            time.sleep(0.05)
        second = connect(port)
        second.sendall(frame({"jsonrpc": "2.0", "id": 1, "method": "exlsp/stats", "params": {}}))
        assert read_message(second) is None  # closed at once: nothing of the first client's
        first.sendall(frame({"jsonrpc": "2.0", "id": 3, "method": "exlsp/stats", "params": {}}))
        assert "state" in answer(first, 3)["result"]  # the first client is still served
        first.sendall(frame({"jsonrpc": "2.0", "id": 4, "method": "shutdown"}))
        answer(first, 4)
        first.sendall(frame({"jsonrpc": "2.0", "method": "exit"}))
        assert server.wait(30) == 0
    finally:
        server.kill()
        server.wait()


def test_tcp_refuses_a_host_beyond_loopback_without_the_flag() -> None:
    done = subprocess.run(
        [*SERVER, "--tcp", f"0.0.0.0:{free_port()}"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0 and "--listen-any" in done.stderr
