"""The openai backend end to end against a real server: llama.cpp's `llama-server`.

The server runs the trained tiny model converted to GGUF, so the same model
runs locally under the transformers backend and the two can be compared. The
server binary is built once from the `llama-cpp-python` source distribution
(see `tests/llama_server.py`); where it cannot be built the tests are skipped
with the reason.
"""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_lsp
from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient

from exlsp.benchmarks.build_gguf import ensure_gguf
from exlsp.completion.backends.base import GenerationJob
from exlsp.completion.config import CompletionConfig, EngineConfig, ModelConfig
from exlsp.completion.decode import decode
from exlsp.completion.service import CompletionService, create_backend
from exlsp.completion.types import CompletionRequest, CompletionResult, DocumentView
from exlsp.server.documents import split_lines
from tests.llama_server import BuildFailed, LlamaServer, ensure_llama_server
from tests.test_lsp_e2e import get_stats, inline, record_notifications, wait_ready

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

KEY = "team-key-4711"
SOURCE = (
    '''import os
import sys


def read_config(path):
    """Read a configuration file."""
    with open(path) as f:
        return f.read()


class Cache:
    def __init__(self, size):
        self.size = size
        self.items = {}

    def get(self, key):
        return self.items.get(key)


def main():
'''
    + "    \n"
)
# (line, character): an empty body, and three places inside existing lines.
PLACES = [(20, 4), (16, 8), (12, 8), (6, 4)]


def request(text: str, line: int, character: int) -> CompletionRequest:
    lines = split_lines(text)
    return CompletionRequest(DocumentView("file:///w/app.py", lines, line, character, "python"))


def typed(text: str, line: int, character: int, extra: str) -> str:
    """`text` with `extra` typed at (line, character)."""
    lines = text.split("\n")
    lines[line] = lines[line][:character] + extra + lines[line][character:]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def binary() -> Path:
    try:
        return ensure_llama_server()
    except BuildFailed as e:
        pytest.skip(f"llama.cpp's server cannot be built here: {e}")


@pytest.fixture(scope="module")
def gguf(trained_model: Path) -> Path:
    return ensure_gguf(trained_model)


@pytest.fixture(scope="module")
def llama(binary: Path, gguf: Path) -> Iterator[LlamaServer]:
    server = LlamaServer(binary, gguf, "--ctx-size", "4096", "--parallel", "1")
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def service() -> AsyncIterator[Callable[..., Any]]:
    made: list[CompletionService] = []

    async def make(model: ModelConfig, **completion: Any) -> CompletionService:
        # No prefetch: its background requests would change what the server saw last.
        config = CompletionConfig(
            **{"deadlineMs": 20000, "maxTokens": 24, "prefetch": False, **completion}
        )
        svc = CompletionService(EngineConfig(model=model, completion=config))
        await svc.start()
        assert svc.state == "ready", svc.error
        made.append(svc)
        return svc

    yield make
    for svc in made:
        svc.close()


def remote(llama: LlamaServer, **kw: Any) -> ModelConfig:
    return ModelConfig(backend="openai", baseUrl=llama.base_url, **kw)


def texts(results: list[CompletionResult]) -> list[str]:
    return [r.suggestions[0].text if r.suggestions else "" for r in results]


async def test_token_prompts_give_what_the_local_backend_gives(
    llama: LlamaServer, trained_model: Path, service: Callable[..., Any]
) -> None:
    local = await service(ModelConfig(path=str(trained_model), device="cpu", threads=1))
    served = await service(remote(llama, path=str(trained_model)))
    assert served.backend.prompt_format == "tokens"
    want = [await local.complete(request(SOURCE, *p)) for p in PLACES]
    got = []
    for place in PLACES:
        result = await served.complete(request(SOURCE, *place))
        # The server counted the very ids the engine built, and said what it reused.
        assert result.stats.prompt_tokens == len(served.engine.last_prompt.ids)
        assert result.stats.reuse_known
        got.append(result)
    assert any(texts(want)), "the trained model suggests something at these places"
    assert texts(got) == texts(want)


async def test_typing_reuses_the_servers_cache(
    llama: LlamaServer, trained_model: Path, service: Callable[..., Any]
) -> None:
    served = await service(remote(llama, path=str(trained_model)))
    line, col = PLACES[0]
    first = await served.complete(request(SOURCE, line, col))
    second = await served.complete(request(typed(SOURCE, line, col, "pr"), line, col + 2))
    prompt = served.engine.last_prompt
    for name, st in (("first", first.stats), ("after typing 2 chars", second.stats)):
        print(
            f"{name}: prompt {st.prompt_tokens}, reused {st.reused_tokens}, "
            f"prefilled {st.prefilled_tokens}, ttft {st.ttft_ms or 0:.1f} ms"
        )
    assert first.stats.reuse_known and second.stats.reuse_known
    # Everything up to the cursor line's own tokens came from the server's KV cache.
    assert second.stats.reused_tokens >= len(prompt.ids) - prompt.segment_tokens["middle"] - 1
    assert second.stats.prefilled_tokens <= prompt.segment_tokens["middle"] + 1


async def test_text_prompts_without_a_tokenizer(
    llama: LlamaServer, trained_model: Path, service: Callable[..., Any]
) -> None:
    exact = await service(remote(llama, path=str(trained_model)))
    estimated = await service(remote(llama, fimTemplate="qwen2.5-coder"))
    assert estimated.backend.prompt_format == "text" and not estimated.backend.exact_tokens
    want = [await exact.complete(request(SOURCE, *p)) for p in PLACES]
    got = [await estimated.complete(request(SOURCE, *p)) for p in PLACES]
    # The server tokenizes the rendered text as the engine tokenized its segments.
    assert texts(got) == texts(want)
    for g, w in zip(got, want, strict=True):
        assert g.stats.prompt_tokens > 0 and g.stats.reuse_known
        assert w.stats.prompt_tokens > 0
    estimated = len(estimated.engine.last_prompt.ids)
    print(f"last prompt: {estimated} tokens estimated, {got[-1].stats.prompt_tokens} on the server")


def test_a_cancelled_generation_frees_the_server(llama: LlamaServer, trained_model: Path) -> None:
    """Cancelling closes the stream; the server's only slot is free for the next job at once."""
    backend = create_backend(remote(llama, path=str(trained_model)))
    try:
        prompt = backend.tokenizer.encode("import os\nimport sys\n\n\ndef main():\n")

        def job(max_tokens: int) -> GenerationJob:
            return GenerationJob(prompt=prompt, stop_ids=frozenset(), max_tokens=max_tokens)

        # How long the long generation takes when left to run.
        t0 = time.perf_counter()
        full = job(3000)
        n_full = len(list(decode(backend, full)))
        full_s = time.perf_counter() - t0
        # Cancelled after its first few tokens, then the next job right away.
        cancelled = job(3000)
        for i, _ in enumerate(decode(backend, cancelled)):
            if i == 2:
                cancelled.cancel.set()
        t1 = time.perf_counter()
        short = job(1)
        assert len(list(decode(backend, short))) == 1
        next_s = time.perf_counter() - t1
        assert cancelled.stats.stop_reason == "cancelled"
        print(f"full: {n_full} pieces in {full_s:.2f} s; next job after a cancel: {next_s:.3f} s")
        assert n_full > 500, "the long job must be long enough to tell the difference"
        assert next_s < full_s / 4
    finally:
        backend.close()


async def test_outage_key_and_recovery(
    binary: Path, gguf: Path, trained_model: Path, service: Callable[..., Any], monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    server = LlamaServer(binary, gguf, "--ctx-size", "2048", "--api-key", KEY)
    server.start()
    try:
        monkeypatch.delenv("EXLSP_API_KEY", raising=False)
        no_key = CompletionService(EngineConfig(model=remote(server, path=str(trained_model))))
        await no_key.start()  # a refused key is a configuration error: reported once
        assert no_key.state == "error"
        assert "HTTP 401" in (no_key.error or "") and "set EXLSP_API_KEY" in (no_key.error or "")
        result = await no_key.complete(request(SOURCE, *PLACES[0]))
        assert not result.suggestions and result.error == no_key.error

        monkeypatch.setenv("EXLSP_API_KEY", KEY)
        svc = await service(remote(server, path=str(trained_model)))
        ok = await svc.complete(request(SOURCE, *PLACES[0]))
        assert ok.error is None and ok.stats.source == "model"

        server.stop()
        down = await svc.complete(request(SOURCE, *PLACES[1]))
        assert down.suggestions == [] and "cannot connect" in (down.error or "")
        again = await svc.complete(request(SOURCE, *PLACES[1]))
        assert again.error == down.error  # backing off: no new attempt, the same status

        server.start()
        svc.backend.health.retry_at = 0.0  # the back-off period is over
        back = await svc.complete(request(SOURCE, *PLACES[1]))
        assert back.error is None and back.stats.source == "model"
    finally:
        server.stop()


# -- over LSP --------------------------------------------------------------------------------

SERVER = [sys.executable, "-m", "exlsp.server", "serve"]


@pytest.fixture
def own_llama(binary: Path, gguf: Path) -> Iterator[LlamaServer]:
    server = LlamaServer(binary, gguf, "--ctx-size", "2048")
    server.start()
    yield server
    server.stop()


@pytest_lsp.fixture(config=ClientServerConfig(server_command=SERVER))
async def client(lsp_client: LanguageClient, own_llama: LlamaServer, trained_model: Path):  # type: ignore[no-untyped-def]
    record_notifications(lsp_client)
    await lsp_client.initialize_session(
        types.InitializeParams(
            capabilities=types.ClientCapabilities(
                general=types.GeneralClientCapabilities(position_encodings=["utf-16"]),
                text_document=types.TextDocumentClientCapabilities(
                    inline_completion=types.InlineCompletionClientCapabilities(),
                    synchronization=types.TextDocumentSyncClientCapabilities(),
                ),
                workspace=types.WorkspaceClientCapabilities(configuration=False),
            ),
            initialization_options={
                "model": {
                    "backend": "openai",
                    "baseUrl": own_llama.base_url,
                    "path": str(trained_model),
                },
                # No prefetch: one in flight when the server is stopped fails as a
                # broken stream, before the next keystroke's "cannot connect".
                "completion": {"deadlineMs": 20000, "maxTokens": 24, "prefetch": False},
                "index": {"enabled": False},
            },
        )
    )
    lsp_client.llama = own_llama  # type: ignore[attr-defined]
    yield
    await lsp_client.shutdown_session()


async def test_an_editor_gets_suggestions_and_one_status_when_the_server_goes(
    client: LanguageClient,
) -> None:
    stats = await wait_ready(client, timeout=60)
    assert stats["state"] == "ready", stats
    uri = "file:///w/app.py"
    client.text_document_did_open(
        types.DidOpenTextDocumentParams(types.TextDocumentItem(uri, "python", 1, SOURCE))
    )
    result = await inline(client, uri, *PLACES[0])
    assert result.items and result.items[0].insert_text
    last = (await get_stats(client))["last"]
    assert last["source"] == "model" and last["reuseKnown"] is True

    client.llama.stop()  # type: ignore[attr-defined]
    for _ in range(5):
        result = await inline(client, uri, *PLACES[1])
        assert not result.items  # an answer, not an error
    errors = [s for s in client.statuses if s["state"] == "error"]  # type: ignore[attr-defined]
    assert len(errors) == 1 and "cannot connect" in errors[0]["message"]
    shown = [m.message for m in client.messages if "cannot connect" in m.message]
    assert len(shown) == 1
    assert (await get_stats(client))["state"] == "ready"  # the language server is still up
