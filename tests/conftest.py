"""Shared fixtures: tiny models built by the tests themselves, cached per session."""

from __future__ import annotations

import inspect
import os
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from exlsp.completion.host import control

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `tests.fakes`

# Tests never touch the user's cache: models are built under .pytest-cache/ of the checkout
# unless EXLSP_CACHE_DIR says otherwise (CI sets nothing; the build takes about a minute).
os.environ.setdefault("EXLSP_CACHE_DIR", str(ROOT / ".test-cache"))
# Nor the user's acceptance statistics (servers started by the tests inherit this).
os.environ.setdefault("EXLSP_STATE_DIR", str(ROOT / ".test-cache" / "state"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Nor the user's configuration file: an empty directory unless a test points elsewhere.
os.environ.setdefault("EXLSP_CONFIG_DIR", str(ROOT / ".test-cache" / "user-config"))
# Servers load their model in-process unless a test asks for the shared model host
# (tests/test_host*.py): no detached host outlives a test.
os.environ.setdefault("EXLSP_MODEL_HOST", "off")


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """A random-weight tiny Qwen2.5-Coder-architecture model."""
    from exlsp.benchmarks.build_model import ensure_model

    return ensure_model(family="qwen2.5-coder", size="tiny", seed=0, train_steps=0)


@pytest.fixture(scope="session")
def trained_model() -> Path:
    """The tiny model after a few hundred training steps: it emits code-like text.

    The same build as the server's built-in default model.
    """
    from exlsp.benchmarks.build_model import DEFAULT_MODEL, ensure_model

    return ensure_model(**DEFAULT_MODEL)


# -- test layers ------------------------------------------------------------------
#
# `-m unit` (the same as `-m "not e2e and not slow and not gpu"`) runs in well under a
# minute. A test is marked `e2e` here, without a hand-written marker, when it or any
# fixture or tests/ helper it reaches spawns a process (`exlsp serve`, llama-server,
# nvim, node, a script) or builds a tiny model (the first build takes minutes).

# Fixtures that build a model or start a server process.
_E2E_FIXTURES = frozenset({"tiny_model", "trained_model", "lsp_client"})
# Names whose use means a process is started or a model built.
_E2E_NAMES = frozenset(
    {
        "subprocess",
        "Popen",
        "create_subprocess_exec",
        "create_subprocess_shell",
        "ensure_model",
        "build_model",
        "ensure_llama_server",
        "pytest_lsp",
        "ClientServerConfig",
        "HostWorker",  # these start a model host process when none runs
        "host_embedder",
        "ensure_host",
    }
)


def _names(code: types.CodeType) -> Iterator[str]:
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _names(const)


def _spawns(obj: object, seen: set[int]) -> bool:
    """Whether a test, fixture or tests/ helper (followed through the names it uses
    from its module, to any depth) starts a process or builds a model."""
    if id(obj) in seen:
        return False
    seen.add(id(obj))
    if isinstance(obj, type):
        return any(_spawns(v, seen) for v in vars(obj).values() if inspect.isfunction(v))
    func = inspect.unwrap(obj) if callable(obj) else obj  # type: ignore[arg-type]
    code = getattr(func, "__code__", None)
    if code is None:
        return False
    scope = getattr(func, "__globals__", {})
    for name in _names(code):
        if name in _E2E_NAMES:
            return True
        target = scope.get(name)
        module = getattr(target, "__module__", None) or ""
        if (
            (inspect.isfunction(target) or isinstance(target, type))
            and (module.startswith("tests.") or module == scope.get("__name__"))
            and _spawns(target, seen)
        ):
            return True
    return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if not isinstance(item, pytest.Function):
            continue
        fixtures = item._fixtureinfo.name2fixturedefs
        if item.get_closest_marker("e2e") is None and (
            _E2E_FIXTURES.intersection(item.fixturenames)
            or _spawns(item.obj, set())
            or any(_spawns(d.func, set()) for defs in fixtures.values() for d in defs)
        ):
            item.add_marker(pytest.mark.e2e)
        if not any(item.get_closest_marker(m) for m in ("e2e", "slow", "gpu")):
            item.add_marker(pytest.mark.unit)


# -- model hosts -------------------------------------------------------------------------


def stop_all_hosts() -> None:
    """Stop every host in this test's runtime folder and wait until each exited."""
    pids = [h["pid"] for h in control.running_hosts()]
    control.stop_hosts()
    limit = time.monotonic() + 10
    for pid in pids:
        while time.monotonic() < limit and _alive(pid):
            time.sleep(0.05)
        if _alive(pid):
            os.kill(pid, 9)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def host_runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A runtime folder of the test's own: its model hosts are never the user's."""
    folder = tmp_path / "run"
    monkeypatch.setenv("EXLSP_RUNTIME_DIR", str(folder))
    monkeypatch.delenv("EXLSP_MODEL_HOST", raising=False)
    yield folder
    stop_all_hosts()
