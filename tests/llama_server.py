"""llama.cpp's `llama-server` for the end-to-end tests of the openai backend.

PyPI has no binary of it, but the source distribution of `llama-cpp-python`
vendors llama.cpp whole; the helper downloads that sdist with pip, builds only
the `llama-server` target (static, CPU, no web UI, no network features) and
keeps the binary in a per-machine build cache (``$EXLSP_TEST_BUILD_CACHE``,
default ``~/.cache/exlsp-tests``), outside the checkout, so that a machine
builds it once for all its clones and CI runs: about 15 CPU-minutes, 8 minutes
on two idle cores. ``EXLSP_LLAMA_SERVER`` names an existing binary instead, or
``skip`` to skip these tests.

Why this server: it is one of the servers the backend targets; it accepts
token-id prompts as well as text, honours ``cache_prompt`` and reports its cache
use (``usage.prompt_tokens_details.cached_tokens``, ``timings.cache_n``).
llama-cpp-python's own server (`llama_cpp.server`) would need the same compile
and accepts only text prompts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import platformdirs

from exlsp.benchmarks.build_model import _file_lock

LLAMA_CPP_PYTHON = "0.3.36"  # the sdist whose vendored llama.cpp is built
# -O1: the tests serve a tiny model, for which optimization buys nothing, while
# compiling llama.cpp's server at -O3 takes far longer on a 2-core machine.
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DCMAKE_C_FLAGS_RELEASE=-O1 -DNDEBUG",
    "-DCMAKE_CXX_FLAGS_RELEASE=-O1 -DNDEBUG",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    # The web UI's assets would be fetched from the network: build without them.
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_UI=OFF",
)
BUILD_VERSION = "1"  # bump when the flags change


class BuildFailed(RuntimeError):
    pass


def _binary_path() -> Path:
    base = os.environ.get("EXLSP_TEST_BUILD_CACHE") or platformdirs.user_cache_dir("exlsp-tests")
    return Path(base) / "llama-server" / f"{LLAMA_CPP_PYTHON}-b{BUILD_VERSION}" / "llama-server"


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _build(target: Path) -> None:
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise BuildFailed(f"{tool} is not installed")
    work = Path(tempfile.mkdtemp(prefix="llama-server-build-"))
    log = target.parent / "build.log"
    try:
        with open(log, "w") as out:
            download = [
                sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                "-d", str(work), f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
            ]  # fmt: skip
            if subprocess.run(download, stdout=out, stderr=subprocess.STDOUT).returncode:
                raise BuildFailed(f"pip could not download llama-cpp-python: {_log_tail(log)}")
            sdist = next(work.glob("llama_cpp_python-*.tar.gz"))
            with tarfile.open(sdist) as tar:
                tar.extractall(work, filter="data")
            source = next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))
            build = work / "build"
            jobs = str(os.cpu_count() or 2)
            steps = [
                ["cmake", "-S", str(source), "-B", str(build), *CMAKE_FLAGS],
                ["cmake", "--build", str(build), "--target", "llama-server", "-j", jobs],
            ]
            for step in steps:
                if subprocess.run(step, stdout=out, stderr=subprocess.STDOUT).returncode:
                    raise BuildFailed(f"{' '.join(step[:3])} failed:\n{_log_tail(log)}")
        built = next(build.rglob("llama-server"), None)
        if built is None or not built.is_file():
            raise BuildFailed("the build made no llama-server binary")
        tmp = target.with_name(target.name + ".tmp")
        shutil.copy2(built, tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ensure_llama_server() -> Path:
    """The `llama-server` binary: ``$EXLSP_LLAMA_SERVER``, the cached build, or a new build."""
    given = os.environ.get("EXLSP_LLAMA_SERVER")
    if given == "skip":
        raise BuildFailed("EXLSP_LLAMA_SERVER=skip")
    if given:
        path = Path(given)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise BuildFailed(f"EXLSP_LLAMA_SERVER is not an executable file: {path}")
        return path
    target = _binary_path()
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / ".build.lock"):
        if not target.is_file():
            _build(target)
    return target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LlamaServer:
    """One `llama-server` process on loopback, started and stopped by a test."""

    def __init__(self, binary: Path, model: Path, *args: str, port: int | None = None) -> None:
        self.binary = binary
        self.model = model
        self.args = args
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = Path(tempfile.mkstemp(prefix="llama-server-", suffix=".log")[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float = 120) -> None:
        cmd = [
            str(self.binary), "-m", str(self.model), "--host", "127.0.0.1",
            "--port", str(self.port), "--threads", "1", *self.args,
        ]  # fmt: skip
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited: {_log_tail(self.log)}")
            health = f"http://127.0.0.1:{self.port}/health"
            with contextlib.suppress(OSError), urllib.request.urlopen(health, timeout=2) as r:
                if r.status == 200:
                    return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"llama-server did not become healthy: {_log_tail(self.log)}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


@contextlib.contextmanager
def running(binary: Path, model: Path, *args: str) -> Iterator[LlamaServer]:
    server = LlamaServer(binary, model, *args)
    server.start()
    try:
        yield server
    finally:
        server.stop()
