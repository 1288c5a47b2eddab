"""One model, served: the backend worker, the FIM template and the engine.

Loading happens on the worker thread; until it is done (or when it failed)
requests answer with an empty result and the reason, never an exception.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path

from exlsp.completion.acceptance import AcceptanceStats
from exlsp.completion.backends.base import Backend, BackendUnavailable, is_fatal
from exlsp.completion.builtin_model import default_model_dir
from exlsp.completion.config import (
    CompletionConfig,
    EngineConfig,
    ModelConfig,
    fallback_chain,
)
from exlsp.completion.engine import CompletionEngine, PartialCallback
from exlsp.completion.fim import resolve_template
from exlsp.completion.host import make_worker
from exlsp.completion.types import (
    CompletionRequest,
    CompletionResult,
    CompletionStats,
    ContextSource,
)
from exlsp.completion.worker import ModelWorker

log = logging.getLogger(__name__)

BACKENDS = ("transformers", "exllamav2", "exllamav3", "openai", "instant")


class ModelLoadError(RuntimeError):
    """The configured model cannot be served; the message is shown to the user."""


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
        from exlsp.completion.backends.openai import (
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
    if model.backend == "transformers" and not any(path.glob("*.safetensors")):
        raise ModelLoadError(
            f"no .safetensors weights in {path}: exlsp loads safetensors only, never pickled"
            " .bin/.pt weights (they can run code when loaded); save the model with"
            " transformers' save_pretrained(..., safe_serialization=True)"
        )
    try:
        if model.backend == "transformers":
            from exlsp.completion.backends.transformers_backend import TransformersBackend

            return TransformersBackend(model, path)
        if model.backend == "exllamav2":
            from exlsp.completion.backends.exllamav2 import load_exllamav2_backend

            return load_exllamav2_backend(dataclasses.replace(model, path=str(path)))
        if model.backend == "exllamav3":
            from exlsp.completion.backends.exllamav3 import load_exllamav3_backend

            return load_exllamav3_backend(dataclasses.replace(model, path=str(path)))
        from exlsp.completion.backends.instant import InstantBackend  # the last of BACKENDS

        return InstantBackend(path)
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"cannot load {path} with {model.backend}: {e}") from e


def describe_model(model: ModelConfig) -> str:
    """A model configuration in a few words, for the status and messages."""
    if model.backend == "openai":
        name = f" {model.remoteModel}" if model.remoteModel else ""
        return f"openai{name} at {model.baseUrl or '(no baseUrl)'}"
    where = f" on {model.device}" if model.device != "auto" else ""
    return f"{model.backend} {model.path or 'built-in model'}{where}"


class CompletionService:
    """The completion model: the first of the fallback chain (`model`, then each
    `model.fallback` entry) that loads, replaced by the next one if it dies."""

    def __init__(self, config: EngineConfig, context: ContextSource | None = None) -> None:
        self.config = config
        self.context = context
        self.chain = fallback_chain(config.model)
        self.worker: ModelWorker | None = None
        self.engine: CompletionEngine | None = None
        self.state = "idle"  # idle, loading, ready, error
        self.error: str | None = None
        self.load_ms: float | None = None
        self.context_length = 0
        self.serving: int | None = None  # the index in `chain` of what serves now
        self.failures: list[str] = []  # what could not load or died, in order
        # Called on the event loop when what serves changes after `start` (a fallback
        # took over from a model that died, or none is left).
        self.on_change: Callable[[], None] | None = None
        # Called on the event loop with a message for the user about the model host
        # (it died and is being started again).
        self.on_notice: Callable[[str], None] | None = None
        self._failover: asyncio.Task[None] | None = None
        self.acceptance = AcceptanceStats(enabled=config.completion.acceptanceStats)

    @property
    def backend(self) -> Backend | None:
        return self.worker.backend if self.worker else None

    @property
    def serving_model(self) -> ModelConfig | None:
        return self.chain[self.serving] if self.serving is not None else None

    @property
    def serving_label(self) -> str | None:
        model = self.serving_model
        return describe_model(model) if model is not None else None

    def fallback_note(self) -> str | None:
        """Why a fallback serves, for one message to the user; None when the first does."""
        if not self.serving or not self.failures:
            return None
        return f"{'; '.join(self.failures)}; {self.serving_label} serves instead"

    async def start(self) -> None:
        """Load the model; on failure record the reason (the server stays up)."""
        self.failures = []
        await self._serve_from(0)

    async def _serve_from(self, first: int) -> None:
        """Serve with the first model of `chain[first:]` that loads."""
        self.state = "loading"
        self.serving = None
        last_error = ""
        loop = asyncio.get_running_loop()
        for index in range(first, len(self.chain)):
            model = self.chain[index]
            t0 = time.perf_counter()
            worker = self.worker = make_worker(model, model.backend)
            if hasattr(worker, "on_notice"):
                worker.on_notice = self._notice
            try:
                backend = await worker.load(functools.partial(create_backend, model))
                fim = resolve_template(
                    model.fimTemplate, backend.tokenizer, Path(backend.info.path)
                )
            except Exception as e:
                last_error = str(e)
                self.failures.append(f"{describe_model(model)} could not be loaded: {e}")
                log.error("model failed to load: %s", e)
                if self.worker is worker:
                    self.worker = None
                await asyncio.to_thread(worker.close)
                if self.worker is not None or self.state != "loading":
                    return  # closed meanwhile
                continue
            if self.worker is not worker:  # closed meanwhile
                await asyncio.to_thread(worker.close)
                return
            worker.on_fatal = functools.partial(self._died_on_thread, loop, worker)
            self.context_length = backend.info.context_length
            self.engine = CompletionEngine(
                worker,
                backend.tokenizer,
                fim,
                fit_budgets(self.config.completion, self.context_length),
                self.context,
            )
            self.load_ms = (time.perf_counter() - t0) * 1000
            self.serving = index
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
            return
        self.state = "error"
        self.error = (
            last_error
            if len(self.chain) == 1
            else "no model could be served: " + "; ".join(self.failures)
        )

    def _notice(self, message: str) -> None:
        if self.on_notice is not None:
            self.on_notice(message)

    def _died_on_thread(
        self, loop: asyncio.AbstractEventLoop, worker: ModelWorker, error: BaseException
    ) -> None:
        loop.call_soon_threadsafe(self._died, worker, error)

    def _died(self, worker: ModelWorker, error: BaseException) -> None:
        """A fatal error on `worker`: serve with the next model of the chain."""
        if worker is not self.worker or self.serving is None:
            return  # already replaced
        label = self.serving_label
        self.failures.append(f"{label} stopped: {error}")
        log.error("the model stopped (%s): %s", label, error)
        self._failover = asyncio.get_running_loop().create_task(self._fail_over(self.serving + 1))

    async def _fail_over(self, first: int) -> None:
        worker, self.worker = self.worker, None
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        if worker is not None:
            await asyncio.to_thread(worker.close)
        if first < len(self.chain):
            await self._serve_from(first)
        else:
            self.serving = None
            self.state = "error"
            self.error = self.failures[-1]
        if self.on_change is not None:
            self.on_change()

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
        except Exception as e:
            if not is_fatal(e):
                raise
            # The fallback takes over (see `_died`); this request answers empty.
            stats = CompletionStats(source="error", stop_reason="error")
            return CompletionResult([], stats, error=f"the model stopped: {e}")

    def reconfigure(self, completion: CompletionConfig) -> None:
        self.config = dataclasses.replace(self.config, completion=completion)
        self.acceptance.enabled = completion.acceptanceStats
        if self.engine is not None:
            self.engine.reconfigure(fit_budgets(completion, self.context_length))

    def set_context(self, context: ContextSource | None) -> None:
        self.context = context
        if self.engine is not None:
            self.engine.set_context(context)

    def close(self) -> None:
        if self._failover is not None:
            self._failover.cancel()
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
        if self._failover is not None:
            self._failover.cancel()
        if self.engine is not None:
            self.engine.close()  # its timers belong to the loop
            self.engine = None
        await asyncio.to_thread(self.acceptance.close)
        worker, self.worker = self.worker, None
        if worker is not None and self.state == "loading":
            worker.close(wait=False)  # `start` is cancelled; the load ends off the loop
        elif worker is not None:
            await asyncio.to_thread(worker.close)
        self.state = "idle"
