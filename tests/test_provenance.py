"""What benchmark results carry: machine, commit, load; and the shared figures."""

from __future__ import annotations

import json
from pathlib import Path

from exlsp.benchmarks.provenance import (
    commit_info,
    dist,
    machine_info,
    percentile,
    write_results,
)


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([4, None, 1, 3, 2], 95) == 3.85
    assert percentile([5], 95) == 5
    assert percentile([], 50) is None


def test_dist_skips_missing_values_and_rounds() -> None:
    d = dist([1.0, None, 2.0, 4.0], digits=1)
    assert d == {"n": 3, "p50": 2.0, "p95": 3.8, "mean": 2.3, "min": 1.0, "max": 4.0}
    assert dist([None]) == {"n": 0}


def test_machine_and_commit() -> None:
    info = machine_info(("pygls", "no-such-package-here"))
    assert info["cores"] >= 1 and info["python"].count(".") == 2
    assert "pygls" in info and "no-such-package-here" not in info
    assert "gpu" not in info or info["gpu"]
    sha = commit_info()["sha"]
    assert sha == "unknown" or len(sha) == 40


def test_results_are_written_as_json(tmp_path: Path) -> None:
    path = write_results(tmp_path / "deep" / "r.json", {"a": [1, 2], "b": "é"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": [1, 2], "b": "é"}
