"""The model host: one process per user and model configuration that owns the
model, its worker thread and KV cache slots; every `exlsp serve` connects to it.

`make_worker` is the one place that chooses between the host and a worker
thread in this process (`model.host`, overridden by `$EXLSP_MODEL_HOST`);
`host_embedder` the one that chooses the same for the index's embedding model
(None: the index loads it in this process).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from exlsp.completion.config import ModelConfig
from exlsp.completion.worker import BackendWorker, ModelWorker

if TYPE_CHECKING:
    from exlsp.completion.host.embedder import HostEmbedder

HOST_MODES = ("auto", "off")


def host_mode(model: ModelConfig) -> str:
    env = os.environ.get("EXLSP_MODEL_HOST", "").strip().lower()
    return env if env in HOST_MODES else model.host


def uses_host(model: ModelConfig) -> bool:
    # The openai backend holds no model (a remote server does): nothing to share.
    return host_mode(model) != "off" and model.backend != "openai"


def make_worker(model: ModelConfig, name: str) -> ModelWorker:
    if uses_host(model):
        from exlsp.completion.host.client import HostWorker

        return HostWorker(model, name)
    return BackendWorker(name)


class EmbeddingModel(Protocol):
    """The index's embedding settings (`exlsp.index.embed.EmbedderSettings`)."""

    @property
    def name(self) -> str: ...

    @property
    def path(self) -> Path: ...

    @property
    def dim(self) -> int: ...

    @property
    def device(self) -> str: ...

    @property
    def batch_size(self) -> int: ...


def host_embedder(model: ModelConfig, settings: EmbeddingModel | None) -> HostEmbedder | None:
    """The index's embedder in the host of `model`, or None (no model, or no host)."""
    if settings is None or not uses_host(model):
        return None
    from exlsp.completion.host.embedder import HostEmbedder

    return HostEmbedder(
        model, settings.name, settings.path, settings.dim, settings.device, settings.batch_size
    )
