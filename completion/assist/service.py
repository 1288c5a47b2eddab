"""The model behind hover and code actions (`AssistService`) and its one `Assistant`."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exlsp.completion.assist.assistant import Assistant
from exlsp.completion.assist.prompts import read_chat_template
from exlsp.completion.backends.base import Backend
from exlsp.completion.config import ModelConfig
from exlsp.completion.fim import FimTokens
from exlsp.completion.worker import ModelWorker

if TYPE_CHECKING:
    from exlsp.completion.service import CompletionService

log = logging.getLogger(__name__)


def model_dir(model: ModelConfig, backend: Backend) -> Path | None:
    """The loaded model's directory (its chat template); for a remote server, the
    tokenizer directory configured for it, if any (its `info.path` may be a name)."""
    if model.backend == "openai":
        return Path(model.path).expanduser() if model.path else None
    return Path(backend.info.path)


class AssistService:
    """The model behind hover and code actions, and its one `Assistant`.

    Without a model of its own (`assist.backend` empty) the completion model
    serves: its assistant runs background jobs on the completion worker, which
    completions preempt, and follows it when a fallback takes over. With one, a
    second backend loads on its own worker after the completion model; until it
    is ready there is no assistant, and if it cannot load the completion model
    serves instead.
    """

    def __init__(self, completion: CompletionService, model: ModelConfig | None = None) -> None:
        self.completion = completion
        self.model = model
        self.worker: ModelWorker | None = None
        self.state = "shared" if model is None else "idle"  # shared, idle, loading, ready, error
        self.error: str | None = None
        self._own: Assistant | None = None
        self._shared: Assistant | None = None

    @property
    def separate(self) -> bool:
        return self.model is not None

    async def start(self) -> None:
        """Load the separate assist model, if any; on failure record the reason."""
        if self.model is None:
            return
        from exlsp.completion.fim import resolve_template
        from exlsp.completion.host import make_worker
        from exlsp.completion.service import create_backend

        model = self.model
        self.state = "loading"
        worker = self.worker = make_worker(model, "assist")
        try:
            backend = await worker.load(lambda: create_backend(model))
            fim: FimTokens | None
            try:
                fim = resolve_template(
                    model.fimTemplate, backend.tokenizer, Path(backend.info.path)
                )
            except Exception:
                fim = None  # an instruct model without FIM tokens: chat prompts only
            template = read_chat_template(model_dir(model, backend))
            if template is None and fim is None:
                raise RuntimeError(
                    f"{backend.info.path or model.baseUrl} has no chat template and no "
                    "fill-in-the-middle tokens: it can neither explain nor refactor"
                )
        except Exception as e:
            self.state = "error"
            self.error = str(e)
            log.error("the assist model failed to load: %s", e)
            if self.worker is worker:
                self.worker = None
            await asyncio.to_thread(worker.close)
            return
        if self.worker is not worker:  # closed meanwhile
            await asyncio.to_thread(worker.close)
            return
        self._own = Assistant(worker, backend.tokenizer, fim, template)
        self.state = "ready"
        self.error = None
        log.info(
            "assist model ready: %s (%s, %s prompts, %s)",
            backend.info.path,
            backend.name,
            self._own.mode,
            backend.info.device,
        )

    @property
    def backend(self) -> Backend | None:
        """The backend that serves hover and code actions now (None: none yet)."""
        if self._own is not None:
            return self._own.worker.backend
        if self.state in ("loading", "idle"):
            return None
        return self.completion.backend

    @property
    def assistant(self) -> Assistant | None:
        """The assistant to use now; None while no model is ready."""
        if self._own is not None:
            return self._own
        if self.state in ("loading", "idle"):
            return None  # the separate model is coming: do not wait on the other one
        service = self.completion
        if service.engine is None or service.worker is None:
            return None
        shared = self._shared
        if shared is None or shared.worker is not service.worker:
            # The first use, or a fallback took over: the new model's own prompts.
            backend = service.backend
            served = service.serving_model
            folder = model_dir(served, backend) if backend and served else None
            engine = service.engine
            shared = self._shared = Assistant(
                service.worker, engine.tokenizer, engine.fim, read_chat_template(folder)
            )
        return shared

    def stats(self) -> dict[str, Any]:
        """What serves hover and code actions, and what it did, for `exlsp/stats`."""
        backend = self.backend
        assistant = self._own or self._shared
        memory = None
        if self._own is not None and backend is not None:
            # A separate model's weights (exllamav2: its VRAM, KV caches included).
            memory = getattr(backend, "vram_bytes", None) or getattr(backend, "weight_bytes", None)
        return {
            "separate": self.separate,
            "state": self.state,
            "error": self.error,
            "model": dataclasses.asdict(backend.info) if backend is not None else None,
            "memoryBytes": memory,
            "mode": assistant.mode if assistant is not None else None,
            "jobs": assistant.jobs if assistant is not None else 0,
        }

    def close(self) -> None:
        worker, self.worker = self.worker, None
        self._own = None
        if worker is not None:
            worker.close()

    async def aclose(self) -> None:
        worker, self.worker = self.worker, None
        self._own = None
        if worker is not None and self.state == "loading":
            worker.close(wait=False)  # `start` is cancelled; the load ends off the loop
        elif worker is not None:
            await asyncio.to_thread(worker.close)


def assistant_for(service: CompletionService) -> Assistant | None:
    """An Assistant on a loaded CompletionService's own model (None until it is ready).

    A new one per call (its answer cache included): a server keeps its one
    `AssistService`; this serves scripts that hold only a CompletionService."""
    return AssistService(service).assistant
