"""The fallback chain (`model.fallback`) and the assist model, in-process with fake backends:
a model that cannot load, one that dies mid-session, a remote fallback that goes down
and comes back, and hover served by a model of its own."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from exlsp.completion import service as service_module
from exlsp.completion.assist.assistant import HoverConfig
from exlsp.completion.assist.service import AssistService
from exlsp.completion.backends.base import BackendDied, GenerationJob, ModelInfo
from exlsp.completion.config import (
    AssistModelConfig,
    CompletionConfig,
    EngineConfig,
    ModelConfig,
    fallback_chain,
)
from exlsp.completion.service import CompletionService, ModelLoadError
from exlsp.completion.types import CompletionRequest, DocumentView
from exlsp.server.config import Config, drop_user_only, merge
from exlsp.server.documents import split_lines
from tests.fakes import CharTokenizer, ScriptedBackend, ScriptedRun
from tests.openai_fake_server import FakeOpenAIServer, streamed
from tests.test_assist import CHAT_SPECIALS, QWEN_CHAT

FIM = "qwen2.5-coder"


def req(n: int) -> CompletionRequest:
    """A request on a document of its own (no answer comes from an earlier one's cache)."""
    text = f"def add{n}(a, b):\n    \n\nprint(add{n}(1, 2))\n"
    return CompletionRequest(DocumentView(f"file:///m{n}.py", split_lines(text), 1, 4, "python"))


class DyingBackend(ScriptedBackend):
    """Serves `healthy_jobs` jobs, then raises `error` in every job."""

    def __init__(self, error: BaseException, healthy_jobs: int = 1, text: str = "return a + b"):
        super().__init__(CharTokenizer(), lambda prompt: text)
        self.error = error
        self.healthy_jobs = healthy_jobs
        self.closed = False

    def start(self, job: GenerationJob) -> ScriptedRun:
        if len(self.jobs) >= self.healthy_jobs:
            self.jobs.append(job)
            raise self.error
        return super().start(job)

    def close(self) -> None:
        self.closed = True


def scripted(text: str, path: str = "<scripted>") -> ScriptedBackend:
    backend = ScriptedBackend(CharTokenizer(CHAT_SPECIALS), lambda prompt: text)
    backend.info = ModelInfo(path=path, backend="scripted")
    return backend


@pytest.fixture
def backends(monkeypatch: pytest.MonkeyPatch) -> dict[str, Callable[[], Any]]:
    """Backends by model path; any other local path does not load (openai: the real one)."""
    made: dict[str, Callable[[], Any]] = {}
    real = service_module.create_backend

    def create(model: ModelConfig) -> Any:
        if model.backend == "openai":
            return real(model)
        if model.path not in made:
            raise ModelLoadError(f"model directory not found: {model.path}")
        return made[model.path]()

    monkeypatch.setattr(service_module, "create_backend", create)
    return made


@pytest.fixture
async def services() -> AsyncIterator[Callable[..., Any]]:
    made: list[CompletionService] = []

    async def make(model: ModelConfig) -> CompletionService:
        # Prefetching and counting add background jobs and files: not what is tested here.
        completion = CompletionConfig(prefetch=False, acceptanceStats=False)
        svc = CompletionService(EngineConfig(model=model, completion=completion))
        svc.changes = 0  # type: ignore[attr-defined]

        def changed() -> None:
            svc.changes += 1  # type: ignore[attr-defined]

        svc.on_change = changed
        await svc.start()
        made.append(svc)
        return svc

    yield make
    for svc in made:
        await svc.aclose()


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


def texts(result: Any) -> list[str]:
    return [s.text for s in result.suggestions]


# -- configuration -----------------------------------------------------------------------------


def test_fallback_entries_are_partial_model_trees_applied_over_the_model() -> None:
    config, errors = merge(
        Config(),
        {
            "model": {
                "path": "/models/big-exl2",
                "backend": "exllamav2",
                "device": "cuda",
                "fallback": [
                    {"backend": "Transformers"},
                    {"backend": "openai", "baseUrl": "http://pool:8000/v1", "apiKey": "sk-x"},
                    {"backend": "transformers", "path": "", "device": "cpu"},
                ],
            }
        },
    )
    assert errors == []
    chain = fallback_chain(config.model)
    assert [(m.backend, m.path, m.device) for m in chain] == [
        ("exllamav2", "/models/big-exl2", "cuda"),
        ("transformers", "/models/big-exl2", "cuda"),
        ("openai", "/models/big-exl2", "cuda"),
        ("transformers", "", "cpu"),
    ]
    assert chain[2].baseUrl == "http://pool:8000/v1" and chain[2].apiKey == "sk-x"
    assert all(m.fallback == [] for m in chain)


def test_a_bad_fallback_entry_is_reported_without_echoing_a_key() -> None:
    base = Config()
    for bad, says in [
        ({"fallback": {"backend": "openai"}}, "expected a list"),
        ({"fallback": [{"backend": "vllm"}]}, "entry 1: backend: expected one of"),
        ({"fallback": [{"path": "/m"}, {"device": 3}]}, "entry 2: device: expected a string"),
        ({"fallback": [{"modelPath": "/m"}]}, "entry 1: modelPath: unknown setting"),
        ({"fallback": [{"fallback": []}]}, "no fallback of its own"),
        ({"fallback": ["transformers"]}, "expected an object"),
    ]:
        config, errors = merge(base, {"model": bad})
        assert config.model.fallback == [], bad
        assert len(errors) == 1 and says in errors[0], (bad, errors)
    config, errors = merge(base, {"model": {"fallback": [{"apiKey": 12345, "baseUrl": 7}]}})
    assert len(errors) == 1 and "apiKey" in errors[0] and "12345" not in errors[0]


def test_the_workspace_cannot_choose_the_fallback_or_the_assist_model() -> None:
    wire = {
        "model": {"fallback": [{"backend": "openai", "baseUrl": "http://evil:1/v1"}]},
        "assist": {
            "backend": "openai",
            "baseUrl": "http://evil:1/v1",
            "apiKeyEnv": "EXLSP_OTHER",
            "path": "/tmp/m",
            "device": "cpu",
        },
    }
    kept, dropped = drop_user_only(Config(), wire)
    assert kept == {"model": {}, "assist": {"device": "cpu"}}
    assert sorted(dropped) == [
        "assist.apiKeyEnv",
        "assist.backend",
        "assist.baseUrl",
        "assist.path",
        "model.fallback",
    ]


def test_the_assist_model_is_the_completion_model_unless_a_backend_is_set() -> None:
    assert AssistModelConfig().model_config() is None
    config, errors = merge(Config(), {"assist": {"path": "/models/instruct"}})
    assert errors == [] and config.assist.model_config() is None
    config, errors = merge(
        Config(), {"assist": {"backend": "transformers", "path": "/models/instruct"}}
    )
    model = config.assist.model_config()
    assert errors == [] and model is not None
    assert (model.backend, model.path, model.fallback) == ("transformers", "/models/instruct", [])
    _, errors = merge(Config(), {"assist": {"backend": "llama", "apiKeyEnv": "GITHUB_TOKEN"}})
    assert len(errors) == 2


def test_a_change_of_the_assist_model_reloads_the_models() -> None:
    from types import SimpleNamespace

    from exlsp.server.features.configuration import apply_settings

    ls: Any = SimpleNamespace(
        config=Config(),
        service=None,
        index_changed=False,
        show_once=lambda *args: None,
        apply_logging=lambda: None,
    )
    assert apply_settings(ls, {"assist": {"device": "cpu"}}, "settings")
    assert ls.config.assist.device == "cpu"
    assert not apply_settings(ls, {"hover": {"maxTokens": 10}}, "settings")


# -- a model that cannot load ------------------------------------------------------------------


async def test_the_first_model_that_loads_serves(backends, services) -> None:  # type: ignore[no-untyped-def]
    backends["/steady"] = lambda: scripted("return a + b")
    svc = await services(
        ModelConfig(path="/missing", fimTemplate=FIM, fallback=[{"path": "/steady"}])
    )
    assert svc.state == "ready" and svc.serving == 1
    assert svc.serving_label == "transformers /steady"
    assert svc.failures == [
        "transformers /missing could not be loaded: model directory not found: /missing"
    ]
    note = svc.fallback_note()
    assert note is not None and note.endswith("; transformers /steady serves instead")
    assert texts(await svc.complete(req(1))) == ["return a + b"]
    assert svc.changes == 0  # the server reports the load itself


async def test_without_a_fallback_the_load_error_is_the_error(backends, services) -> None:  # type: ignore[no-untyped-def]
    svc = await services(ModelConfig(path="/missing", fimTemplate=FIM))
    assert svc.state == "error" and svc.serving is None
    assert svc.error == "model directory not found: /missing"
    assert svc.fallback_note() is None
    both = await services(ModelConfig(path="/missing", fimTemplate=FIM, fallback=[{"path": "/x"}]))
    assert both.state == "error"
    assert both.error is not None and "/missing" in both.error and "/x" in both.error


async def test_the_first_model_serves_when_it_loads(backends, services) -> None:  # type: ignore[no-untyped-def]
    backends["/a"] = lambda: scripted("return a")
    backends["/b"] = lambda: scripted("return b")
    svc = await services(ModelConfig(path="/a", fimTemplate=FIM, fallback=[{"path": "/b"}]))
    assert svc.serving == 0 and svc.failures == [] and svc.fallback_note() is None
    assert texts(await svc.complete(req(1))) == ["return a"]


# -- a model that dies mid-session -------------------------------------------------------------


async def test_a_model_that_dies_is_replaced_by_the_next_without_user_action(
    backends, services
) -> None:  # type: ignore[no-untyped-def]
    dying = DyingBackend(BackendDied("injected: GPU out of memory"), healthy_jobs=1)
    backends["/dying"] = lambda: dying
    backends["/steady"] = lambda: scripted("return b + a")
    svc = await services(
        ModelConfig(path="/dying", fimTemplate=FIM, fallback=[{"path": "/steady"}])
    )
    assert svc.serving == 0
    assert texts(await svc.complete(req(1))) == ["return a + b"]
    died = await svc.complete(req(2))
    assert died.suggestions == [] and "injected: GPU out of memory" in (died.error or "")
    await until(lambda: svc.changes == 1)
    assert svc.state == "ready" and svc.serving == 1 and dying.closed
    assert svc.failures == ["transformers /dying stopped: injected: GPU out of memory"]
    assert svc.fallback_note() == (
        "transformers /dying stopped: injected: GPU out of memory; "
        "transformers /steady serves instead"
    )
    assert texts(await svc.complete(req(3))) == ["return b + a"]
    assert len(dying.jobs) == 2


async def test_a_cuda_error_is_fatal_and_the_last_model_dying_leaves_an_error(
    backends, services
) -> None:  # type: ignore[no-untyped-def]
    backends["/dying"] = lambda: DyingBackend(RuntimeError("CUDA error: an illegal memory access"))
    svc = await services(ModelConfig(path="/dying", fimTemplate=FIM))
    assert texts(await svc.complete(req(1))) == ["return a + b"]
    assert (await svc.complete(req(2))).suggestions == []
    await until(lambda: svc.changes == 1)
    assert svc.state == "error" and svc.serving is None and svc.engine is None
    assert svc.error == "transformers /dying stopped: CUDA error: an illegal memory access"
    assert (await svc.complete(req(3))).error == svc.error


async def test_an_error_the_backend_survives_does_not_switch(backends, services) -> None:  # type: ignore[no-untyped-def]
    backends["/flaky"] = lambda: DyingBackend(RuntimeError("a bad prompt"), healthy_jobs=0)
    backends["/steady"] = lambda: scripted("return b + a")
    svc = await services(
        ModelConfig(path="/flaky", fimTemplate=FIM, fallback=[{"path": "/steady"}])
    )
    with pytest.raises(RuntimeError, match="a bad prompt"):
        await svc.complete(req(1))
    await asyncio.sleep(0.05)
    assert svc.serving == 0 and svc.changes == 0 and svc.failures == []


# -- a remote fallback that goes down and comes back -------------------------------------------


async def test_a_remote_fallback_recovers_by_itself(backends, services) -> None:  # type: ignore[no-untyped-def]
    fake = FakeOpenAIServer()
    url = fake.start()
    try:
        remote = {"backend": "openai", "baseUrl": url, "path": ""}
        svc = await services(ModelConfig(path="/missing", fimTemplate=FIM, fallback=[remote]))
        assert svc.serving == 1 and svc.serving_label == f"openai at {url}"
        fake.status = 503
        down = await svc.complete(req(1))
        assert down.suggestions == [] and "HTTP 503" in (down.error or "")
        # An outage is not a death: the remote stays, and is tried again after its back-off.
        assert svc.serving == 1 and svc.state == "ready" and svc.changes == 0
        fake.status = 200
        fake.script = lambda body: streamed("return a + b")
        assert svc.backend is not None
        svc.backend.health.retry_at = 0.0  # type: ignore[attr-defined]
        back = await svc.complete(req(2))
        assert texts(back) == ["return a + b"] and back.error is None
        assert svc.serving == 1 and svc.failures[0].startswith("transformers /missing")
    finally:
        fake.stop()


# -- the assist model --------------------------------------------------------------------------

SOURCE = "def area(radius):\n    return 3.14 * radius * radius\n"


def chat_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "instruct"
    folder.mkdir()
    (folder / "chat_template.jinja").write_text(QWEN_CHAT, encoding="utf-8")
    return folder


async def explain(assist: AssistService) -> str | None:
    assistant = assist.assistant
    assert assistant is not None
    explanation = await assistant.explain(
        split_lines(SOURCE), "python", 0, 5, HoverConfig(deadlineMs=5000)
    )
    return explanation.text if explanation is not None else None


async def test_hover_runs_on_the_assist_model_when_one_is_set(backends, services, tmp_path) -> None:  # type: ignore[no-untyped-def]
    folder = chat_dir(tmp_path)
    completion = scripted("return a + b")
    instruct = scripted("Computes the area of a circle.", path=str(folder))
    backends["/coder"] = lambda: completion
    backends["/instruct"] = lambda: instruct
    svc = await services(ModelConfig(path="/coder", fimTemplate=FIM))
    assist = AssistService(svc, ModelConfig(backend="transformers", path="/instruct"))
    assert assist.assistant is None and assist.stats()["state"] == "idle"
    await assist.start()
    try:
        assert await explain(assist) == "Computes the area of a circle."
        assert len(instruct.jobs) == 1 and completion.jobs == []
        stats = assist.stats()
        assert stats["separate"] and stats["state"] == "ready" and stats["mode"] == "chat"
        assert stats["model"]["path"] == str(folder) and stats["jobs"] == 1
        assert assist.assistant is not None and assist.assistant.worker is not svc.worker
    finally:
        await assist.aclose()


async def test_an_assist_model_that_cannot_load_leaves_hover_to_the_completion_model(
    backends, services
) -> None:  # type: ignore[no-untyped-def]
    completion = scripted("return a + b")
    backends["/coder"] = lambda: completion
    svc = await services(ModelConfig(path="/coder", fimTemplate=FIM))
    assist = AssistService(svc, ModelConfig(backend="transformers", path="/missing"))
    await assist.start()
    assert assist.state == "error" and "/missing" in (assist.error or "")
    assistant = assist.assistant
    assert assistant is not None and assistant.worker is svc.worker
    assert assist.stats()["model"]["path"] == "<scripted>"


async def test_the_shared_assistant_follows_a_fallback(backends, services, tmp_path) -> None:  # type: ignore[no-untyped-def]
    folder = chat_dir(tmp_path)
    dying = DyingBackend(BackendDied("gone"), healthy_jobs=0)
    backends["/dying"] = lambda: dying
    steady = scripted("Returns the area.", path=str(folder))
    backends["/steady"] = lambda: steady
    svc = await services(
        ModelConfig(path="/dying", fimTemplate=FIM, fallback=[{"path": "/steady"}])
    )
    assist = AssistService(svc)
    first = assist.assistant
    assert first is not None and first.worker is svc.worker and first.mode == "fim"
    await svc.complete(req(1))
    await until(lambda: svc.changes == 1)
    assert svc.serving == 1
    assert await explain(assist) == "Returns the area."
    assistant = assist.assistant
    assert assistant is not None and assistant is not first and assistant.mode == "chat"
    assert dataclasses.asdict(steady.info) == assist.stats()["model"]


def test_a_remote_models_chat_template_comes_only_from_its_tokenizer_folder(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from exlsp.completion.assist.service import model_dir

    named = scripted("", path="tiny-instruct")  # a served model's name, not a folder
    assert model_dir(ModelConfig(backend="openai"), named) is None
    folder = chat_dir(tmp_path)
    assert model_dir(ModelConfig(backend="openai", path=str(folder)), named) == folder
    assert model_dir(ModelConfig(path="/m"), scripted("", path=str(folder))) == folder
