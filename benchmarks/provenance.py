"""What every benchmark result carries, and the figures they share.

A result says which machine, which commit and when; on a shared machine its
load goes with the figures. Distributions are summarized the same way in
every benchmark (percentiles by linear interpolation, numpy's default).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
PACKAGES = ("torch", "transformers", "tokenizers", "pygls", "exllamav2")


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _gpu() -> dict[str, Any]:
    """The CUDA GPU torch sees, with the driver's versions; empty without one."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return {}
    info: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(0),
        "gpu_memory_gib": round(torch.cuda.mem_get_info(0)[1] / 2**30, 1),
        "torch_cuda": torch.version.cuda,
    }
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=15).stdout
        if m := re.search(r"Driver Version:\s*([\w.]+)", smi):
            info["driver"] = m.group(1)
        if m := re.search(r"CUDA Version:\s*([\w.]+)", smi):
            info["driver_cuda"] = m.group(1)
    return info


def machine_info(packages: Iterable[str] = PACKAGES) -> dict[str, Any]:
    """The machine, the versions of `packages` and the GPU (where torch is loaded)."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "loadavg": loadavg(),
    }
    with contextlib.suppress(AttributeError):
        info["affinity"] = len(os.sched_getaffinity(0))
    for name in packages:
        with contextlib.suppress(metadata.PackageNotFoundError):
            info[name] = metadata.version(name)
    info.update(_gpu())
    return info


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def commit_info() -> dict[str, Any]:
    """The checkout's commit; EXLSP_COMMIT names it where the tree has no .git."""
    sha = os.environ.get("EXLSP_COMMIT") or _git("rev-parse", "HEAD") or "unknown"
    return {"sha": sha, "dirty": bool(_git("status", "--porcelain", "--untracked-files=no"))}


def percentile(values: Sequence[float | None], q: float) -> float | None:
    """The q-th percentile (0-100), interpolating between closest ranks; None if empty."""
    xs = sorted(v for v in values if v is not None)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def dist(values: Sequence[float | None], digits: int = 3) -> dict[str, Any]:
    """n, p50, p95, mean, min and max of the values that are not None."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return {"n": 0}

    def r(x: float | None) -> float | None:
        return None if x is None else round(x, digits)

    return {
        "n": len(xs),
        "p50": r(percentile(xs, 50)),
        "p95": r(percentile(xs, 95)),
        "mean": r(statistics.fmean(xs)),
        "min": r(min(xs)),
        "max": r(max(xs)),
    }


def write_results(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
