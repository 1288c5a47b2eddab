"""The host round-trip benchmark runs end to end on a host of its own."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from exlsp.benchmarks import host_roundtrip, provenance

pytestmark = pytest.mark.e2e  # starts a model host process


def test_it_measures_both_paths_and_stops_its_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(provenance, "RESULTS_DIR", tmp_path)
    monkeypatch.setenv("EXLSP_RUNTIME_DIR", str(tmp_path / "elsewhere"))
    assert host_roundtrip.main(["--rounds", "1", "--jobs", "20", "--name", "rt"]) == 0
    result = json.loads((tmp_path / "rt.json").read_text())
    assert result["in_process_ms"]["n"] == result["host_ms"]["n"] == 18
    assert result["host_ms"]["p50"] > 0 and result["in_process_ms"]["p50"] > 0
    assert "the host adds" in capsys.readouterr().out
    # Its host ran in a runtime folder of its own, gone with it; the caller's is back.
    assert not (tmp_path / "elsewhere").exists()
    assert os.environ["EXLSP_RUNTIME_DIR"] == str(tmp_path / "elsewhere")
