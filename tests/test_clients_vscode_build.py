"""The VS Code extension builds with tsc and its unit tests pass.

Runs `npm ci && npm run compile && npm test` in clients/vscode: the locked
dependencies install, the TypeScript (extension + settings mapping) compiles
against the `vscode` and `vscode-languageclient` typings, and node's test
runner checks the settings mapping, the server launch command and the status
bar texts. No VS Code is needed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

VSCODE = Path(__file__).resolve().parents[1] / "clients" / "vscode"


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, cwd=VSCODE, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(args)} exited {proc.returncode}\n"
        f"stdout: {proc.stdout[-4000:]}\nstderr: {proc.stderr[-4000:]}"
    )
    return proc


@pytest.mark.slow
def test_extension_builds_and_unit_tests_pass() -> None:
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        pytest.skip("node/npm not installed: the VS Code extension cannot be built here")
    assert (VSCODE / "package-lock.json").is_file(), "package-lock.json must be committed"
    _run([npm, "ci", "--no-audit", "--no-fund"], timeout=600)
    _run([npm, "run", "compile"], timeout=300)
    for name in ("extension.js", "settings.js", "test/settings.test.js"):
        assert (VSCODE / "out" / name).is_file(), f"tsc did not emit out/{name}"
    tested = _run([npm, "test"], timeout=300)
    report = tested.stdout
    assert "# fail 0" in report, report
    passed = [line for line in report.splitlines() if line.startswith("# pass ")]
    assert passed and int(passed[0].split()[-1]) >= 9, report
