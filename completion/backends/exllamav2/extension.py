"""exllamav2's CUDA extension: where torch builds it, its build lock, the import.

torch's JIT loader builds the extension at exllamav2's first import and holds a
lock in the build directory meanwhile; a killed build leaves the lock behind and
every later import would wait on it forever, so a stale lock is reported instead.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

EXTENSION_NAME = "exllamav2_ext"
# A torch JIT build holds `<build dir>/lock` for its whole duration and removes it at
# the end; a killed build leaves it behind and every later import waits on it forever.
STALE_LOCK_AGE_S = 300.0


class ExLlamaV2LoadError(RuntimeError):
    """The exllamav2 backend cannot start; the message says why and what to do."""


class StaleExtensionLockError(ExLlamaV2LoadError):
    def __init__(self, lock: Path, age_s: float) -> None:
        self.lock = lock
        super().__init__(
            f"exllamav2's CUDA extension build is locked by {lock}, left {age_s / 60:.0f} min ago "
            "by an interrupted build (no build is running): importing exllamav2 would wait "
            f"forever. Delete it and start again: rm '{lock}'"
        )


def extension_build_dir(torch_module: Any | None = None) -> Path:
    """Where torch's JIT loader builds (and locks) exllamav2's extension.

    Mirrors `torch.utils.cpp_extension._get_build_directory`: `$TORCH_EXTENSIONS_DIR/<name>`,
    else `<user cache>/torch_extensions/py<maj><min>_<cuXYZ|rocmXYZ|cpu>/<name>`.
    """
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root) / EXTENSION_NAME
    if torch_module is None:
        import torch

        torch_module = torch
    version: Any = torch_module.version
    if getattr(version, "hip", None):
        accel = "rocm" + str(version.hip).replace(".", "")
    elif getattr(version, "cuda", None):
        accel = "cu" + str(version.cuda).replace(".", "")
    else:
        accel = "cpu"
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    tag = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    base = Path(os.path.realpath(os.path.join(cache_home, "torch_extensions")))
    return base / f"{tag}_{accel}" / EXTENSION_NAME


def _lock_holder_alive(lock: Path) -> bool | None:
    """Whether a live process holds `lock` open (torch's baton keeps its fd open).

    None when that cannot be told (no /proc, or nothing readable in it).
    """
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    target = os.path.realpath(lock)
    readable = False
    for pid_dir in proc.iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            fds = list((pid_dir / "fd").iterdir())
        except OSError:
            continue
        readable = True
        for fd in fds:
            try:
                if os.readlink(fd) == target:
                    return True
            except OSError:
                continue
    return False if readable else None


def _newest_mtime(directory: Path) -> float:
    newest = 0.0
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            with contextlib.suppress(OSError):
                newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
    return newest


def find_stale_extension_lock(
    build_dir: Path | None = None,
    *,
    max_age_s: float = STALE_LOCK_AGE_S,
    now: float | None = None,
    holder_alive: Callable[[Path], bool | None] = _lock_holder_alive,
) -> tuple[Path, float] | None:
    """The build lock and its age, when it is stale: older than `max_age_s`, held open
    by no live process, and with no file in the build dir written for `max_age_s`."""
    build_dir = build_dir if build_dir is not None else extension_build_dir()
    lock = build_dir / "lock"
    try:
        mtime = lock.stat().st_mtime
    except OSError:
        return None
    now = time.time() if now is None else now
    age = now - mtime
    if age < max_age_s:
        return None
    if holder_alive(lock):
        return None
    if now - _newest_mtime(build_dir) < max_age_s:
        return None  # a build elsewhere (another container sharing the cache) is writing
    return lock, age


def _extension_is_built(build_dir: Path) -> bool:
    with contextlib.suppress(OSError):
        return any(p.suffix == ".so" for p in build_dir.iterdir())
    return False


def import_exllamav2(torch_module: Any | None = None) -> ModuleType:
    """Import exllamav2 (which JIT-builds its CUDA extension the first time).

    A stale build lock raises `StaleExtensionLockError` instead of hanging.
    exllamav2 prints to stdout while it builds; stdout may be the LSP channel,
    so the import runs with `sys.stdout` pointed at stderr.
    """
    if "exllamav2" in sys.modules:
        return sys.modules["exllamav2"]
    build_dir = extension_build_dir(torch_module)
    stale = find_stale_extension_lock(build_dir)
    if stale is not None:
        raise StaleExtensionLockError(*stale)
    if _extension_is_built(build_dir):
        log.info("loading exllamav2 (CUDA extension built in %s)", build_dir)
    else:
        log.warning(
            "compiling exllamav2 CUDA extension (first run, can take minutes) in %s", build_dir
        )
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(sys.stderr):
            module = importlib.import_module("exllamav2")
    except ImportError as e:
        raise ExLlamaV2LoadError(
            f"cannot import exllamav2 ({e}); install it with `pip install exllamav2==0.3.2` "
            "(and `tokenizers`); its CUDA extension needs nvcc matching torch's CUDA, "
            "ninja and a C++ compiler"
        ) from e
    log.info("imported exllamav2 in %.1f s", time.perf_counter() - t0)
    return module
