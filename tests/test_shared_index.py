"""A shared index on object storage (a local S3 server) under each editor's local index.

A "CI" run indexes a workspace into ``s3://`` once; "editors" index a copy of
it with ``sharedIndex`` set: they write only what differs from the shared
table, and what a search can see converges to the workspace on disk, as the
local store's convergence tests require of a plain index.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from exlsp.index.chunk import Chunker
from exlsp.index.cli import run_index
from exlsp.index.config import IndexConfig
from exlsp.index.files import Verdict, WorkspaceFiles
from exlsp.index.service import CHUNKER_VERSION, WorkspaceIndex
from exlsp.index.shared import SharedOverlayStore, object_storage
from exlsp.index.store import ChunkStore, store_location
from exlsp.index.watch import ChangeKind
from tests.index_helpers import SAMPLES, touch_later, wait_until, write, write_workspace

pytestmark = pytest.mark.slow

BUCKET = "team-index"
KEY_ID, SECRET = "AKIDTESTSHARED", "s3cr3t-shared-test"  # the local server accepts any


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server in its own process on a loopback port, with one bucket."""
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("moto.server", reason="moto[server] is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.skip("moto's S3 server did not start")
            time.sleep(0.1)
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id=KEY_ID,
            aws_secret_access_key=SECRET,
        )
        client.create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(10)


def storage(endpoint: str, **overrides: object) -> IndexConfig:
    cfg = IndexConfig(
        embeddingModel="none",
        debounceMs=50,
        maxFileBytes=100_000,
        storageEndpoint=endpoint,
        storageRegion="us-east-1",
        storageAccessKeyId=KEY_ID,
        storageSecretAccessKey=SECRET,
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


@pytest.fixture(scope="module")
def shared_uri(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The CI job: `exlsp index` of the workspace straight into the bucket."""
    ci_root = tmp_path_factory.mktemp("ci") / "repo"
    write_workspace(ci_root)
    uri = f"s3://{BUCKET}/main/index"
    assert run_index(ci_root, storage(s3_endpoint, databaseDir=uri)) == 0
    return uri


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    write_workspace(root)  # a developer's checkout of the same commit
    return root


def editor_config(endpoint: str, uri: str, tmp_path: Path, **overrides: object) -> IndexConfig:
    return storage(endpoint, databaseDir=str(tmp_path / "local-db"), sharedIndex=uri, **overrides)


@pytest.fixture
def editor(
    s3_endpoint: str, shared_uri: str, root: Path, tmp_path: Path
) -> Iterator[WorkspaceIndex]:
    index = WorkspaceIndex(
        root, editor_config(s3_endpoint, shared_uri, tmp_path), use_watchdog=False
    )
    index.start()
    assert index.wait_idle(120)
    yield index
    index.stop()


def overlay(index: WorkspaceIndex) -> SharedOverlayStore:
    store = index._store
    assert isinstance(store, SharedOverlayStore)
    return store


def visible_rows_per_path(index: WorkspaceIndex) -> dict[str, int]:
    rows = overlay(index).visible_rows(["path"])["path"].to_pylist()
    out: dict[str, int] = {}
    for path in rows:
        out[path] = out.get(path, 0) + 1
    return out


def local_paths(index: WorkspaceIndex) -> set[str]:
    return set(
        overlay(index).table.search().select(["path"]).limit(None).to_arrow()["path"].to_pylist()
    )


def expected_rows(root: Path, config: IndexConfig) -> dict[str, int]:
    """Chunks per path that a correct index holds for the workspace as it is on disk."""
    files = WorkspaceFiles(root, config)
    chunker = Chunker(config.chunkLines, config.chunkOverlap)
    out: dict[str, int] = {}
    for rel in files.walk():
        fr = files.read(rel)
        if fr.verdict == Verdict.OK and (n := len(chunker.chunk(rel, fr.text))):
            out[rel] = n
    return out


def top_paths(index: WorkspaceIndex, query: str, n: int = 3) -> list[str]:
    return [h.path for h in index.search(query, limit=n)]


def test_ci_writes_the_index_to_the_bucket(s3_endpoint: str, shared_uri: str) -> None:
    config = storage(s3_endpoint)
    fingerprint = {"chunker": [CHUNKER_VERSION, config.chunkLines, config.chunkOverlap]}
    store = ChunkStore(
        store_location(shared_uri),
        {**fingerprint, "embedding": None},
        None,
        read_only=True,
        storage=object_storage(config),
    )
    store.open()
    assert set(store.file_states()) == set(SAMPLES) | {"src/local_keep.py"}
    assert store.count_rows() > 0


def test_an_unchanged_checkout_is_served_by_the_shared_index(
    editor: WorkspaceIndex, root: Path, s3_endpoint: str, shared_uri: str, tmp_path: Path
) -> None:
    assert editor.stats().commits == 0  # nothing written here: every file matched
    assert local_paths(editor) == set() and overlay(editor).shadowed == frozenset()
    config = editor_config(s3_endpoint, shared_uri, tmp_path)
    assert visible_rows_per_path(editor) == expected_rows(root, config)
    assert top_paths(editor, "x = area_of_zorbling(3)")[0] == "src/geometry.py"
    assert top_paths(editor, "render_widget_panel")[0] == "web/app.js"


def test_local_changes_overlay_the_shared_index_and_converge(
    editor: WorkspaceIndex, root: Path, s3_endpoint: str, shared_uri: str, tmp_path: Path
) -> None:
    config = editor_config(s3_endpoint, shared_uri, tmp_path)
    geometry = root / "src" / "geometry.py"
    original = geometry.read_text()
    touch_later(geometry, SAMPLES["src/geometry.py"].replace("area_of_zorbling", "area_of_blarfle"))
    (root / "web" / "app.js").unlink()
    (root / "web" / "types.ts").rename(root / "web" / "shapes.ts")
    write(root / "docs" / "new_notes.md", "The quasar_flux_capacitor needs care.\n")
    editor.file_events(
        [
            (str(geometry), ChangeKind.CHANGED),
            ("web/app.js", "deleted"),
            ("web/types.ts", "deleted"),
            ("web/shapes.ts", "created"),
            ("docs/new_notes.md", "created"),
        ]
    )
    assert editor.wait_idle(60)
    assert visible_rows_per_path(editor) == expected_rows(root, config)
    # Only what differs is local; the shared rows of those paths are hidden.
    assert local_paths(editor) == {"src/geometry.py", "web/shapes.ts", "docs/new_notes.md"}
    assert overlay(editor).shadowed == {"src/geometry.py", "web/app.js", "web/types.ts"}
    assert top_paths(editor, "area_of_blarfle(2)")[0] == "src/geometry.py"
    assert all("zorbling" not in h.text for h in editor.search("area_of_zorbling", limit=10))
    assert "web/app.js" not in top_paths(editor, "renderWidgetPanel", n=10)
    assert top_paths(editor, "quasar_flux_capacitor")[0] == "docs/new_notes.md"

    # Changed back to the shared content: served from the shared index again.
    touch_later(geometry, original)
    editor.file_events([(str(geometry), ChangeKind.CHANGED)])
    assert editor.wait_idle(60)
    assert "src/geometry.py" not in local_paths(editor)
    assert "src/geometry.py" not in overlay(editor).shadowed
    assert visible_rows_per_path(editor) == expected_rows(root, config)
    assert top_paths(editor, "x = area_of_zorbling(3)")[0] == "src/geometry.py"

    # A new .gitignore rescans: files it ignores leave what searches see.
    write(root / "docs" / ".gitignore", "*.md\n")
    editor.file_events([("docs/.gitignore", ChangeKind.CREATED)])
    assert editor.wait_idle(60)
    assert not any(p.startswith("docs/") for p in visible_rows_per_path(editor))
    assert visible_rows_per_path(editor) == expected_rows(root, config)


def test_a_restart_keeps_the_overlay(
    s3_endpoint: str, shared_uri: str, root: Path, tmp_path: Path
) -> None:
    config = editor_config(s3_endpoint, shared_uri, tmp_path)
    first = WorkspaceIndex(root, config, use_watchdog=False)
    first.start()
    assert first.wait_idle(120)
    first.stop()
    touch_later(root / "src" / "geometry.py", "def changed_while_away():\n    return 1\n")
    (root / "cmd" / "main.go").unlink()
    second = WorkspaceIndex(root, config, use_watchdog=False)
    second.start()
    try:
        assert second.wait_idle(120)
        assert visible_rows_per_path(second) == expected_rows(root, config)
        assert top_paths(second, "changed_while_away()")[0] == "src/geometry.py"
        assert "cmd/main.go" not in visible_rows_per_path(second)
    finally:
        second.stop()


def test_watchdog_events_converge_over_the_shared_index(
    s3_endpoint: str, shared_uri: str, root: Path, tmp_path: Path
) -> None:
    config = editor_config(s3_endpoint, shared_uri, tmp_path)
    index = WorkspaceIndex(root, config, use_watchdog=True)
    index.start()
    try:
        assert index.wait_idle(120)
        geometry = root / "src" / "geometry.py"
        touch_later(geometry, SAMPLES["src/geometry.py"].replace("QuixoticShape", "PlatonicSolid"))
        (root / "crates" / "lib.rs").rename(root / "crates" / "shells.rs")
        write(root / "src" / "fresh_module.py", "def nebula_drift_speed():\n    return 42\n")

        def converged() -> bool:
            index.wait_idle(5)
            return visible_rows_per_path(index) == expected_rows(root, config)

        assert wait_until(converged, timeout=60, step=0.2)
        assert top_paths(index, "PlatonicSolid(6)")[0] == "src/geometry.py"
        assert top_paths(index, "nebula_drift_speed()")[0] == "src/fresh_module.py"
        assert "crates/lib.rs" not in visible_rows_per_path(index)
    finally:
        index.stop()


def test_a_shared_index_built_with_other_settings_is_not_used(
    s3_endpoint: str, shared_uri: str, root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="exlsp")
    config = editor_config(s3_endpoint, shared_uri, tmp_path, chunkLines=30)
    index = WorkspaceIndex(root, config, use_watchdog=False)
    index.start()
    try:
        assert index.wait_idle(120)
        assert overlay(index).shared is None
        assert any("cannot be used" in r.getMessage() for r in caplog.records)
        # Everything indexed here instead: slower, still complete.
        assert visible_rows_per_path(index) == expected_rows(root, config)
    finally:
        index.stop()


def test_an_unreachable_shared_index_falls_back_to_local(root: Path, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there
    config = editor_config(f"http://127.0.0.1:{port}", f"s3://{BUCKET}/main/index", tmp_path)
    index = WorkspaceIndex(root, config, use_watchdog=False)
    index.start()
    try:
        assert index.wait_idle(180)
        assert overlay(index).shared is None
        assert visible_rows_per_path(index) == expected_rows(root, config)
        assert index.stats().state == "idle"
    finally:
        index.stop()


def test_credentials_can_come_from_the_environment(
    s3_endpoint: str, shared_uri: str, root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    config = IndexConfig(
        embeddingModel="none",
        debounceMs=50,
        maxFileBytes=100_000,
        databaseDir=str(tmp_path / "local-db"),
        sharedIndex=shared_uri,
    )
    index = WorkspaceIndex(root, config, use_watchdog=False)
    index.start()
    try:
        assert index.wait_idle(120)
        assert overlay(index).shared is not None
        assert index.stats().commits == 0
    finally:
        index.stop()


def test_vectors_come_from_both_tables(
    s3_endpoint: str, root: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from tests.index_helpers import FakeEmbedder

    ci_root = tmp_path_factory.mktemp("ci-vectors") / "repo"
    write_workspace(ci_root)
    uri = f"s3://{BUCKET}/vectors/index"
    ci = WorkspaceIndex(
        ci_root, storage(s3_endpoint, databaseDir=uri), use_watchdog=False, embedder=FakeEmbedder()
    )
    ci.start()
    try:
        assert ci.wait_idle(120)
        assert ci.stats().chunks_with_vectors == ci.stats().chunks > 0
    finally:
        ci.stop()

    embedder = FakeEmbedder()
    config = editor_config(s3_endpoint, uri, tmp_path)
    touch_later(
        root / "web" / "app.js",
        SAMPLES["web/app.js"].replace("renderWidgetPanel", "renderGadgetPanel"),
    )
    index = WorkspaceIndex(root, config, use_watchdog=False, embedder=embedder)
    index.start()
    try:
        assert index.wait_idle(120)
        # Only the changed file was embedded here; the rest came with the shared index.
        assert local_paths(index) == {"web/app.js"}
        assert sum(embedder.batch_sizes) == expected_rows(root, config)["web/app.js"]
        hits = index.search("renderGadgetPanel(root)", limit=5, mode="vector")
        assert hits[0].path == "web/app.js" and "renderGadgetPanel" in hits[0].text
        others = index.search("area_of_zorbling(radius)", limit=5, mode="vector")
        assert others[0].path == "src/geometry.py"
        everything = index.search("renderWidgetPanel(root)", limit=50, mode="vector")
        assert all("renderWidgetPanel" not in h.text for h in everything)
    finally:
        index.stop()


def test_a_newer_shared_version_is_taken_at_the_next_start(
    s3_endpoint: str,
    root: Path,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from exlsp.index import store as store_module

    monkeypatch.setattr(store_module, "REMOTE_RECHECK_S", 0)  # readers look at every query
    ci_root = tmp_path_factory.mktemp("ci-versions") / "repo"
    write_workspace(ci_root)
    uri = f"s3://{BUCKET}/versions/index"
    assert run_index(ci_root, storage(s3_endpoint, databaseDir=uri)) == 0
    config = editor_config(s3_endpoint, uri, tmp_path)
    index = WorkspaceIndex(root, config, use_watchdog=False)
    index.start()
    try:
        assert index.wait_idle(120)
        assert local_paths(index) == set()
        # CI indexes a newer commit while the editor runs on the older checkout.
        geometry = SAMPLES["src/geometry.py"].replace("area_of_zorbling", "area_of_merged")
        touch_later(ci_root / "src" / "geometry.py", geometry)
        assert run_index(ci_root, storage(s3_endpoint, databaseDir=uri)) == 0
        time.sleep(1.0)
        # Searches still show this checkout's text, not the newer shared one.
        hit = index.search("area_of_zorbling(3)", limit=1)[0]
        assert hit.path == "src/geometry.py" and "area_of_zorbling" in hit.text
        assert visible_rows_per_path(index) == expected_rows(root, config)
    finally:
        index.stop()
    restarted = WorkspaceIndex(root, config, use_watchdog=False)
    restarted.start()
    try:
        assert restarted.wait_idle(120)
        # The checkout still has the older file: now it differs, so it is local.
        assert local_paths(restarted) == {"src/geometry.py"}
        assert visible_rows_per_path(restarted) == expected_rows(root, config)
        assert all("area_of_merged" not in h.text for h in restarted.search("area_of_merged"))
    finally:
        restarted.stop()


def test_reopening_an_overlay_keeps_its_full_text_index(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The open-time index check reads the overlay's own table: it once searched
    through the shared table too (not open yet), judged the index unusable and
    rebuilt it at every open."""
    from exlsp.index.chunk import Chunk
    from exlsp.index.store import FileState

    def chunks(path: str) -> list[Chunk]:
        text = "def f():\n  return 1\n"
        return [Chunk(f"{path}-1", path, "python", "f", "function", 0, 2, text)]

    def overlay() -> SharedOverlayStore:
        shared = ChunkStore(tmp_path / "shared", {"t": 1}, None, read_only=True)
        return SharedOverlayStore(tmp_path / "local", {"t": 1}, None, shared)

    shared = ChunkStore(tmp_path / "shared", {"t": 1}, None)
    shared.open()
    shared.replace_files({"a.py": (FileState("h", 0, 0), chunks("a.py"))}, new=True)
    shared.ensure_indexes()
    shared.close()
    store = overlay()
    store.open()
    store.replace_files({"b.py": (FileState("h2", 0, 0), chunks("b.py"))})
    store.ensure_indexes()
    store.close()
    with caplog.at_level(logging.WARNING):
        store = overlay()
        store.open()
    try:
        assert not [r for r in caplog.records if "unusable" in r.getMessage()]
        assert sorted(h.path for h in store.search_lexical(["f"], 5)) == ["a.py", "b.py"]
    finally:
        store.close()
