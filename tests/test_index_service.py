"""The indexer service end to end: scan, file events (editor and watchdog), rebuilds."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from exlsp.index import scan
from exlsp.index import service as service_module
from exlsp.index.chunk import Chunker
from exlsp.index.files import Verdict, WorkspaceFiles
from exlsp.index.service import ProgressEvent, WorkspaceIndex
from exlsp.index.store import ChunkStore
from exlsp.index.watch import ChangeKind
from tests.index_helpers import (
    IGNORED_MARKER,
    SAMPLES,
    SECRET_MARKER,
    FakeEmbedder,
    all_rows,
    config_for,
    indexed_paths,
    touch_later,
    wait_until,
    write,
    write_workspace,
)

EXPECTED_PATHS = set(SAMPLES) | {"src/local_keep.py"}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    write_workspace(root)
    return root


@pytest.fixture
def started(root: Path, tmp_path: Path) -> Iterator[WorkspaceIndex]:
    index = WorkspaceIndex(root, config_for(tmp_path), use_watchdog=False)
    index.start()
    assert index.wait_idle(60)
    yield index
    index.stop()


def expected_rows(root: Path, tmp_path: Path) -> dict[str, int]:
    """Chunks per path that a correct index holds for the workspace as it is on disk."""
    files = WorkspaceFiles(root, config_for(tmp_path))
    chunker = Chunker(config_for(tmp_path).chunkLines, config_for(tmp_path).chunkOverlap)
    out: dict[str, int] = {}
    for rel in files.walk():
        fr = files.read(rel)
        if fr.verdict == Verdict.OK:
            n = len(chunker.chunk(rel, fr.text))
            if n:
                out[rel] = n
    return out


def rows_per_path(index: WorkspaceIndex) -> dict[str, int]:
    out: dict[str, int] = {}
    for row in all_rows(index):
        out[str(row["path"])] = out.get(str(row["path"]), 0) + 1
    return out


def top_paths(index: WorkspaceIndex, query: str, n: int = 3) -> list[str]:
    return [h.path for h in index.search(query, limit=n)]


def test_initial_scan_indexes_sources_and_nothing_else(
    started: WorkspaceIndex, root: Path, tmp_path: Path
) -> None:
    assert indexed_paths(started) == EXPECTED_PATHS
    assert rows_per_path(started) == expected_rows(root, tmp_path)
    for row in all_rows(started):
        for column in ("text", "search_text", "symbol"):
            value = str(row[column])
            assert SECRET_MARKER not in value and "sekrit" not in value
            assert IGNORED_MARKER not in value and "ignored qq17" not in value
            assert "binary_marker" not in value and "oversized_marker" not in value
    assert top_paths(started, "x = area_of_zorbling(3)")[0] == "src/geometry.py"
    assert top_paths(started, "shell.heavier(other)")[0] == "crates/lib.rs"
    # camelCase and snake_case spellings find each other.
    assert top_paths(started, "render_widget_panel")[0] == "web/app.js"
    stats = started.stats()
    assert stats.files == len(EXPECTED_PATHS) and stats.chunks == sum(
        expected_rows(root, tmp_path).values()
    )
    assert stats.state == "idle" and stats.last_error is None


def test_file_events_modify_delete_rename(
    started: WorkspaceIndex, root: Path, tmp_path: Path
) -> None:
    geometry = root / "src" / "geometry.py"
    touch_later(geometry, SAMPLES["src/geometry.py"].replace("area_of_zorbling", "area_of_blarfle"))
    (root / "web" / "app.js").unlink()
    (root / "web" / "types.ts").rename(root / "web" / "shapes.ts")
    write(root / "docs" / "new_notes.md", "The quasar_flux_capacitor needs care.\n")
    batches = started.stats().batches
    started.file_events(
        [
            (str(geometry), ChangeKind.CHANGED),
            ((root / "web" / "app.js").as_uri(), 3),  # LSP FileChangeType.Deleted
            ("web/types.ts", "deleted"),
            ("web/shapes.ts", "created"),
            (str(root / "docs" / "new_notes.md"), 1),
            ("/somewhere/else.py", 2),  # outside the workspace: ignored
        ]
    )
    assert started.wait_idle(30)
    assert started.stats().batches == batches + 1
    paths = indexed_paths(started)
    assert "web/app.js" not in paths and "web/types.ts" not in paths
    assert {"web/shapes.ts", "docs/new_notes.md"} <= paths
    assert rows_per_path(started) == expected_rows(root, tmp_path)
    assert top_paths(started, "area_of_blarfle(2)")[0] == "src/geometry.py"
    assert all("zorbling" not in h.text for h in started.search("area_of_zorbling", limit=10))
    assert top_paths(started, "quasar_flux_capacitor")[0] == "docs/new_notes.md"

    # A deleted directory reported as one event removes everything under it.
    shutil.rmtree(root / "native")
    started.file_events([("native", ChangeKind.DELETED)])
    assert started.wait_idle(30)
    assert not any(p.startswith("native/") for p in indexed_paths(started))
    assert rows_per_path(started) == expected_rows(root, tmp_path)

    # A new .gitignore rescans: files it ignores leave the index.
    write(root / "docs" / ".gitignore", "*.md\n")
    started.file_events([("docs/.gitignore", ChangeKind.CREATED)])
    assert started.wait_idle(30)
    assert not any(p.startswith("docs/") for p in indexed_paths(started))
    assert rows_per_path(started) == expected_rows(root, tmp_path)


def test_watchdog_events_converge(root: Path, tmp_path: Path) -> None:
    index = WorkspaceIndex(root, config_for(tmp_path), use_watchdog=True)
    index.start()
    try:
        assert index.wait_idle(60)
        assert index._watcher is not None
        geometry = root / "src" / "geometry.py"
        touch_later(geometry, SAMPLES["src/geometry.py"].replace("QuixoticShape", "PlatonicSolid"))
        (root / "cmd" / "main.go").unlink()
        (root / "crates" / "lib.rs").rename(root / "crates" / "shells.rs")
        write(root / "src" / "fresh_module.py", "def nebula_drift_speed():\n    return 42\n")
        write(root / ".env.local", f"KEY={SECRET_MARKER}\n")  # a secret appears: never read

        def converged() -> bool:
            index.wait_idle(5)
            return rows_per_path(index) == expected_rows(root, tmp_path)

        assert wait_until(converged, timeout=30, step=0.2)
        paths = indexed_paths(index)
        assert "cmd/main.go" not in paths and "crates/lib.rs" not in paths
        assert {"crates/shells.rs", "src/fresh_module.py"} <= paths
        assert top_paths(index, "PlatonicSolid(6)")[0] == "src/geometry.py"
        assert top_paths(index, "nebula_drift_speed()")[0] == "src/fresh_module.py"
        assert not any(SECRET_MARKER in str(r["text"]) for r in all_rows(index))
    finally:
        index.stop()


def test_a_branch_switch_is_one_batch(started: WorkspaceIndex, root: Path) -> None:
    events = []
    for i in range(5000):
        path = root / "gen" / f"d{i % 50}" / f"mod_{i}.py"
        write(path, f"def generated_function_{i}(x):\n    return x + {i}\n")
        events.append((str(path), ChangeKind.CREATED))
    batches = started.stats().batches
    for start in range(0, len(events), 250):  # arrives over several notifications
        started.file_events(events[start : start + 250])
    assert started.wait_idle(120)
    assert started.stats().batches == batches + 1
    assert sum(1 for p in indexed_paths(started) if p.startswith("gen/")) == 5000
    assert top_paths(started, "generated_function_4321")[0] == "gen/d21/mod_4321.py"


def test_progress_events(root: Path, tmp_path: Path) -> None:
    events: list[ProgressEvent] = []
    index = WorkspaceIndex(root, config_for(tmp_path), events.append, use_watchdog=False)
    index.start()
    try:
        assert index.wait_idle(60)
    finally:
        index.stop()
    scan = [e for e in events if e.token == "index"]
    assert scan[0].kind == "begin" and scan[-1].kind == "end"
    assert scan[-1].done == scan[-1].total > 0
    assert all(e.kind == "report" for e in scan[1:-1])


def test_restart_skips_unchanged_files(root: Path, tmp_path: Path) -> None:
    first = WorkspaceIndex(root, config_for(tmp_path), use_watchdog=False)
    first.start()
    assert first.wait_idle(60)
    first.stop()
    touch_later(root / "src" / "geometry.py", "def changed_while_away():\n    return 1\n")
    second = WorkspaceIndex(root, config_for(tmp_path), use_watchdog=False)
    second.start()
    try:
        assert second.wait_idle(60)
        assert second.stats().commits == 1  # only the one changed file was written
        assert top_paths(second, "changed_while_away()")[0] == "src/geometry.py"
    finally:
        second.stop()


@pytest.mark.parametrize("damage", ["manifests", "data", "meta", "indices"])
def test_a_damaged_table_is_rebuilt(root: Path, tmp_path: Path, damage: str) -> None:
    first = WorkspaceIndex(root, config_for(tmp_path), use_watchdog=False)
    first.start()
    assert first.wait_idle(60)
    first.stop()
    table_dir = tmp_path / "db" / "chunks.lance"
    if damage == "manifests":
        for manifest in (table_dir / "_versions").iterdir():
            manifest.write_bytes(b"garbage")
    elif damage == "indices":  # the index folder alone is lost
        shutil.rmtree(table_dir / "_indices")
    elif damage == "data":
        for data_file in (table_dir / "data").iterdir():
            data_file.write_bytes(b"\x00" * 64)
    else:
        meta = tmp_path / "db" / "meta.json"
        data = json.loads(meta.read_text())
        data["fingerprint"]["schema"] = -1
        meta.write_text(json.dumps(data))
    second = WorkspaceIndex(root, config_for(tmp_path), use_watchdog=False)
    second.start()
    try:
        assert second.wait_idle(60)
        assert second.stats().state == "idle"
        assert rows_per_path(second) == expected_rows(root, tmp_path)
        assert top_paths(second, "area_of_zorbling")[0] == "src/geometry.py"
    finally:
        second.stop()


def test_second_process_reads_then_takes_over(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service_module, "READ_ONLY_RETRY_S", 0.2)
    writer = WorkspaceIndex(root, config_for(tmp_path), use_watchdog=False)
    writer.start()
    assert writer.wait_idle(60)
    reader = WorkspaceIndex(root, config_for(tmp_path), use_watchdog=False)
    reader.start()
    try:
        assert wait_until(lambda: reader.ready and reader.stats().read_only, timeout=20)
        assert top_paths(reader, "area_of_zorbling")[0] == "src/geometry.py"
        writer.stop()
        assert wait_until(lambda: not reader.stats().read_only, timeout=20)
        assert reader.wait_idle(60)
        write(root / "src" / "after.py", "def taken_over_marker():\n    pass\n")
        reader.file_events([("src/after.py", ChangeKind.CREATED)])
        assert reader.wait_idle(30)
        assert top_paths(reader, "taken_over_marker")[0] == "src/after.py"
    finally:
        writer.stop()
        reader.stop()


def test_embedding_backlog_fills_vectors_and_keeps_unchanged_ones(
    root: Path, tmp_path: Path
) -> None:
    embedder = FakeEmbedder()
    index = WorkspaceIndex(root, config_for(tmp_path), use_watchdog=False, embedder=embedder)
    index.start()
    try:
        assert index.wait_idle(60)
        stats = index.stats()
        assert stats.chunks_with_vectors == stats.chunks > 0
        assert stats.embedding_model == embedder.name
        hits = index.search("renderWidgetPanel(root)", limit=5)
        assert hits[0].path == "web/app.js"
        assert hits[0].vector_rank is not None and hits[0].lexical_rank is not None
        vector_only = index.search("renderWidgetPanel(root)", limit=5, mode="vector")
        assert vector_only and all(h.lexical_rank is None for h in vector_only)

        # Change one definition: only its chunk is embedded again.
        embedder.batch_sizes.clear()
        geometry = root / "src" / "geometry.py"
        touch_later(geometry, SAMPLES["src/geometry.py"].replace("* radius", "* radius * 1.0"))
        index.file_events([("src/geometry.py", ChangeKind.CHANGED)])
        assert index.wait_idle(30)
        assert sum(embedder.batch_sizes) == 1
        assert index.stats().chunks_with_vectors == index.stats().chunks
    finally:
        index.stop()


def test_secret_files_edits_are_not_kept(started: WorkspaceIndex, root: Path) -> None:
    secret = f"API_TOKEN={SECRET_MARKER}\n"
    started.note_edit((root / ".env").as_uri(), secret, 0)
    started.note_edit(str(root / "config" / "credentials.json"), secret, 3)
    started.note_edit("file:///home/someone/.aws/credentials", secret, 0)  # outside
    started.note_edit("/home/someone/.ssh/config", secret, 0)
    assert started.recent_edits(limit=10) == []
    started.note_edit(str(root / "src" / "geometry.py"), "    return 3\n", 5)
    assert [e.path for e in started.recent_edits(limit=10)] == ["src/geometry.py"]


def test_heavy_work_waits_while_completions_run(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scan, "YIELD_MAX_S", 60.0)
    for n in range(3 * scan.YIELD_EVERY_FILES):
        write(root / "many" / f"mod_{n}.py", f"def many_{n}(x):\n    return x * {n}\n")
    busy = threading.Event()
    busy.set()
    asked = threading.Event()

    def completions_busy() -> bool:
        asked.set()
        return busy.is_set()

    index = WorkspaceIndex(root, config_for(tmp_path), use_watchdog=False, busy=completions_busy)
    index.start()
    try:
        assert asked.wait(30)
        # The scan stopped part-way and stays there while completions run.
        assert not index.wait_idle(1.5, embeddings=False)
        assert index.stats().state == "scanning"
        busy.clear()
        assert index.wait_idle(60)
        assert sum(1 for p in indexed_paths(index) if p.startswith("many/")) == len(
            list((root / "many").iterdir())
        )
    finally:
        index.stop()


def test_recent_edits(started: WorkspaceIndex, root: Path) -> None:
    started.note_edit((root / "src" / "geometry.py").as_uri(), "    return 1\n", 5)
    started.note_edit(str(root / "web" / "app.js"), "  return root;\n", 2)
    started.note_edit(str(root / "src" / "geometry.py"), "    return 2\n", 6)  # replaces line 5
    edits = started.recent_edits()
    assert [(e.path, e.start_line, e.text) for e in edits] == [
        ("src/geometry.py", 6, "    return 2\n"),
        ("web/app.js", 2, "  return root;\n"),
    ]
    assert [e.path for e in started.recent_edits(exclude_path="src/geometry.py")] == ["web/app.js"]
    started.forget_document(str(root / "web" / "app.js"))
    assert [e.path for e in started.recent_edits()] == ["src/geometry.py"]


def test_ignored_paths_are_dropped_before_debouncing(started: WorkspaceIndex, root: Path) -> None:
    batches = started.stats().batches
    started.file_events(
        [(str(root / "node_modules" / "pkg" / f"mod{i}.js"), ChangeKind.CHANGED) for i in range(50)]
        + [
            ("src/__pycache__/geometry.cpython-311.pyc", ChangeKind.CREATED),
            ("debug.log", ChangeKind.CHANGED),  # the root .gitignore's *.log
            (".git/index.lock", ChangeKind.CREATED),
            ("build/lib/out.py", ChangeKind.CREATED),
        ]
    )
    assert started.stats().pending_events == 0
    started.file_events([("src/geometry.py", ChangeKind.CHANGED), ("build", ChangeKind.CHANGED)])
    assert started.stats().pending_events == 2  # a file may be named like an ignored folder
    assert started.wait_idle(30)
    assert started.stats().batches == batches + 1


def test_embedding_progresses_under_constant_file_activity(root: Path, tmp_path: Path) -> None:
    index = WorkspaceIndex(root, config_for(tmp_path), use_watchdog=False, embedder=FakeEmbedder())
    stop = threading.Event()
    churned = [0]

    def churn() -> None:
        ignored = root / "node_modules" / "pkg" / "index.js"
        busy = root / "src" / "churning.py"
        while not stop.is_set():
            churned[0] += 1
            ignored.write_text(f"var n = {churned[0]};\n")
            busy.write_text(f"def churning_{churned[0] % 7}():\n    return {churned[0]}\n")
            index.file_events([(str(ignored), ChangeKind.CHANGED), (str(busy), ChangeKind.CHANGED)])
            time.sleep(0.003)

    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    assert wait_until(lambda: churned[0] >= 20)
    index.start()
    try:
        progressed = wait_until(lambda: (index.stats().chunks_with_vectors or 0) > 0, timeout=30)
        states = set()
        for _ in range(10):
            states.add(index.stats().state)
            time.sleep(0.01)
        churning = thread.is_alive()
    finally:
        stop.set()
        thread.join()
    try:
        assert progressed and churning
        assert "pending" in states  # not "idle": events are waiting for a pause
        assert index.wait_idle(60)
        stats = index.stats()
        assert stats.state == "idle" and stats.chunks_with_vectors == stats.chunks
    finally:
        index.stop()


def test_a_failure_is_reported_once(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service_module, "MAX_RETRIES", 1)
    failures: list[str] = []
    events: list[ProgressEvent] = []
    index = WorkspaceIndex(
        root, config_for(tmp_path), events.append, use_watchdog=False, on_failure=failures.append
    )
    index.start()
    try:
        assert index.wait_idle(60)
        assert failures == [] and index.stats().failure is None

        def broken(self: ChunkStore, *args: object, **kwargs: object) -> None:
            raise OSError("no space left on device")

        monkeypatch.setattr(ChunkStore, "replace_files", broken)
        for n in range(3):
            write(root / "src" / f"new_{n}.py", f"def new_{n}():\n    pass\n")
            index.file_events([(f"src/new_{n}.py", ChangeKind.CREATED)])
            assert wait_until(lambda: index.stats().failure is not None, timeout=30)
            assert index.wait_idle(30)
        assert len(failures) == 1 and "no space left on device" in failures[0]
        assert "no space left on device" in str(index.stats().failure)
        scans = [e for e in events if e.token == "index"]
        assert scans[-1].kind == "end" and "failed" in scans[-1].message
    finally:
        index.stop()
