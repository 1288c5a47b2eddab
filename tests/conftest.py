"""Shared fixtures: tiny models built by the tests themselves, cached per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

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
