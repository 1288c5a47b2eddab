"""Acceptance statistics: counting, the local file, `exlsp stats`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exlsp.completion.acceptance import AcceptanceStats, load, stats_path
from exlsp.server.cli import main


def test_shown_accepted_and_partial_are_counted_per_model_and_language(tmp_path: Path) -> None:
    stats = AcceptanceStats(tmp_path / "stats.json")
    # "ret" typed already, the item inserts "return a + b": 9 characters are the model's.
    full = stats.shown("m1", "python", typed=3, added=9, latency_ms=10.0)
    part = stats.shown("m1", "python", typed=0, added=20, latency_ms=30.0)
    stats.shown("m2", "rust", typed=0, added=5, latency_ms=5.0)
    assert stats.accepted(full)
    assert not stats.accepted(full)  # counted once
    assert stats.partially_accepted(part, 6)  # a word
    assert stats.partially_accepted(part, 15)  # then a line: 9 more characters
    assert not stats.accepted("unknown-id")
    totals = stats.totals()
    py = totals[("m1", "python")]
    assert (py.shown, py.accepted, py.partiallyAccepted) == (2, 1, 2)
    assert py.charsShown == 29
    assert py.charsAccepted == 9 + 15
    assert py.latencyMsTotal == 40.0
    assert totals[("m2", "rust")].shown == 1
    assert totals[("m2", "rust")].accepted == 0


def test_flush_adds_to_the_file_that_other_servers_write(tmp_path: Path) -> None:
    path = tmp_path / "state" / "stats.json"
    a, b = AcceptanceStats(path), AcceptanceStats(path)
    a.accepted(a.shown("m", "python", 0, 4, 1.0))
    b.shown("m", "python", 0, 7, 1.0)
    a.flush()
    b.flush()
    a.flush()  # nothing new: nothing added twice
    counts = load(path)[("m", "python")]
    assert (counts.shown, counts.accepted, counts.charsAccepted) == (2, 1, 4)
    assert json.loads(path.read_text())["version"] == 1


def test_turned_off_counts_nothing(tmp_path: Path) -> None:
    stats = AcceptanceStats(tmp_path / "stats.json", enabled=False)
    assert stats.shown("m", "python", 0, 4, 1.0) == ""
    stats.close()
    assert not (tmp_path / "stats.json").exists()


def test_a_corrupt_file_is_started_again(tmp_path: Path) -> None:
    path = tmp_path / "stats.json"
    path.write_text("{not json")
    stats = AcceptanceStats(path)
    stats.shown("m", "go", 0, 4, 1.0)
    stats.close()
    assert load(path)[("m", "go")].shown == 1


def test_exlsp_stats_prints_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EXLSP_STATE_DIR", str(tmp_path))
    assert stats_path() == tmp_path / "stats.json"
    stats = AcceptanceStats()
    stats.accepted(stats.shown("/models/coder-1.5b", "python", 0, 12, 20.0))
    stats.shown("/models/coder-1.5b", "python", 0, 12, 40.0)
    stats.close()
    assert main(["stats"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "python" in line)
    assert row.split()[:5] == ["coder-1.5b", "python", "2", "1", "50.0%"]
    assert main(["stats", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["models"]["/models/coder-1.5b"]["python"]["charsAccepted"] == 12
