"""The `exlsp` command line: `complete` as the README shows it, and its failures."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

from tests.openai_fake_server import FakeOpenAIServer, streamed

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


def closed_port() -> int:
    """A loopback port nothing listens on: connections are refused."""
    with socket.create_server(("127.0.0.1", 0)) as s:
        return int(s.getsockname()[1])


def complete_openai(tmp_path: Path, base_url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "exlsp.json"
    model = {
        "backend": "openai",
        "baseUrl": base_url,
        "fimTemplate": "qwen2.5-coder",
        "connectTimeoutMs": 2000,
    }
    config.write_text(json.dumps({"model": model}), encoding="utf-8")
    file, line, col = readme_location()
    return subprocess.run(
        [*EXLSP, "complete", f"{file}:{line}:{col}", "--config", str(config), *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_complete_fails_in_one_line_when_the_server_is_unreachable(tmp_path: Path) -> None:
    """Not an empty line and exit 0, as if the model had nothing to say."""
    proc = complete_openai(tmp_path, f"http://127.0.0.1:{closed_port()}/v1")
    assert proc.returncode != 0, proc
    assert proc.stdout == ""
    message = proc.stderr.strip().splitlines()
    assert len(message) == 1 and message[0].startswith("exlsp complete: "), proc.stderr
    assert "127.0.0.1" in message[0]


def test_complete_json_names_the_filter_that_ended_the_suggestion(tmp_path: Path) -> None:
    """The scope filter cuts at the dedented line and cancels the stream: that cut,
    not "cancelled", is why the suggestion ended."""
    body = " abs(a.x - b.x)\nprint('done')\n" + "x = 1\n" * 200
    fake = FakeOpenAIServer(script=lambda _: streamed(body, pieces=len(body)), step_s=0.01)
    url = fake.start()
    try:
        proc = complete_openai(tmp_path, url, "--json")
    finally:
        fake.stop()
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["suggestion"] == " abs(a.x - b.x)"
    assert out["stats"]["stop_reason"].startswith("filter:"), out["stats"]
