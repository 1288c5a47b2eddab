"""The built wheel installs everything under the `exlsp` namespace and nothing else."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_holds_only_the_exlsp_namespace(tmp_path: Path) -> None:
    # Built from a copy: a build in the checkout leaves build/ and *.egg-info behind,
    # whose file lists would hide a package missing from pyproject's list next time.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("server", "completion", "index", "benchmarks"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(src), "-w", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("exlsp-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"exlsp", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    packages = {n.split("/")[1] for n in names if n.startswith("exlsp/")}
    assert packages == {"server", "completion", "index", "benchmarks"}
    assert "exlsp/__init__.py" not in names  # an implicit namespace package
    # Every module of the source folders, however deep (a package left out of
    # pyproject's list would be missing from installs, not from the checkout).
    sources = {
        f"exlsp/{path.relative_to(ROOT).as_posix()}"
        for folder in ("server", "completion", "index", "benchmarks")
        for path in (ROOT / folder).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert sources - set(names) == set()
    assert "exlsp/completion/models.json" in names  # the model catalogue, package data
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "exlsp = exlsp.server.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
