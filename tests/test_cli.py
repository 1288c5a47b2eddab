"""The `exlsp` command line: `complete` as the README shows it, and its failures."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXLSP = [sys.executable, "-m", "exlsp.server"]


def readme_location() -> tuple[str, int, int]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r"exlsp complete (\S+):(\d+):(\d+)\n", text)
    assert m, "the README's first command runs `exlsp complete FILE:LINE:COL`"
    return m.group(1), int(m.group(2)), int(m.group(3))


def test_the_readme_points_at_a_real_place() -> None:
    file, line, col = readme_location()
    lines = (ROOT / file).read_text(encoding="utf-8").split("\n")
    assert 1 <= line <= len(lines)
    assert 1 <= col <= len(lines[line - 1]) + 1
    assert lines[line - 1][: col - 1].strip(), "the cursor follows some code on its line"


def test_complete_as_the_readme_runs_it(trained_model: Path) -> None:
    file, line, col = readme_location()
    proc = subprocess.run(
        [*EXLSP, "complete", f"{file}:{line}:{col}", "--model", str(trained_model), "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    stats = out["stats"]
    assert stats["source"] == "model"
    assert stats["prompt_tokens"] > 0
    assert stats["prefilled_tokens"] == stats["prompt_tokens"]  # a fresh process: no cache
    assert stats["stop_reason"] in {"eos", "max_tokens", "deadline", "stop"}
    assert out["model"]["path"] == str(trained_model)
    assert isinstance(out["suggestion"], str)


def test_complete_fails_in_one_line_without_a_model(tmp_path: Path) -> None:
    file, line, col = readme_location()
    proc = subprocess.run(
        [*EXLSP, "complete", f"{file}:{line}:{col}", "--model", str(tmp_path / "nothing")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert proc.stdout == ""
    message = proc.stderr.strip().splitlines()
    assert len(message) == 1 and "model directory not found" in message[0], proc.stderr


def test_complete_rejects_a_place_outside_the_file() -> None:
    file, line, _ = readme_location()
    proc = subprocess.run(
        [*EXLSP, "complete", f"{file}:{line}:400"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "outside line" in proc.stderr
