"""The model host: one process per user and model configuration that owns the
model, its worker thread and KV cache slots; every `exlsp serve` connects to it.

`make_worker` is the one place that chooses between the host and a worker
thread in this process (`model.host`, overridden by `$EXLSP_MODEL_HOST`).
"""

from __future__ import annotations

import os

from exlsp.completion.config import ModelConfig
from exlsp.completion.worker import BackendWorker, ModelWorker

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
