"""The chunk table's vector index: its partitions survive optimize(), a query searches
a fraction of them, and the deltas that optimize() adds are folded back in."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from exlsp.index import table_indexes as store_module
from exlsp.index.chunk import Chunk
from exlsp.index.store import ChunkStore, FileState, StoredChunk

DIM = 32
FILES = 100
PER_FILE = 30


def chunks_of(n: int, version: int = 0) -> list[Chunk]:
    return [
        Chunk(
            id=f"f{n}-{k}-v{version}",
            path=f"pkg/f{n}.py",
            language="python",
            symbol=f"fn_{n}_{k}",
            kind="function",
            start_line=2 * k,
            end_line=2 * k + 2,
            text=f"def fn_{n}_{k}(x):\n    return x + {version}\n",
        )
        for k in range(PER_FILE)
    ]


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ChunkStore:
    monkeypatch.setattr(store_module, "VECTOR_INDEX_MIN_ROWS", 2000)
    monkeypatch.setattr(store_module, "VECTOR_PARTITION_ROWS", 256)
    monkeypatch.setattr(store_module, "VECTOR_MAX_DELTAS", 3)
    monkeypatch.setattr(store_module, "SCALAR_INDEX_MIN_ROWS", 1_000_000)
    st = ChunkStore(tmp_path / "db", {"test": 1}, DIM)
    st.open()
    st.replace_files(
        {f"pkg/f{n}.py": (FileState(f"h{n}", 0, 0), chunks_of(n)) for n in range(FILES)},
        new=True,
    )
    return st


def unit_vectors(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_vector_index_partitions_survive_optimize(store: ChunkStore) -> None:
    ids = [f"f{n}-{k}-v0" for n in range(FILES) for k in range(PER_FILE)]
    vectors = unit_vectors(len(ids), 0)
    store.set_vectors(ids, vectors)
    assert store.nprobes() is None  # no vector index yet: flat search

    assert "ivf" in store.ensure_indexes()
    partitions = store._vector_partitions
    assert partitions >= 8  # about 3000 / 256
    probes = store.nprobes()
    assert probes is not None and store_module.VECTOR_MIN_PROBES <= probes < partitions

    store.optimize()
    assert store._vector_partitions == partitions
    for i in (5, 1234, 2999):
        hits = store.search_vector(vectors[i], 3)
        assert hits[0].id == ids[i] and hits[0].score < 1e-4


def test_delta_indexes_are_folded_back(store: ChunkStore) -> None:
    ids = [f"f{n}-{k}-v0" for n in range(FILES) for k in range(PER_FILE)]
    store.set_vectors(ids, unit_vectors(len(ids), 1))
    store.ensure_indexes()
    partitions = store._vector_partitions
    deltas_seen = []
    for version in range(1, 8):
        n = version  # rewrite one file, then give its new chunks vectors
        store.replace_files(
            {f"pkg/f{n}.py": (FileState(f"h{n}v{version}", 0, 0), chunks_of(n, version))}
        )
        new_ids = [c.id for c in chunks_of(n, version)]
        store.set_vectors(new_ids, unit_vectors(len(new_ids), 100 + version))
        store.optimize()
        deltas_seen.append(store._vector_deltas())
        assert store._vector_partitions == partitions
    assert max(deltas_seen) <= store_module.VECTOR_MAX_DELTAS
    assert min(deltas_seen) < max(deltas_seen)  # rebuilt at least once
    assert store.count_rows("vector IS NOT NULL") == FILES * PER_FILE


def test_both_searches_at_once_match_the_separate_ones(store: ChunkStore) -> None:
    ids = [f"f{n}-{k}-v0" for n in range(FILES) for k in range(PER_FILE)]
    vectors = unit_vectors(len(ids), 2)
    store.set_vectors(ids, vectors)
    store.ensure_indexes()
    for n, terms in enumerate([["fn", "12", "3"], ["return", "x"], ["fn", "99", "29"]]):
        vector = vectors[n * 101]
        lexical, vector_hits = store.search_both(terms, 20, vector, 10)
        assert store._gather_ok  # the one-gather path ran
        assert [(h.id, round(h.score, 4)) for h in lexical] == [
            (h.id, round(h.score, 4)) for h in store.search_lexical(terms, 20)
        ]
        assert [h.id for h in vector_hits] == [h.id for h in store.search_vector(vector, 10)]
        assert vector_hits[0].id == ids[n * 101] and lexical

    class Wrapped(ChunkStore):
        def search_lexical(self, terms: Sequence[str], limit: int) -> list[StoredChunk]:
            return super().search_lexical(terms, limit)[:1]

    wrapped = Wrapped(store.directory, {"test": 1}, DIM)
    wrapped.open()
    lexical, vector_hits = wrapped.search_both(["return", "x"], 20, vectors[0], 5)
    assert len(lexical) == 1 and vector_hits[0].id == ids[0]  # the subclass's own search


def test_a_lost_index_folder_is_rebuilt_at_open(store: ChunkStore) -> None:
    ids = [f"f{n}-{k}-v0" for n in range(FILES) for k in range(PER_FILE)]
    vectors = unit_vectors(len(ids), 3)
    store.set_vectors(ids, vectors)
    assert {"fts", "ivf"} <= set(store.ensure_indexes())
    assert isinstance(store.directory, Path)
    store.close()
    shutil.rmtree(store.directory / "chunks.lance" / "_indices")

    again = ChunkStore(store.directory, {"test": 1}, DIM)
    again.open()
    assert not again.rebuilt  # the rows and their vectors stay
    assert again.count_rows("vector IS NOT NULL") == len(ids)
    assert again.search_lexical(["fn", "12", "3"], 5)[0].id == "f12-3-v0"
    assert again.search_vector(vectors[77], 3)[0].id == ids[77]
    columns = {tuple(i.columns) for i in again.table.list_indices()}
    assert {("search_text",), ("vector",)} <= columns
    assert again.nprobes() is not None  # searched through the rebuilt vector index
