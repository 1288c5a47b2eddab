"""What the index reads and keeps: secrets by name, link and content; nothing outside
the workspace; a private database folder; scans that survive what they cannot read."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from exlsp.index import files as files_module
from exlsp.index import service as service_module
from exlsp.index.files import WorkspaceFiles
from exlsp.index.service import UnsafeRoot, WorkspaceIndex
from exlsp.index.watch import ChangeKind
from tests.index_helpers import SAMPLES, config_for, indexed_paths, wait_until, write

REPO = Path(__file__).resolve().parent.parent

# Each secret file's distinctive content; none may reach the index folder's bytes.
AWS_KEY_ID = "AKIA" + "QZXW7Y3V5T2R9P4M"
SECRETS: dict[str, str] = {
    ".env": "ENV_TOKEN=envlink_marker_q1w2e3\n",
    ".ENV": "UPPER_TOKEN=upperenv_marker_r4t5y6\n",
    "ID_RSA": "rsa_upper_marker_u7i8o9\n",
    "Credentials.json": '{"token": "credjson_marker_p0a1s2"}\n',
    ".s3cfg": "secret_key = s3cfg_marker_d3f4g5\n",
    ".vault-token": "vaulttoken_marker_h6j7k8\n",
    ".yarnrc.yml": "npmAuthToken: yarnrc_marker_l9z0x1\n",
    "application_default_credentials.json": '{"secret": "adc_marker_c2v3b4"}\n',
    "kubeconfig.yaml": "token: kubeconfig_marker_n5m6q7\n",
    "deploy_key": (
        "-----BEGIN OPENSSH PRIVATE KEY-----\ndeploykey_marker_w8e9r0\n"
        "-----END OPENSSH PRIVATE KEY-----\n"
    ),
    "settings.py": (
        f"DEBUG = True\nAWS_ACCESS_KEY_ID = '{AWS_KEY_ID}'\nsettings_marker_t1y2u3 = 1\n"
    ),
}
PLAIN = "src/plain_module.py"
PLAIN_TEXT = "def frobnicate_widget_total(items):\n    return sum(items)\n"


def database_bytes(db: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(db.rglob("*")) if p.is_file())


def distinctive(text: str) -> list[str]:
    return [w for w in text.replace("'", " ").replace('"', " ").split() if "marker" in w]


@pytest.fixture
def secret_ws(tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    for rel, text in SECRETS.items():
        write(root / rel, text)
    os.symlink(".env", root / "env.txt")  # an innocent name for a secret file
    write(root / PLAIN, PLAIN_TEXT)
    return root


def start(root: Path, tmp_path: Path, **kwargs: object) -> WorkspaceIndex:
    index = WorkspaceIndex(root, config_for(tmp_path), use_watchdog=False, **kwargs)  # type: ignore[arg-type]
    index.start()
    assert index.wait_idle(60)
    return index


def test_secrets_by_name_link_and_content_never_reach_the_index(
    secret_ws: Path, tmp_path: Path
) -> None:
    index = start(secret_ws, tmp_path)
    try:
        assert indexed_paths(index) == {PLAIN}
        assert index.search("frobnicate_widget_total", limit=3)[0].path == PLAIN
        # Editor events for each of them change nothing.
        index.file_events([(str(secret_ws / rel), ChangeKind.CHANGED) for rel in SECRETS])
        index.file_events([(str(secret_ws / "env.txt"), ChangeKind.CREATED)])
        assert index.wait_idle(30)
        assert indexed_paths(index) == {PLAIN}
    finally:
        index.stop()
    data = database_bytes(tmp_path / "db")
    assert b"frobnicate_widget_total" in data  # the plain file's text is stored as is
    for rel, text in SECRETS.items():
        for word in distinctive(text):
            assert word.encode() not in data, (rel, word)
    assert AWS_KEY_ID.encode() not in data


def test_secrets_an_older_version_indexed_leave_the_index(
    secret_ws: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As an index built before the content checks: they let these through.
    monkeypatch.setattr(service_module, "CHECKS_VERSION", 1)
    monkeypatch.setattr(files_module, "secret_in_text", lambda text: None)
    index = start(secret_ws, tmp_path)
    index.stop()
    assert indexed_paths(index) == {PLAIN, "settings.py", "deploy_key"}
    monkeypatch.undo()
    index = start(secret_ws, tmp_path)
    try:
        assert indexed_paths(index) == {PLAIN}
    finally:
        index.stop()


def test_recent_edits_pass_the_same_checks(secret_ws: Path, tmp_path: Path) -> None:
    index = start(secret_ws, tmp_path)
    try:
        index.note_edit(str(secret_ws / "env.txt"), "TOKEN=abc\n", 0)  # link to .env
        index.note_edit(str(secret_ws / "ID_RSA"), "anything\n", 0)
        index.note_edit(str(secret_ws / "src" / "a.py"), f"KEY = '{AWS_KEY_ID}'\n", 3)
        index.note_edit(str(secret_ws / "src" / "b.py"), SECRETS["deploy_key"], 0)
        assert index.recent_edits(limit=10) == []
        # A key typed bit by bit: the partial edits before it go with it.
        index.note_edit(str(secret_ws / "src" / "c.py"), "KEY = 'AKIAQZXW'\n", 7)
        index.note_edit(str(secret_ws / "src" / "c.py"), f"KEY = '{AWS_KEY_ID}'\n", 7)
        assert index.recent_edits(limit=10) == []
        index.note_edit(str(secret_ws / PLAIN), "    return 0\n", 1)
        assert [e.path for e in index.recent_edits(limit=10)] == [PLAIN]
    finally:
        index.stop()


def test_the_database_folder_is_private(secret_ws: Path, tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        index = start(secret_ws, tmp_path)
        index.stop()
    finally:
        os.umask(old)
    db = tmp_path / "db"
    assert stat.S_IMODE(db.stat().st_mode) == 0o700
    for name in ("meta.json", "writer.lock"):
        assert stat.S_IMODE((db / name).stat().st_mode) == 0o600, name


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    out = tmp_path / "outside"
    write(out / "passwd", "outside_marker_passwd_k3j4\n")
    write(out / "apt" / "sources.list", "outside_marker_apt_m5n6\n")
    return out


def test_events_under_a_link_that_leaves_the_workspace_are_not_read(
    tmp_path: Path, outside: Path
) -> None:
    root = tmp_path / "ws"
    write(root / PLAIN, PLAIN_TEXT)
    os.symlink(outside, root / "etc_link")
    index = start(root, tmp_path)
    try:
        index.file_events(
            [
                (str(root / "etc_link" / "passwd"), ChangeKind.CHANGED),
                ((root / "etc_link" / "apt").as_uri(), ChangeKind.CREATED),
                ("etc_link/apt/sources.list", 1),
                (str(root / "etc_link"), ChangeKind.CREATED),
            ]
        )
        assert index.wait_idle(30)
        assert indexed_paths(index) == {PLAIN}
    finally:
        index.stop()
    assert b"outside_marker" not in database_bytes(tmp_path / "db")
    files = WorkspaceFiles(root, config_for(tmp_path))
    assert list(files.walk("etc_link/apt")) == []
    assert files.read("etc_link/passwd").text == ""


def test_watchdog_events_under_a_link_that_leaves_the_workspace_are_not_read(
    tmp_path: Path, outside: Path
) -> None:
    root = tmp_path / "ws"
    write(root / PLAIN, PLAIN_TEXT)
    os.symlink(outside, root / "etc_link")
    index = WorkspaceIndex(root, config_for(tmp_path), use_watchdog=True)
    index.start()
    try:
        assert index.wait_idle(60)
        # watchdog does not watch through the link: hand its callback what it would send.
        index._on_watch_events([(str(root / "etc_link" / "apt"), ChangeKind.CREATED)])
        index._on_watch_events([(str(root / "etc_link" / "passwd"), ChangeKind.CHANGED)])
        write(root / "src" / "later.py", "def arrives_later_marker():\n    pass\n")
        assert wait_until(lambda: "src/later.py" in indexed_paths(index), timeout=30)
        assert index.wait_idle(30)
        assert indexed_paths(index) == {PLAIN, "src/later.py"}
    finally:
        index.stop()
    assert b"outside_marker" not in database_bytes(tmp_path / "db")


def test_the_root_or_home_folder_is_refused(tmp_path: Path) -> None:
    for root in (Path("/"), Path.home()):
        with pytest.raises(UnsafeRoot, match="workspace"):
            WorkspaceIndex(root, config_for(tmp_path), use_watchdog=False)


@pytest.fixture
def awkward_ws(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "ws"
    for rel, text in SAMPLES.items():
        if rel.endswith(".py") or rel.endswith(".go"):
            write(root / rel, text)
    write(root / "locked" / "inner.py", "def locked_away_marker():\n    pass\n")
    bad = os.fsdecode(b"bad_\xff_name.py")
    write(root / "src" / bad, "def badname_marker_func():\n    pass\n")
    yield root
    os.chmod(root / "locked", 0o755)


def _unprivileged(argv: list[str]) -> list[str] | None:
    """`argv` run without the capabilities that let root read anything, or None."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    if os.geteuid() != 0:
        return argv
    return [
        setpriv,
        "--inh-caps=-all",
        "--bounding-set=-dac_override,-dac_read_search",
        "--",
        *argv,
    ]


SCAN = """
import dataclasses, json, sys
from pathlib import Path
from exlsp.index.config import IndexConfig
from exlsp.index.service import WorkspaceIndex
root, db = Path(sys.argv[1]), sys.argv[2]
cfg = IndexConfig(embeddingModel="none", databaseDir=db, debounceMs=50)
index = WorkspaceIndex(root, cfg, use_watchdog=False)
index.start()
index.wait_idle(120)
paths = sorted({r["path"] for r in index._store.table.search().limit(None).to_arrow().to_pylist()})
print(json.dumps({"stats": dataclasses.asdict(index.stats()), "paths": paths}))
index.stop()
"""


def test_an_unreadable_folder_and_an_odd_file_name_skip_only_themselves(
    awkward_ws: Path, tmp_path: Path
) -> None:
    os.chmod(awkward_ws / "locked", 0)
    argv = _unprivileged([sys.executable, "-c", SCAN, str(awkward_ws), str(tmp_path / "db")])
    if argv is None:
        pytest.skip("no way to read without privileges here (setpriv missing)")
    probe = _unprivileged(["cat", str(awkward_ws / "locked" / "inner.py")])
    assert probe is not None
    if subprocess.run(probe, capture_output=True).returncode == 0:
        pytest.skip("permissions are not enforced here")
    env = {**os.environ, "PYTHONPATH": str(REPO), "EXLSP_LLAMA_SERVER": "skip"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    expected = {rel for rel in SAMPLES if rel.endswith(".py") or rel.endswith(".go")}
    assert set(result["paths"]) == expected
    stats = result["stats"]
    assert stats["state"] == "idle" and stats["files"] == len(expected)
    assert stats["skipped_unreadable"] == 2  # the folder and the file name
