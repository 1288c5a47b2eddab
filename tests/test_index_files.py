"""Which files get indexed: .gitignore (nested), excludes, secrets, binary, size, symlinks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from exlsp.index.config import DEFAULT_EXCLUDE, IndexConfig
from exlsp.index.files import Verdict, WorkspaceFiles
from exlsp.index.watch import BURST_QUIET_S, ChangeKind, Debouncer
from tests.index_helpers import SAMPLES, config_for, write, write_workspace


@pytest.fixture
def files(tmp_path: Path) -> WorkspaceFiles:
    root = tmp_path / "ws"
    write_workspace(root)
    return WorkspaceFiles(root, config_for(tmp_path))


def test_walk_selects_sources_only(files: WorkspaceFiles) -> None:
    walked = set(files.walk())
    assert set(SAMPLES) <= walked
    assert "src/local_keep.py" in walked  # re-included by a nested negation
    for rel in (
        "src/local_scratch.py",  # nested .gitignore
        "generated/out.py",  # root .gitignore, anchored directory
        "debug.log",  # root .gitignore glob
        "node_modules/pkg/index.js",  # default exclude
        ".env",
        "config/.env.production",
        "certs/server.pem",
        "certs/server.key",
        "home/.ssh/id_rsa",
        "id_ed25519.pub",
        "config/credentials.json",
        ".netrc",
        ".npmrc",
        "secrets.yaml",
        "keys/store.p12",
    ):
        assert rel not in walked, rel


def test_secret_files_are_never_opened(
    files: WorkspaceFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[str] = []
    real_open = open

    def spy(path: str | os.PathLike[str], *args: object, **kwargs: object) -> object:
        opened.append(os.fspath(path))
        return real_open(path, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr("builtins.open", spy)
    for rel in (".env", "certs/server.key", "home/.ssh/id_rsa", "secrets.yaml", ".npmrc"):
        assert files.read(rel).verdict == Verdict.DENIED
    assert not opened


def test_binary_large_and_symlinks(files: WorkspaceFiles, tmp_path: Path) -> None:
    root = files.root
    assert files.read("assets/blob.dat").verdict == Verdict.BINARY
    assert files.read("assets/huge.txt").verdict == Verdict.TOO_LARGE
    outside = tmp_path / "outside.py"
    outside.write_text("OUTSIDE_MARKER = 1\n")
    os.symlink(outside, root / "src" / "escape.py")
    os.symlink(root / "src" / "geometry.py", root / "src" / "alias.py")
    os.symlink(tmp_path, root / "loop")  # a directory link leaving the workspace
    assert files.read("src/escape.py").verdict == Verdict.OUTSIDE
    assert files.read("src/alias.py").verdict == Verdict.OK
    walked = set(files.walk())
    assert not any(p.startswith("loop/") for p in walked)
    ok = files.read("src/geometry.py")
    assert ok.verdict == Verdict.OK and "area_of_zorbling" in ok.text and ok.content_hash


def test_gitignore_changes_apply_after_reload(files: WorkspaceFiles) -> None:
    assert not files.is_ignored("docs/guide.md")
    write(files.root / "docs" / ".gitignore", "*.md\n")
    files.reload()
    assert files.is_ignored("docs/guide.md")
    assert "docs/guide.md" not in set(files.walk())


def test_virtualenv_by_marker_file(files: WorkspaceFiles) -> None:
    write(files.root / "myenv" / "pyvenv.cfg", "home = /usr\n")
    write(files.root / "myenv" / "lib" / "mod.py", "A = 1\n")
    assert files.is_ignored("myenv/lib/mod.py")


def test_relpath_accepts_uris(files: WorkspaceFiles) -> None:
    root = files.root
    assert files.relpath(root / "src" / "a b.py") == "src/a b.py"
    assert files.relpath((root / "src" / "a b.py").as_uri()) == "src/a b.py"
    assert files.relpath("src/x.py") == "src/x.py"
    assert files.relpath("/elsewhere/x.py") is None


def test_debouncer_gathers_a_burst() -> None:
    d = Debouncer(quiet_s=0.3, max_wait_s=3.0)
    assert d.due_in(0.0) is None
    for i in range(5000):
        d.add([(f"f{i}.py", ChangeKind.CHANGED)], now=i * 0.0001)  # 0.5 s of events
    assert d.due_in(0.45) and d.due_in(0.45) > 0  # still within the burst
    # A pause of a few tenths of a second inside a burst this large does not cut it.
    assert d.due_in(0.8) and d.due_in(0.8) > 0
    assert d.due_in(0.5 + BURST_QUIET_S) == 0
    assert len(d.drain()) == 5000 and len(d) == 0
    # A single save keeps the short pause.
    d.add([("one.py", ChangeKind.CHANGED)], now=5.0)
    assert d.due_in(5.0 + 0.3) == 0
    d.drain()
    # A never-ending stream is still cut at max_wait_s.
    for i in range(100):
        d.add([("g.py", ChangeKind.CHANGED)], now=10 + i * 0.1)
    assert d.due_in(13.0) == 0


def test_change_kind_parsing() -> None:
    assert ChangeKind.parse(1) is ChangeKind.CREATED
    assert ChangeKind.parse(3) is ChangeKind.DELETED
    assert ChangeKind.parse("deleted") is ChangeKind.DELETED
    assert ChangeKind.parse("Changed") is ChangeKind.CHANGED


def test_tokenizers_and_large_data_files_are_skipped_by_default(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    row = '{"name": "run", "latency_ms": [1.5, 2.25, 3.0], "ok": true},\n'
    write(root / "models" / "tokenizer.json", '{"model": {"vocab": {"a": 1}}}\n')
    write(root / "bench" / "results" / "run.json", "[\n" + row * 2000 + "]\n")  # about 120 KB
    write(root / "data" / "events.jsonl", row * 3)
    write(root / "data" / "events.ndjson", row * 3)
    write(root / "package.json", '{"name": "app", "version": "1.0.0"}\n')
    write(root / "bench" / "results" / "summary.json", '{"p50_ms": 12}\n')
    write(root / "bench" / "run.py", "def run():\n    pass\n")
    files = WorkspaceFiles(root, IndexConfig(exclude=list(DEFAULT_EXCLUDE)))
    indexed = {rel for rel in files.walk() if files.read(rel).verdict == Verdict.OK}
    assert indexed == {"package.json", "bench/results/summary.json", "bench/run.py"}
    assert files.read("bench/results/run.json").verdict == Verdict.TOO_LARGE
    # The same file under a larger limit is read.
    roomy = WorkspaceFiles(root, IndexConfig(maxDataFileBytes=1_000_000))
    assert roomy.read("bench/results/run.json").verdict == Verdict.OK


def test_surely_ignored_reads_nothing_and_keeps_what_may_matter(
    files: WorkspaceFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    list(files.walk())  # the scan reads the .gitignore files
    monkeypatch.setattr(os.path, "isfile", lambda p: pytest.fail(f"probed {p}"))
    for rel in ("node_modules/a/b.js", "src/__pycache__/m.pyc", "debug.log", ".git/x", ".ENV"):
        assert files.surely_ignored(rel), rel
    for rel in ("src/geometry.py", "build", "src/.gitignore", "newdir/sub"):
        assert not files.surely_ignored(rel), rel
    narrow = WorkspaceFiles(files.root, IndexConfig(include=["*.py"]))
    assert not narrow.surely_ignored("moved_in_folder")  # may hold .py files
