"""The workspace index's embedding models, held by the model host.

One host per user and completion model also holds the embedding model of every
index configuration its servers ask for (keyed by name, folder, device and batch
size), so that an `exlsp serve` never imports torch. The models run on two
threads of their own, never on the event loop and never on the model worker:

- `batch`: the index's backlog. A request is embedded in chunks of the
  configuration's batch size, and before each chunk the work waits (up to
  `YIELD_MAX_S`) while the model worker has a completion to compute, so a
  completion waits behind one chunk at most, whatever the request's size.
- `query`: one search text at a time, on the model's second instance, so a
  search does not wait behind a backlog batch.

The model worker was not chosen for this: its queue is the completions' own,
and a batch there would hold every editor's next keystroke until it ends.

The sentence-transformers code lives in `exlsp.index.embed`; it is imported
here lazily, inside the host process only (`completion` never imports `index`
at module level).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)

# How long a chunk waits for the model worker to be idle before it runs anyway.
YIELD_MAX_S = 5.0
POLL_S = 0.02


class HeldEmbedder(Protocol):
    """What the host needs of an embedding model (`exlsp.index.embed.Embedder`)."""

    @property
    def name(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...

    def embed_query(self, text: str) -> np.ndarray: ...


def load_sentence_transformer(spec: dict[str, Any]) -> HeldEmbedder:
    from exlsp.index.embed import SentenceTransformerEmbedder

    return SentenceTransformerEmbedder(
        str(spec["name"]),
        Path(str(spec["path"])),
        str(spec.get("device") or "auto"),
        int(spec.get("batchSize") or 32),
    )


def spec_key(spec: dict[str, Any]) -> str:
    fields = ("name", "path", "device", "batchSize")
    return json.dumps({f: spec.get(f) for f in fields}, sort_keys=True)


class HostEmbeddings:
    def __init__(
        self,
        busy: Callable[[], bool],
        create: Callable[[dict[str, Any]], HeldEmbedder] | None = None,
    ) -> None:
        self._busy = busy
        self._create = create or load_sentence_transformer
        self._models: dict[str, HeldEmbedder] = {}
        self._lock = threading.Lock()  # one load at a time; held while loading
        self._batch = ThreadPoolExecutor(1, "exlsp-host-embed")
        self._query = ThreadPoolExecutor(1, "exlsp-host-query")
        self._closed = False
        self.requests = 0
        self.texts = 0
        self.yielded_s = 0.0  # time chunks waited for completions

    def facts(self) -> list[dict[str, Any]]:
        with self._lock:
            return [_facts(m) for m in self._models.values()]

    async def embed(
        self, spec: dict[str, Any], texts: list[str], query: bool
    ) -> tuple[dict[str, Any], np.ndarray]:
        """(the model's facts, float32 vectors of shape (len(texts), dim))."""
        pool = self._query if query else self._batch
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(pool, self._run, spec, texts, query)
        self.requests += 1
        self.texts += len(texts)
        return result

    def _model(self, spec: dict[str, Any]) -> HeldEmbedder:
        key = spec_key(spec)
        with self._lock:
            model = self._models.get(key)
            if model is None:
                t0 = time.perf_counter()
                model = self._create(spec)
                self._models[key] = model
                log.info(
                    "embedding model %s loaded in %.0f ms",
                    model.name,
                    (time.perf_counter() - t0) * 1000,
                )
            return model

    def _run(
        self, spec: dict[str, Any], texts: list[str], query: bool
    ) -> tuple[dict[str, Any], np.ndarray]:
        model = self._model(spec)
        dim = model.dim
        if query:
            rows = [np.asarray(model.embed_query(t), dtype=np.float32) for t in texts]
        else:
            chunk = max(1, int(spec.get("batchSize") or 32))
            rows = []
            for start in range(0, len(texts), chunk):
                self._give_way()
                part = np.asarray(model.embed(texts[start : start + chunk]), dtype=np.float32)
                rows.extend(part.reshape(-1, dim))
        vectors = np.stack(rows) if rows else np.zeros((0, dim), dtype=np.float32)
        return _facts(model), np.ascontiguousarray(vectors.reshape(len(texts), dim))

    def _give_way(self) -> None:
        deadline = time.monotonic() + YIELD_MAX_S
        t0 = time.monotonic()
        while not self._closed and time.monotonic() < deadline:
            try:
                if not self._busy():
                    break
            except Exception:  # a broken probe must not stall the work
                break
            time.sleep(POLL_S)
        self.yielded_s += time.monotonic() - t0

    def close(self) -> None:
        self._closed = True
        self._batch.shutdown(wait=False, cancel_futures=True)
        self._query.shutdown(wait=False, cancel_futures=True)


def _facts(model: HeldEmbedder) -> dict[str, Any]:
    return {
        "name": model.name,
        "dim": model.dim,
        "maxLength": getattr(model, "max_length", None),
        "device": getattr(model, "device", None),
    }
