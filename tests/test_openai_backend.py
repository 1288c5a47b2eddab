"""The openai backend against a scripted server on loopback: wire format, stops,
cancellation, stats, failures and back-off, keys and TLS."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_lsp
from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient

from exlsp.completion.backends.base import BackendUnavailable, GenerationJob
from exlsp.completion.backends.openai import (
    CHARS_PER_TOKEN,
    CharEstimateTokenizer,
    OpenAIBackend,
    RemoteHealth,
    family_from_model_name,
    piece_id,
    piece_text,
)
from exlsp.completion.config import CompletionConfig, EngineConfig, ModelConfig
from exlsp.completion.decode import decode
from exlsp.completion.fim import TEMPLATES
from exlsp.completion.service import CompletionService, ModelLoadError, create_backend
from exlsp.completion.tokenizer import HfTokenizer
from exlsp.completion.types import CompletionRequest, DocumentView
from exlsp.server.documents import split_lines
from tests.openai_fake_server import FakeOpenAIServer, Step, streamed
from tests.test_lsp_e2e import record_notifications, wait_ready

DOC = "def add(a, b):\n    \n\nprint(add(1, 2))\n"
KEY = "sk-test-secret-1234"


def req(text: str = DOC, line: int = 1, character: int = 4) -> CompletionRequest:
    return CompletionRequest(
        DocumentView("file:///m.py", split_lines(text), line, character, "python")
    )


@pytest.fixture
def fake() -> Iterator[FakeOpenAIServer]:
    server = FakeOpenAIServer()
    server.base_url = server.start()  # type: ignore[attr-defined]
    yield server
    server.stop()


def model_config(fake: FakeOpenAIServer, **kw: Any) -> ModelConfig:
    base = dict(backend="openai", baseUrl=fake.base_url, fimTemplate="qwen2.5-coder")  # type: ignore[attr-defined]
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture
async def service() -> AsyncIterator[Callable[..., Any]]:
    made: list[CompletionService] = []

    async def make(model: ModelConfig, **completion: Any) -> CompletionService:
        svc = CompletionService(
            EngineConfig(model=model, completion=CompletionConfig(**completion))
        )
        await svc.start()
        made.append(svc)
        return svc

    yield make
    for svc in made:
        svc.close()


# -- pieces and estimates ---------------------------------------------------------------


def test_piece_ids_round_trip_any_text() -> None:
    for text in ["", "a", "héllo 😀\n", "\x00\x01", "<|fim_prefix|>", "x" * 5000]:
        i = piece_id(text)
        assert i < 0
        assert piece_text(i) == text


def test_the_estimate_tokenizer_counts_characters_and_decodes_exactly() -> None:
    tok = CharEstimateTokenizer(TEMPLATES["qwen2.5-coder"])
    text = "    return {'k': x}  # ü\n"
    ids = tok.encode(text)
    assert len(ids) == -(-len(text) // CHARS_PER_TOKEN)
    assert tok.decode(ids) == text
    # Control-token text in user code stays text: it never maps to a control id.
    assert all(i < 0 for i in tok.encode("<|fim_middle|>"))
    fim_middle = tok.token_to_id("<|fim_middle|>")
    assert fim_middle is not None and fim_middle >= 0
    assert tok.decode([fim_middle]) == "<|fim_middle|>"


def test_family_is_guessed_from_the_served_model_name() -> None:
    assert family_from_model_name("Qwen/Qwen2.5-Coder-7B") == "qwen2.5-coder"
    assert family_from_model_name("bigcode/starcoder2-15b") == "starcoder2"
    assert family_from_model_name("deepseek-ai/deepseek-coder-6.7b-base") == "deepseek-coder"
    assert family_from_model_name("codellama/CodeLlama-7b-hf") == "codellama"
    assert family_from_model_name("llama-3-8b-instruct") is None


def test_back_off_grows_and_resets() -> None:
    now = [100.0]
    health = RemoteHealth(min_s=1.0, max_s=8.0, clock=lambda: now[0])
    health.check()
    delays = [health.failed("down").retry_in for _ in range(6)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    with pytest.raises(BackendUnavailable, match="down"):
        health.check()
    now[0] += 8.0
    health.check()  # the period is over: one request may try again
    health.ok()
    assert health.failed("down").retry_in == 1.0


def test_the_api_key_is_not_in_the_config_repr() -> None:
    assert KEY not in repr(ModelConfig(apiKey=KEY))


# -- streaming into the engine ------------------------------------------------------------


async def test_a_text_prompt_streams_into_the_engine(fake, service) -> None:  # type: ignore[no-untyped-def]
    fake.script = lambda body: streamed("return a + b\n\ndef other():\n", pieces=6)
    svc = await service(model_config(fake, apiKey=KEY))
    assert svc.state == "ready", svc.error
    result = await svc.complete(req())
    assert [s.text for s in result.suggestions] == ["return a + b"]
    body = fake.completions[0].body
    assert isinstance(body["prompt"], str)
    # The cache-stable layout, rendered as text: prefix, suffix, then the cursor line.
    assert body["prompt"].startswith("<|fim_prefix|>def add(a, b):\n<|fim_suffix|>")
    assert body["prompt"].endswith("<|fim_middle|>    ")
    assert body["stream"] is True and body["temperature"] == 0.0
    assert body["model"] == "fake-coder"
    assert body["cache_prompt"] is True
    assert "<|endoftext|>" in body["stop"] and "<|file_sep|>" in body["stop"]
    assert "stop_token_ids" not in body  # estimated ids mean nothing to the server
    assert body["max_tokens"] == CompletionConfig().maxTokens
    assert fake.completions[0].headers["Authorization"] == f"Bearer {KEY}"
    # Estimated counts, and no reuse figures from this server.
    assert result.stats.prompt_tokens == len(svc.engine.last_prompt.ids)
    assert result.stats.reuse_known is False


async def test_typing_changes_only_the_text_after_the_middle_marker(fake, service) -> None:  # type: ignore[no-untyped-def]
    fake.script = lambda body: streamed("x")
    svc = await service(model_config(fake))
    for typed in ("r", "re", "ret"):
        text = DOC.replace("    \n", f"    {typed}\n", 1)
        await svc.complete(req(text, 1, 4 + len(typed)))
    prompts = [r.body["prompt"] for r in fake.completions]
    heads = {p[: p.index("<|fim_middle|>")] for p in prompts}
    assert len(prompts) == 3 and len(heads) == 1  # the server's prefix cache keeps all of it
    assert [p.rsplit("<|fim_middle|>", 1)[1] for p in prompts] == ["    r", "    re", "    ret"]


@pytest.mark.parametrize(
    ("owner", "has_cache_prompt", "has_skip_special"),
    [("vllm", False, True), ("llamacpp", True, False), ("fake", True, True)],
)
async def test_each_server_gets_the_extra_fields_it_knows(  # type: ignore[no-untyped-def]
    fake, service, tiny_model, owner, has_cache_prompt, has_skip_special
) -> None:
    fake.owned_by = owner
    fake.tokenize = HfTokenizer(tiny_model).encode
    svc = await service(model_config(fake, path=str(tiny_model)))
    await svc.complete(req())
    body = fake.completions[0].body
    assert ("cache_prompt" in body) == has_cache_prompt
    assert ("skip_special_tokens" in body) == has_skip_special
    assert ("stop_token_ids" in body) == has_skip_special


async def test_control_strings_in_user_text_are_broken_in_text_prompts(fake, service) -> None:  # type: ignore[no-untyped-def]
    doc = 'MARK = "<|fim_middle|>"\n\nx = \n'
    fake.script = lambda body: streamed("1")
    svc = await service(model_config(fake))
    await svc.complete(req(doc, 2, 4))
    prompt = fake.completions[0].body["prompt"]
    assert prompt.count("<|fim_middle|>") == 1  # only the real marker
    assert '"<\u200b|fim_middle|>"' in prompt


async def test_stop_strings_are_cut_even_across_chunks(fake, service) -> None:  # type: ignore[no-untyped-def]
    steps: list[Step] = [
        ("text", "a + "),
        ("text", "b<|fi"),
        ("text", "le_sep|>junk"),
        ("sleep", 0.5),
    ]
    fake.script = lambda body: [*steps, ("text", "more"), ("finish", "length"), ("done",)]
    svc = await service(model_config(fake))
    t0 = time.perf_counter()
    result = await svc.complete(req("x = \n", 0, 4))
    assert [s.text for s in result.suggestions] == ["a + b"]
    assert result.stats.stop_reason == "eos"
    assert time.perf_counter() - t0 < 0.45  # it did not wait for the rest of the stream


async def test_server_reported_cache_use_becomes_the_stats(fake, service) -> None:  # type: ignore[no-untyped-def]
    usage = {
        "prompt_tokens": 40,
        "completion_tokens": 3,
        "prompt_tokens_details": {"cached_tokens": 32},
    }
    fake.script = lambda body: [("text", "a + b"), ("finish", "stop"), ("usage", usage), ("done",)]
    svc = await service(model_config(fake))
    result = await svc.complete(req())
    st = result.stats
    assert (st.reuse_known, st.prompt_tokens, st.reused_tokens, st.prefilled_tokens) == (
        True,
        40,
        32,
        8,
    )
    assert st.generated_tokens == 3


async def test_llama_cpp_timings_give_the_stats_even_when_cut_early(fake, service) -> None:  # type: ignore[no-untyped-def]
    # timings_per_token: every chunk carries them; the usage chunk never comes when the
    # engine stops reading after the first line.
    timings = {"cache_n": 30, "prompt_n": 5, "prompt_ms": 1.5}
    fake.script = lambda body: [
        ("timings", timings),
        ("text", "return a + b\n"),
        ("text", "\ndef other():\n"),
        ("sleep", 2),
        ("finish", "stop"),
        ("done",),
    ]
    svc = await service(model_config(fake))
    t0 = time.perf_counter()
    result = await svc.complete(req())
    st = result.stats
    assert result.suggestions[0].text == "return a + b"
    assert time.perf_counter() - t0 < 1.5  # cut, not read to the end
    assert (st.reuse_known, st.prompt_tokens, st.reused_tokens, st.prefilled_tokens) == (
        True,
        35,
        30,
        5,
    )
    assert fake.completions[0].body["timings_per_token"] is True


# -- token-id prompts -------------------------------------------------------------------------


async def test_token_prompts_send_the_engines_ids(fake, service, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    tok = HfTokenizer(tiny_model)
    fake.tokenize = tok.encode
    fake.script = lambda body: streamed("return a + b")
    svc = await service(model_config(fake, path=str(tiny_model), fimTemplate="auto"))
    assert svc.state == "ready", svc.error
    assert svc.backend.prompt_format == "tokens"
    await svc.complete(req())
    body = fake.completions[0].body
    assert body["prompt"] == list(svc.engine.last_prompt.ids)
    assert set(body["stop_token_ids"]) == set(svc.engine.fim.stop_ids)


async def test_a_tokenizer_that_is_not_the_servers_is_refused(
    fake, service, tiny_model: Path
) -> None:  # type: ignore[no-untyped-def]
    tok = HfTokenizer(tiny_model)
    fake.tokenize = lambda text: [i + 1 for i in tok.encode(text)]
    svc = await service(model_config(fake, path=str(tiny_model)))
    assert svc.state == "error"
    assert "does not match" in (svc.error or "")


async def test_the_tokenizer_is_checked_once_the_server_answers(
    fake, service, tiny_model: Path
) -> None:  # type: ignore[no-untyped-def]
    fake.status = 503  # down while the backend loads
    svc = await service(model_config(fake, path=str(tiny_model)))
    assert svc.state == "ready" and not svc.backend.tokenizer_checked
    fake.status = 200
    fake.tokenize = lambda text: [1, 2, 3]  # another model's vocabulary
    svc.backend.health.retry_at = 0.0
    result = await svc.complete(req())
    assert "does not match" in (result.error or "")
    assert fake.completions == []  # no token-id prompt went to the wrong model


# -- cancellation and deadline ------------------------------------------------------------------


def _run_job(backend: OpenAIBackend, job: GenerationJob, got: list[int]) -> threading.Thread:
    def run() -> None:
        for token in decode(backend, job):
            got.append(token)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def test_cancelling_a_job_closes_the_stream(fake) -> None:  # type: ignore[no-untyped-def]
    fake.step_s = 0.05
    fake.script = lambda body: [("text", f"t{i} ") for i in range(200)] + [("finish", "length")]
    backend = create_backend(model_config(fake))
    try:
        job = GenerationJob(
            prompt=backend.tokenizer.encode("x = "), stop_ids=frozenset(), max_tokens=200
        )
        got: list[int] = []
        thread = _run_job(backend, job, got)
        assert _wait_for(lambda: len(got) >= 2)
        t0 = time.perf_counter()
        job.cancel.set()
        thread.join(2)
        assert not thread.is_alive()
        assert time.perf_counter() - t0 < 0.2
        assert job.stats.stop_reason == "cancelled"
        # The server saw the client hang up long before its 200 steps (10 s) were out.
        assert _wait_for(lambda: fake.disconnects == 1, timeout=2)
        assert fake.finished == 0
    finally:
        backend.close()


def test_the_deadline_ends_a_silent_request(fake) -> None:  # type: ignore[no-untyped-def]
    fake.script = lambda body: [("sleep", 3), ("text", "late"), ("finish", "stop"), ("done",)]
    backend = create_backend(model_config(fake))
    try:
        job = GenerationJob(
            prompt=backend.tokenizer.encode("x = "),
            stop_ids=frozenset(),
            max_tokens=8,
            deadline=time.monotonic() + 0.3,
        )
        t0 = time.perf_counter()
        assert list(decode(backend, job)) == []
        assert time.perf_counter() - t0 < 0.6
        assert job.stats.stop_reason == "deadline"
    finally:
        backend.close()


# -- failures ------------------------------------------------------------------------------------


async def test_a_failing_server_gets_one_request_per_back_off_period(fake, service, caplog) -> None:  # type: ignore[no-untyped-def]
    svc = await service(model_config(fake))
    fake.status = 503
    caplog.set_level(logging.DEBUG, logger="exlsp")
    results = [await svc.complete(req()) for _ in range(10)]
    assert all(r.suggestions == [] for r in results)
    assert all(
        "HTTP 503" in (r.error or "") and "scripted failure" in (r.error or "") for r in results
    )
    assert len(fake.completions) == 1  # the other nine waited out the back-off
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and not any(r.exc_info for r in caplog.records)
    # The period ends: one more try, which finds the server back.
    fake.status = 200
    fake.script = lambda body: streamed("return a + b")
    svc.backend.health.retry_at = 0.0
    result = await svc.complete(req())
    assert [s.text for s in result.suggestions] == ["return a + b"] and result.error is None
    assert svc.backend.health.problem is None


async def test_a_server_that_never_answers_in_time_is_backed_off(fake, service) -> None:  # type: ignore[no-untyped-def]
    fake.script = lambda body: [("sleep", 2), ("text", "late"), ("finish", "stop"), ("done",)]
    svc = await service(model_config(fake), deadlineMs=150)
    results = [await svc.complete(req()) for _ in range(4)]
    assert [r.error is None for r in results[:3]] == [True, True, True]  # a slow answer is no error
    assert "no token before the deadline 3 times" in (results[3].error or "")
    assert len(fake.completions) == 3  # the fourth waited out the back-off


async def test_an_unreachable_server_is_reported_not_fatal(service) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    svc = await service(
        ModelConfig(
            backend="openai", baseUrl=f"http://127.0.0.1:{port}/v1", fimTemplate="qwen2.5-coder"
        )
    )
    assert svc.state == "ready", svc.error  # it may come up later
    result = await svc.complete(req())
    assert result.suggestions == []
    assert "cannot connect" in (result.error or "") and str(port) in (result.error or "")
    assert "Connection refused" in (result.error or "")


async def test_a_refused_key_fails_loading_without_showing_the_key(fake, service, caplog) -> None:  # type: ignore[no-untyped-def]
    fake.status = 401
    fake.error_body = '{"error": {"message": "invalid key ' + KEY + '"}}'
    caplog.set_level(logging.DEBUG)
    svc = await service(model_config(fake, apiKey=KEY))
    assert svc.state == "error"
    assert "HTTP 401" in (svc.error or "")
    assert KEY not in (svc.error or "")
    assert all(KEY not in r.getMessage() for r in caplog.records)


async def test_a_missing_key_names_the_variable_to_set(fake, service, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("EXLSP_API_KEY", raising=False)
    fake.status = 401
    svc = await service(model_config(fake))
    assert "set EXLSP_API_KEY" in (svc.error or "")


async def test_the_key_comes_from_the_environment(fake, service, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("EXLSP_TEAM_KEY", KEY)
    svc = await service(model_config(fake, apiKeyEnv="EXLSP_TEAM_KEY"))
    await svc.complete(req())
    assert fake.completions[0].headers["Authorization"] == f"Bearer {KEY}"


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        ([("text", "a"), ("raw", "data: {not json"), ("done",)], "malformed"),
        ([("text", "a")], "ended the stream before the completion finished"),
        ([("text", "a"), ("close",)], "broke the connection"),
        ([("raw", 'error: {"message": "slot unavailable"}')], "slot unavailable"),
        ([("error", "out of memory")], "out of memory"),
    ],
)
async def test_broken_streams_are_reported(fake, service, steps, expected) -> None:  # type: ignore[no-untyped-def]
    fake.script = lambda body: steps
    svc = await service(model_config(fake))
    result = await svc.complete(req())
    assert result.suggestions == [] and expected in (result.error or "")


async def test_a_stalled_stream_times_out(fake, service) -> None:  # type: ignore[no-untyped-def]
    fake.script = lambda body: [("text", "a"), ("sleep", 2), ("finish", "stop"), ("done",)]
    svc = await service(model_config(fake, readTimeoutMs=300), deadlineMs=5000)
    t0 = time.perf_counter()
    result = await svc.complete(req())
    assert "sent nothing for 300 ms" in (result.error or "")
    assert time.perf_counter() - t0 < 1.5


async def test_a_model_the_server_does_not_serve_is_a_config_error(fake, service) -> None:  # type: ignore[no-untyped-def]
    svc = await service(model_config(fake, remoteModel="other"))
    assert svc.state == "error" and "serves: fake-coder" in (svc.error or "")


async def test_without_a_template_or_tokenizer_the_name_decides(fake, service) -> None:  # type: ignore[no-untyped-def]
    fake.models = ["my-private-model"]
    svc = await service(model_config(fake, fimTemplate="auto"))
    assert svc.state == "error" and "model.fimTemplate" in (svc.error or "")
    fake.models = ["deepseek-coder-6.7b-base"]
    svc = await service(model_config(fake, fimTemplate="auto"))
    assert svc.state == "ready" and svc.engine.fim.template.family == "deepseek-coder"


def test_bad_settings_are_load_errors() -> None:
    with pytest.raises(ModelLoadError, match="baseUrl is not set"):
        create_backend(ModelConfig(backend="openai"))
    with pytest.raises(ModelLoadError, match="not an http"):
        create_backend(ModelConfig(backend="openai", baseUrl="ftp://x/v1"))
    with pytest.raises(ModelLoadError, match="promptFormat"):
        create_backend(
            ModelConfig(backend="openai", baseUrl="http://127.0.0.1:9/v1", promptFormat="bytes")
        )


# -- TLS ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    try:
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
                "-keyout",
                str(key),
                "-out",
                str(cert),
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"openssl cannot make a test certificate: {e}")
    return cert, key


async def test_tls_is_verified_unless_told_otherwise(certificate, service) -> None:  # type: ignore[no-untyped-def]
    cert, key = certificate
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server = FakeOpenAIServer(script=lambda body: streamed("return a + b"))
    url = server.start(tls=ctx)
    try:
        untrusted = await service(
            ModelConfig(backend="openai", baseUrl=url, fimTemplate="qwen2.5-coder")
        )
        result = await untrusted.complete(req())
        assert "certificate" in (result.error or "") and "model.caFile" in (result.error or "")
        assert not server.completions  # no request went out over the untrusted connection
        trusted = await service(
            ModelConfig(
                backend="openai", baseUrl=url, fimTemplate="qwen2.5-coder", caFile=str(cert)
            )
        )
        result = await trusted.complete(req())
        assert [s.text for s in result.suggestions] == ["return a + b"], result.error
    finally:
        server.stop()


def test_doctor_checks_the_server_and_one_completion(fake, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import io

    from exlsp.server.doctor import run_doctor

    monkeypatch.setenv("EXLSP_API_KEY", KEY)
    fake.script = lambda body: streamed(" 42")
    out = io.StringIO()
    assert run_doctor(model_config(fake), out) == 0
    text = out.getvalue()
    assert "from $EXLSP_API_KEY" in text and KEY not in text
    assert "estimated: 3 characters per token" in text
    assert "yes, 3 characters" in text
    verdict, next_step = text.strip().splitlines()[-2:]
    assert verdict.endswith(f"ok: the openai backend serves fake-coder from {fake.base_url}")
    assert next_step.startswith("next:")
    fake.status = 503
    out = io.StringIO()
    assert run_doctor(model_config(fake), out) == 1
    assert "not ready: the inference server" in out.getvalue() and "HTTP 503" in out.getvalue()


# -- over LSP: the language server stays up and says what is wrong, once ----------------------


@pytest_lsp.fixture(
    config=ClientServerConfig(server_command=[sys.executable, "-m", "exlsp.server", "serve"])
)
async def lsp(lsp_client: LanguageClient, fake: FakeOpenAIServer):  # type: ignore[no-untyped-def]
    record_notifications(lsp_client)
    await lsp_client.initialize_session(
        types.InitializeParams(
            capabilities=types.ClientCapabilities(
                text_document=types.TextDocumentClientCapabilities(
                    inline_completion=types.InlineCompletionClientCapabilities(),
                    synchronization=types.TextDocumentSyncClientCapabilities(),
                ),
                workspace=types.WorkspaceClientCapabilities(configuration=False),
            ),
            initialization_options={
                "model": {
                    "backend": "openai",
                    "baseUrl": fake.base_url,  # type: ignore[attr-defined]
                    "fimTemplate": "qwen2.5-coder",
                },
                "index": {"enabled": False},
            },
        )
    )
    yield
    await lsp_client.shutdown_session()


async def test_an_editor_sees_one_status_per_problem_and_the_recovery(lsp, fake) -> None:  # type: ignore[no-untyped-def]
    client: LanguageClient = lsp
    stats = await wait_ready(client, timeout=30)
    assert stats["state"] == "ready", stats
    uri = "file:///w/m.py"
    client.text_document_did_open(
        types.DidOpenTextDocumentParams(types.TextDocumentItem(uri, "python", 1, DOC))
    )
    params = types.InlineCompletionParams(
        text_document=types.TextDocumentIdentifier(uri),
        position=types.Position(1, 4),
        context=types.InlineCompletionContext(
            trigger_kind=types.InlineCompletionTriggerKind.Automatic
        ),
    )
    fake.status = 503
    for _ in range(8):
        result = await client.text_document_inline_completion_async(params)
        assert result is not None and not result.items  # answered, not an error
    errors = [s for s in client.statuses if s["state"] == "error"]  # type: ignore[attr-defined]
    assert len(errors) == 1 and "HTTP 503" in errors[0]["message"]
    assert sum("HTTP 503" in m.message for m in client.messages) == 1
    assert len(fake.completions) == 1
    # The server comes back; after the back-off period the next keystroke gets a suggestion.
    fake.status = 200
    fake.script = lambda body: streamed("return a + b")
    await asyncio.sleep(1.2)
    result = await client.text_document_inline_completion_async(params)
    assert [i.insert_text for i in result.items] == ["return a + b"]
    assert client.statuses[-1]["state"] == "ready"  # type: ignore[attr-defined]
