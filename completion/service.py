"""One model, served: the backend worker, the FIM template and the engine.

Loading happens on the worker thread; until it is done (or when it failed)
requests answer with an empty result and the reason, never an exception.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from pathlib import Path

from exlsp.completion.acceptance import AcceptanceStats
from exlsp.completion.backends.base import Backend, BackendUnavailable
from exlsp.completion.config import CompletionConfig, EngineConfig, ModelConfig
from exlsp.completion.engine import CompletionEngine, PartialCallback
from exlsp.completion.fim import resolve_template
from exlsp.completion.types import (
    CompletionRequest,
    CompletionResult,
    CompletionStats,
    ContextSource,
)
from exlsp.completion.worker import BackendWorker

log = logging.getLogger(__name__)

BACKENDS = ("transformers", "exllamav2", "openai", "instant")


class ModelLoadError(RuntimeError):
    """The configured model cannot be served; the message is shown to the user."""


# The built-in default model ships in the package (benchmarks/train_default_model.py).
SHIPPED_MODEL_DIR = Path(__file__).resolve().parent / "default_model"


def shipped_model_dir() -> Path | None:
    return SHIPPED_MODEL_DIR if (SHIPPED_MODEL_DIR / "config.json").is_file() else None


def resolve_model_dir(model: ModelConfig) -> Path:
    if model.path:
        path = Path(model.path).expanduser()
        if not path.is_dir():
            raise ModelLoadError(f"model directory not found: {path}")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"not a model directory (no config.json): {path}")
        return path
    # No model configured: the built-in default model, shipped in the package; an
    # install without it builds a tiny stand-in locally on first use.
    shipped = shipped_model_dir()
    if shipped is not None:
        return shipped
    from exlsp.benchmarks.build_model import default_model_dir

    return default_model_dir()


def fit_budgets(completion: CompletionConfig, context_length: int) -> CompletionConfig:
    """The prompt budgets scaled down, in proportion, so that prompt and reply fit
    the model's context (a backend cuts an overlong prompt from its start, FIM
    markers included)."""
    budgets = (
        completion.prefixTokens,
        completion.suffixTokens,
        completion.middleTokens,
        completion.snippetTokens,
    )
    room = context_length - max(completion.maxTokens, completion.maxTokensSingleLine) - 16
    if room <= 0 or sum(budgets) <= room:
        return completion
    prefix, suffix, middle, snippets = (b * room // sum(budgets) for b in budgets)
    return dataclasses.replace(
        completion,
        prefixTokens=prefix,
        suffixTokens=suffix,
        middleTokens=middle,
        snippetTokens=snippets,
    )


def create_backend(model: ModelConfig) -> Backend:
    """Load the configured backend. Blocking: call it on the backend worker thread."""
    if model.backend not in BACKENDS:
        raise ModelLoadError(f"unknown backend {model.backend!r}; one of {', '.join(BACKENDS)}")
    if model.backend == "openai":
        # A remote server: `path` is only the served model's tokenizer, and optional.
        from exlsp.completion.backends.openai_backend import (
            RemoteConfigError,
            load_openai_backend,
        )

        try:
            return load_openai_backend(model)
        except RemoteConfigError as e:
            raise ModelLoadError(str(e)) from e
        except Exception as e:
            raise ModelLoadError(f"cannot start the openai backend: {e}") from e
    path = resolve_model_dir(model)
    try:
        if model.backend == "transformers":
            from exlsp.completion.backends.transformers_backend import TransformersBackend

            return TransformersBackend(model, path)
        if model.backend == "exllamav2":
            from exlsp.completion.backends.exllamav2_backend import load_exllamav2_backend

            return load_exllamav2_backend(dataclasses.replace(model, path=str(path)))
        if model.backend == "instant":
            from exlsp.completion.backends.instant import InstantBackend

            return InstantBackend(path)
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"cannot load {path} with {model.backend}: {e}") from e
    raise ModelLoadError(f"the {model.backend} backend is not available in this version")


class CompletionService:
    def __init__(self, config: EngineConfig, context: ContextSource | None = None) -> None:
        self.config = config
        self.context = context
        self.worker: BackendWorker | None = None
        self.engine: CompletionEngine | None = None
        self.state = "idle"  # idle, loading, ready, error
        self.error: str | None = None
        self.load_ms: float | None = None
        self.context_length = 0
        self.acceptance = AcceptanceStats(enabled=config.completion.acceptanceStats)

    @property
    def backend(self) -> Backend | None:
        return self.worker.backend if self.worker else None

    async def start(self) -> None:
        """Load the model; on failure record the reason (the server stays up)."""
        self.state = "loading"
        t0 = time.perf_counter()
        self.worker = BackendWorker(self.config.model.backend)
        model = self.config.model
        try:
            backend = await self.worker.load(lambda: create_backend(model))
            fim = resolve_template(model.fimTemplate, backend.tokenizer, Path(backend.info.path))
        except Exception as e:
            self.state = "error"
            self.error = str(e)
            log.error("model failed to load: %s", e)
            self.worker.close()
            self.worker = None
            return
        self.context_length = backend.info.context_length
        self.engine = CompletionEngine(
            self.worker,
            backend.tokenizer,
            fim,
            fit_budgets(self.config.completion, self.context_length),
            self.context,
        )
        self.load_ms = (time.perf_counter() - t0) * 1000
        self.state = "ready"
        self.error = None
        log.info(
            "model ready: %s (%s, %s template, %s) in %.0f ms",
            backend.info.path,
            backend.name,
            fim.template.family,
            backend.info.device,
            self.load_ms,
        )

    async def complete(
        self, request: CompletionRequest, on_partial: PartialCallback | None = None
    ) -> CompletionResult:
        if self.engine is None or not self.config.completion.enabled:
            reason = self.error if self.state == "error" else f"model {self.state}"
            return CompletionResult([], CompletionStats(source="empty"), error=reason)
        try:
            return await self.engine.complete(request, on_partial)
        except BackendUnavailable as e:
            # A remote outage: an empty answer with the reason, for the status line.
            stats = CompletionStats(source="error", stop_reason="unavailable")
            return CompletionResult([], stats, error=str(e))

    def reconfigure(self, completion: CompletionConfig) -> None:
        self.config = dataclasses.replace(self.config, completion=completion)
        self.acceptance.enabled = completion.acceptanceStats
        if self.engine is not None:
            self.engine.reconfigure(fit_budgets(completion, self.context_length))

    def close(self) -> None:
        self.acceptance.close()
        if self.engine is not None:
            self.engine.close()
        if self.worker is not None:
            self.worker.close()
            self.worker = None
        self.engine = None
        self.state = "idle"

    async def aclose(self) -> None:
        """`close` from the event loop: the worker thread is joined off the loop."""
        if self.engine is not None:
            self.engine.close()  # its timers belong to the loop
            self.engine = None
        await asyncio.to_thread(self.acceptance.close)
        worker, self.worker = self.worker, None
        if worker is not None:
            await asyncio.to_thread(worker.close)
        self.state = "idle"
