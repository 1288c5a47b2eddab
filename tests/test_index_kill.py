"""SIGKILL the indexer at random moments; the next start must still work and converge."""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exlsp.index.chunk import Chunker
from exlsp.index.config import IndexConfig
from exlsp.index.files import Verdict, WorkspaceFiles
from exlsp.index.service import WorkspaceIndex
from tests.index_helpers import FakeEmbedder, all_rows
from tests.index_kill_helper import module_text

HELPER = Path(__file__).resolve().parent / "index_kill_helper.py"
KILLS = 10

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL")


def read_lines(proc: subprocess.Popen[str], until: float, stop_at: str) -> list[str]:
    """Lines the process prints up to one starting with `stop_at`, waiting until `until`."""
    assert proc.stdout is not None
    lines: list[str] = []
    while time.monotonic() < until:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, until - time.monotonic()))
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.strip())
        if line.startswith(stop_at):
            break
    return lines


def test_killed_mid_write_recovers(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    (root / "pkg").mkdir(parents=True)
    for n in range(150):
        (root / "pkg" / f"mod_{n}.py").write_text(module_text(n, 0))
    db = tmp_path / "db"
    seed = int(os.environ.get("EXLSP_TEST_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    commits = 0
    for run in range(KILLS):
        # Even runs die at a random moment of start-up (open, scan, embedding backlog),
        # odd ones while rewriting files (batches, embeddings, compaction).
        stop_at = "ready" if run % 2 == 0 else "commit"
        proc = subprocess.Popen(
            [sys.executable, str(HELPER), str(root), str(db), str(seed + run)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        try:
            printed = read_lines(proc, time.monotonic() + 60, stop_at)
            assert printed and printed[-1].startswith(stop_at), f"seed {seed} run {run}: {printed}"
            commits += sum(1 for line in printed if line.startswith("commit"))
            time.sleep(rng.uniform(0.05, 1.0))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        assert proc.returncode == -signal.SIGKILL
        rest = proc.stdout.read() if proc.stdout else ""
        commits += rest.count("commit")
    assert commits >= KILLS // 2, f"seed {seed}: the helper barely wrote ({commits} batches)"

    # A fresh start opens (or rebuilds) the table and converges to the files on disk.
    config = IndexConfig(embeddingModel="none", databaseDir=str(db), debounceMs=0)
    index = WorkspaceIndex(root, config, use_watchdog=False, embedder=FakeEmbedder(16))
    index.start()
    try:
        assert index.wait_idle(120), f"seed {seed}"
        stats = index.stats()
        assert stats.state == "idle" and stats.last_error is None, f"seed {seed}: {stats}"
        files = WorkspaceFiles(root, config)
        chunker = Chunker(config.chunkLines, config.chunkOverlap)
        expected: dict[str, set[str]] = {}
        for rel in files.walk():
            fr = files.read(rel)
            if fr.verdict == Verdict.OK:
                expected[rel] = {c.id for c in chunker.chunk(rel, fr.text)}
        got: dict[str, set[str]] = {}
        for row in all_rows(index):
            got.setdefault(str(row["path"]), set()).add(str(row["id"]))
        assert got == {p: ids for p, ids in expected.items() if ids}, f"seed {seed}"
        assert stats.chunks_with_vectors == stats.chunks, f"seed {seed}"
        some = sorted(expected)[0]
        text = (root / some).read_text()
        name = text.split("(", 1)[0].removeprefix("def ")
        # Lexical: the fake embedder's vectors mean nothing, and in hybrid mode the file
        # they rank first can tie the lexical winner on fused score (seed 865175001).
        hits = index.search(f"{name}(3)", limit=3, mode="lexical")
        assert hits[0].path == some, f"seed {seed}"
    finally:
        index.stop()
