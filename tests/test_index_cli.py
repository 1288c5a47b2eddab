"""`exlsp index` and `exlsp search` helpers."""

from __future__ import annotations

from pathlib import Path

import pytest

from exlsp.index.cli import run_index, run_search
from tests.index_helpers import config_for, write_workspace


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
