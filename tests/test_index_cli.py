"""`exlsp index` and `exlsp search` helpers."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from exlsp.index import service, upkeep
from exlsp.index.cli import run_index, run_search
from exlsp.index.store import ChunkStore
from tests.index_helpers import FakeEmbedder, config_for, write_workspace


def test_index_then_search(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "ws"
    write_workspace(root)
    config = config_for(tmp_path)
    assert run_index(root, config) == 0
    out, err = capsys.readouterr()
    assert "files:" in out and "chunks:" in out and str(tmp_path / "db") in out
    assert "Indexing workspace" in err
    assert run_search(root, "depositFunds(amount)", config, limit=3) == 0
    out, _ = capsys.readouterr()
    first = out.splitlines()[0]
    assert "java/Ledger.java:3-14" in first and "Ledger" in first
    assert "lexical" in out and "fused" in out


def test_index_rejects_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "x.py"
    f.write_text("x = 1\n")
    assert run_index(f, config_for(tmp_path)) == 2


class SlowLoadingEmbedder(FakeEmbedder):
    """A fake model that takes a while to load, like a real one."""

    def __init__(self) -> None:
        time.sleep(1.0)
        super().__init__()

    @property
    def name(self) -> str:
        return "fake-slow"


def fake_model(monkeypatch: pytest.MonkeyPatch, embedder: type[FakeEmbedder]) -> None:
    monkeypatch.setattr(service, "resolve_model", lambda config: ("fake-slow", Path("/nowhere")))
    monkeypatch.setattr(service, "peek_dimension", lambda directory: 64)
    monkeypatch.setattr(upkeep, "load_embedder", lambda config: embedder())


def test_search_after_index_uses_vectors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_model(monkeypatch, SlowLoadingEmbedder)
    root = tmp_path / "ws"
    write_workspace(root)
    config = config_for(tmp_path, embeddingModel="")
    assert run_index(root, config) == 0
    out, _ = capsys.readouterr()
    assert "with vectors (fake-slow)" in out
    assert run_search(root, "depositFunds(amount)", config, limit=3) == 0
    out, _ = capsys.readouterr()
    first, scores = out.splitlines()[:2]
    assert "java/Ledger.java" in first
    assert "vector " in scores and "vector -" not in scores


class BrokenEmbedder(FakeEmbedder):
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        raise RuntimeError("the embedding device went away")


def test_a_failed_embedding_fails_the_index_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_model(monkeypatch, BrokenEmbedder)
    root = tmp_path / "ws"
    write_workspace(root)
    assert run_index(root, config_for(tmp_path, embeddingModel="")) == 1
    _, err = capsys.readouterr()
    assert "the embedding device went away" in err.strip().splitlines()[-1]


def test_a_failed_index_fails_both_commands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: ChunkStore, *args: object, **kwargs: object) -> None:
        raise OSError("no space left on device")

    monkeypatch.setattr(ChunkStore, "replace_files", broken)
    root = tmp_path / "ws"
    write_workspace(root)
    config = config_for(tmp_path)
    assert run_index(root, config) == 1
    _, err = capsys.readouterr()
    assert "no space left on device" in err.strip().splitlines()[-1]
    assert run_search(root, "depositFunds(amount)", config) == 1
    out, err = capsys.readouterr()
    assert "no results" not in out
    assert "no space left on device" in err.strip().splitlines()[-1]
