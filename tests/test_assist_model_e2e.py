"""Over stdio: hover and refactors served by an assist model of their own (a second local
model in the same process; an instruct model behind an OpenAI-compatible server) while
completions use a FIM model, and a model that cannot load replaced by its fallback."""

from __future__ import annotations

import asyncio
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_lsp
from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient

from tests.openai_fake_server import FakeOpenAIServer, streamed
from tests.test_assist import QWEN_CHAT
from tests.test_hover_actions_e2e import (
    SOURCE,
    URI,
    action_params,
    apply_text_edits,
    capabilities,
    edits_of,
    hover_params,
)
from tests.test_lsp_e2e import get_stats, record_notifications

pytestmark = pytest.mark.e2e

SERVER = ClientServerConfig(server_command=[sys.executable, "-m", "exlsp.server", "serve"])
EXPLANATION = "Computes the area of a circle of the given radius."
SIMPLIFIED = "def area(radius):\n    return math.pi * radius**2\n"


@pytest.fixture(scope="module")
def instruct_model(tmp_path_factory: pytest.TempPathFactory, trained_model: Path) -> Path:
    """The trained tiny model with a chat template: an instruct-style model of its own
    (it answers a chat prompt with code-like text, the random-weight one with blank lines)."""
    folder = tmp_path_factory.mktemp("models") / "tiny-instruct"
    shutil.copytree(trained_model, folder)
    (folder / "chat_template.jinja").write_text(QWEN_CHAT, encoding="utf-8")
    return folder


@pytest.fixture
def instruct_server() -> Iterator[FakeOpenAIServer]:
    """An OpenAI-compatible server with an instruct model that explains and rewrites."""

    def reply(body: dict[str, Any]) -> list[Any]:
        prompt = str(body.get("prompt", ""))
        if "Rewrite this python function" in prompt:
            return streamed(f"Here it is:\n```python\n{SIMPLIFIED}```\n")
        if "Explain this python function" in prompt:
            return streamed(EXPLANATION)
        return streamed("")

    server = FakeOpenAIServer(script=reply, models=["tiny-instruct"])
    server.base_url = server.start()  # type: ignore[attr-defined]
    yield server
    server.stop()


async def start(client: LanguageClient, options: dict[str, Any]) -> dict[str, Any]:
    """Initialize with `options`; the stats once both models are ready."""
    record_notifications(client)
    await client.initialize_session(
        types.InitializeParams(capabilities=capabilities(), initialization_options=options)
    )
    limit = time.monotonic() + 120
    while time.monotonic() < limit:
        stats = await get_stats(client)
        assist = stats["assist"] or {}
        if stats["state"] == "error" or (
            stats["state"] == "ready" and assist.get("state") in ("shared", "ready", "error")
        ):
            return dict(stats)
        await asyncio.sleep(0.1)
    raise TimeoutError("the models did not load")


def options(completion_model: Path, assist: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": {"path": str(completion_model), "device": "cpu", "threads": 1},
        "completion": {"deadlineMs": 1500, "maxTokens": 24},
        "hover": {"deadlineMs": 20000, "maxTokens": 12},
        "assist": assist,
        "index": {"enabled": False},
    }


def open_source(client: LanguageClient) -> None:
    client.text_document_did_open(
        types.DidOpenTextDocumentParams(types.TextDocumentItem(URI, "python", 1, SOURCE))
    )


@pytest_lsp.fixture(config=SERVER)
async def local_assist(lsp_client: LanguageClient, tiny_model: Path, instruct_model: Path):  # type: ignore[no-untyped-def]
    assist = {"backend": "transformers", "path": str(instruct_model), "device": "cpu"}
    lsp_client.ready = await start(lsp_client, options(tiny_model, assist))  # type: ignore[attr-defined]
    yield
    await lsp_client.shutdown_session()


@pytest_lsp.fixture(config=SERVER)
async def remote_assist(  # type: ignore[no-untyped-def]
    lsp_client: LanguageClient,
    tiny_model: Path,
    instruct_model: Path,
    instruct_server: FakeOpenAIServer,
):
    assist = {
        "backend": "openai",
        "baseUrl": instruct_server.base_url,  # type: ignore[attr-defined]
        "path": str(instruct_model),  # the served model's tokenizer and chat template
        "promptFormat": "text",
    }
    lsp_client.ready = await start(lsp_client, options(tiny_model, assist))  # type: ignore[attr-defined]
    yield
    await lsp_client.shutdown_session()


async def test_hover_comes_from_a_second_local_model(
    local_assist: LanguageClient, tiny_model: Path, instruct_model: Path
) -> None:
    client = local_assist
    ready = client.ready  # type: ignore[attr-defined]
    assert ready["state"] == "ready", ready
    assert ready["model"]["path"] == str(tiny_model)
    assert ready["assist"]["state"] == "ready" and ready["assist"]["jobs"] == 0
    open_source(client)
    hover = await client.text_document_hover_async(hover_params(14, 16))  # `area` in total()
    assert hover is not None and isinstance(hover.contents, types.MarkupContent)
    assert hover.contents.value.startswith("**area (function)**")
    stats = await get_stats(client)
    assist = stats["assist"]
    assert assist["separate"] and assist["mode"] == "chat"
    assert assist["model"]["path"] == str(instruct_model)
    assert assist["jobs"] >= 1  # the assist model's own assistant wrote it
    assert assist["memoryBytes"] > 0
    assert stats["model"]["path"] == str(tiny_model)  # completions: the FIM model
    assert stats["last"] is None  # no completion ran: the completion model did nothing


async def test_explanations_and_refactors_from_an_instruct_model_on_a_server(
    remote_assist: LanguageClient, instruct_server: FakeOpenAIServer
) -> None:
    client = remote_assist
    ready = client.ready  # type: ignore[attr-defined]
    assert ready["assist"]["state"] == "ready", ready
    assert ready["assist"]["model"]["backend"] == "openai"
    open_source(client)
    hover = await client.text_document_hover_async(hover_params(14, 16))
    assert hover is not None and isinstance(hover.contents, types.MarkupContent)
    assert hover.contents.value.endswith(EXPLANATION)
    # The request carried the chat template's turns: an instruct prompt, not FIM.
    prompt = instruct_server.completions[0].body["prompt"]
    assert "<|im_start|>user" in prompt and prompt.endswith("<|im_start|>assistant\n")
    actions = await client.text_document_code_action_async(action_params((9, 4), (9, 4)))
    assert actions is not None
    chosen = {a.title: a for a in actions if isinstance(a, types.CodeAction)}
    resolved = await client.code_action_resolve_async(chosen["Simplify area"])
    assert resolved.edit is not None
    new_text = apply_text_edits(SOURCE, edits_of(resolved.edit))
    assert SIMPLIFIED in new_text and new_text.count("def area(") == 1
    assert "    squared = radius * radius\n" not in new_text
    stats = await get_stats(client)
    assert stats["assist"]["jobs"] == 2 and len(instruct_server.completions) == 2


@pytest_lsp.fixture(config=SERVER)
async def broken_primary(lsp_client: LanguageClient, tiny_model: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    model = {
        "path": str(tmp_path / "no-such-model"),
        "device": "cpu",
        "threads": 1,
        "fallback": [{"path": str(tiny_model)}],
    }
    lsp_client.ready = await start(lsp_client, {"model": model, "index": {"enabled": False}})  # type: ignore[attr-defined]
    yield
    await lsp_client.shutdown_session()


async def test_a_model_that_cannot_load_is_replaced_by_its_fallback(
    broken_primary: LanguageClient, tiny_model: Path, tmp_path: Path
) -> None:
    client = broken_primary
    missing = tmp_path / "no-such-model"
    ready = client.ready  # type: ignore[attr-defined]
    assert ready["state"] == "ready", ready
    assert ready["servingIndex"] == 1
    assert ready["serving"] == f"transformers {tiny_model} on cpu"
    assert ready["model"]["path"] == str(tiny_model)
    assert ready["failures"] == [
        f"transformers {missing} on cpu could not be loaded: model directory not found: {missing}"
    ]
    status = client.statuses[-1]  # type: ignore[attr-defined]
    assert status["state"] == "ready" and status["fallback"] is True
    assert status["serving"] == ready["serving"] and status["model"] == str(tiny_model)
    said = [m.message for m in client.messages if "serves instead" in m.message]
    assert said == [f"exlsp: {ready['failures'][0]}; {ready['serving']} serves instead"]
    # A reload of the model settings tries the first model again.
    loads = sum(s["state"] == "loading" for s in client.statuses)  # type: ignore[attr-defined]
    client.workspace_did_change_configuration(
        types.DidChangeConfigurationParams(settings={"exlsp": {"model": {"threads": 2}}})
    )
    limit = time.monotonic() + 60
    while sum(s["state"] == "loading" for s in client.statuses) == loads:  # type: ignore[attr-defined]
        assert time.monotonic() < limit, "no reload"
        await asyncio.sleep(0.05)
    while client.statuses[-1]["state"] == "loading":  # type: ignore[attr-defined]
        assert time.monotonic() < limit, "the reload did not finish"
        await asyncio.sleep(0.05)
    stats = await get_stats(client)
    assert stats["state"] == "ready" and stats["servingIndex"] == 1
    assert stats["serving"] == ready["serving"]
    assert len(stats["failures"]) == 1 and str(missing) in stats["failures"][0]
    assert sum("serves instead" in m.message for m in client.messages) == 1  # once
